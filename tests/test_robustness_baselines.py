"""dcgan.py, vae.py and vaegan.py as a user breaks them (tests/test_robustness.py does the same for ddpm.py
and ddim.py): Ctrl-C and SIGTERM, a diverging run, a full disk, debris of a killed run, checkpoints that
are not theirs, bad flags and files, long waits (progress lines), and nothing float64 on an accelerator
(Apple's MPS has no float64).

Most tests call the scripts in-process, which is fast: every bad input must end in sys.exit(one line),
which Python prints as that line and nothing else. A few run a script as a user does (a subprocess),
to check what reaches the terminal: one line on stderr, no traceback."""
import csv
import errno
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error

TINY = {"dcgan": dict(g_channels=8, d_channels=8, check_n=16, check_every=3),
        "vae": dict(channels=8, latent=4, likelihood="gaussian"),  # σ is learned: it must resume too
        "vaegan": dict(channels=4, d_channels=4, latent=3)}
SCRIPTS = sorted(TINY)
MODULES = {name: importlib.import_module(name) for name in SCRIPTS}
SAVED = {"dcgan": ("generator", "discriminator", "optimizer_g", "optimizer_d"),  # what a checkpoint must hold
         "vae": ("model", "optimizer"), "vaegan": ("model", "optimizer")}
CSV = {"dcgan": ("loss_d", "loss_g", "d_real", "d_fake"), "vae": ("loss", "reconstruction", "kl", "sigma"),
       "vaegan": ("prior", "llike", "gan_decoder", "gan_discriminator", "d_real", "d_recon", "d_prior")}


def config(name, out, data, **changes):
    """A tiny, fast run of script `name` on `data`, logging every step."""
    fields = dict(dataset=data, device="cpu", precision="fp32", batch_size=4, log_every=1, sample_every=100,
                  out=str(out)) | TINY[name] | changes
    return MODULES[name].Config(**fields)


def stops(fn, *args) -> str:
    """fn(*args) must stop with one line (sys.exit with a message): that message."""
    with pytest.raises(SystemExit) as stop:
        fn(*args)
    message = str(stop.value.code)
    assert message and "\n" not in message, message
    return message


def cli(name, *args) -> str:
    """The script's own main() on a command line, in-process: the one line it stops with."""
    m = MODULES[name]
    return stops(lambda: m.main(m.parse_args([str(a) for a in args])))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    """Two nested checkpoint entries (state_dicts, optimizer states) equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def rows(path, columns):
    return [[r["step"], *(r[c] for c in columns)] for r in csv.DictReader(open(path))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the subprocess tests get (OMP_NUM_THREADS=1): on a small machine busy with other jobs,
    OpenMP threads that spin-wait make dcgan's 512-d eigh several times slower (tests/test_fid.py says more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 random 16x16 RGB images as a uint8 .npy (N, H, W, C), shared by the module's tests."""
    path = tmp_path_factory.mktemp("data") / "sprites.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One finished 2-step run of each script (its checkpoint is read, never changed, by the tests)."""
    out = tmp_path_factory.mktemp("trained")
    for name in SCRIPTS:
        MODULES[name].train(config(name, out / name, data, steps=2))
    return out


# --------------------------------------------------------------------------------------------
# Nothing lost: Ctrl-C and SIGTERM, divergence, a full disk, debris, append-safe metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_sigint_saves_the_current_step_and_resume_matches_an_uninterrupted_run(name, data, tmp_path, monkeypatch):
    """A real SIGINT (Ctrl-C) at step 3 of 6: a checkpoint at step 3 and one line; --resume then ends
    exactly where six steps in one go end, weights, optimiser state and metrics.csv alike."""
    m = MODULES[name]
    m.train(config(name, tmp_path / "a", data, steps=6))
    log = m.Run.log

    def log_then_ctrl_c(self, step, **values):  # the user presses Ctrl-C during step 3's log
        log(self, step, **values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(m.Run, "log", log_then_ctrl_c)
    message = stops(m.train, config(name, tmp_path / "b", data, steps=6))
    assert "stopped by SIGINT at step 3" in message and "--resume" in message, message
    assert load(tmp_path / "b" / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(m.Run, "log", log)
    m.train(config(name, tmp_path / "b", data, steps=6, resume=True))
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert b["step"] == 6
    for key in SAVED[name]:
        assert_same_tensors(a[key], b[key], key)
    columns = [c for c in CSV[name] if c in open(tmp_path / "a" / "metrics.csv").readline()]
    assert rows(tmp_path / "b" / "metrics.csv", columns) == rows(tmp_path / "a" / "metrics.csv", columns)
    assert [r[0] for r in rows(tmp_path / "b" / "metrics.csv", [])] == [str(s) for s in range(1, 7)]
    if name == "dcgan":  # quality checks at 3 and 6 in both, and the same best.pt
        assert rows(tmp_path / "b" / "quality.csv", ["value", "best_step"]) == \
            rows(tmp_path / "a" / "quality.csv", ["value", "best_step"])
        assert_same_tensors(load(tmp_path / "a" / "best.pt")["generator"], load(tmp_path / "b" / "best.pt")["generator"])


def test_ctrl_c_and_sigterm_reach_the_terminal_as_one_line(data, tmp_path):
    """As a user (or a cluster) stops a run: a signal from outside, at whatever step it is; one line on
    stderr that says where the checkpoint is, and --resume continues from that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for sig, script in ((signal.SIGINT, "dcgan.py"), (signal.SIGTERM, "vaegan.py")):
        out = tmp_path / script
        flags = ["--dataset", data, "--out", out, "--device", "cpu", "--batch-size", "4", "--log-every", "2",
                 *{"dcgan.py": ["--g-channels", "8", "--d-channels", "8", "--check-n", "16"],
                   "vaegan.py": ["--channels", "4", "--d-channels", "4", "--latent", "3"]}[script]]
        run = subprocess.Popen([sys.executable, script, *map(str, flags), "--steps", "100000"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not run.stdout.readline().startswith("step"):  # training is under way
            assert run.poll() is None, run.stderr.read()
        run.send_signal(sig)
        _, stderr = run.communicate(timeout=120)
        result = subprocess.CompletedProcess(run.args, run.returncode, "", stderr)
        assert_one_line_error(result, f"stopped by {sig.name} at step", "--resume")
        step = load(out / "ckpt.pt")["step"]
        assert f"at step {step}, saved to" in stderr
        again = subprocess.run([sys.executable, script, *map(str, flags), "--steps", str(step + 2), "--resume"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and f"resumed from {out / 'ckpt.pt'} at step {step}" in again.stdout, again.stderr
        assert load(out / "ckpt.pt")["step"] == step + 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_diverging_run_never_saves_nan_and_resumes_from_its_last_good_checkpoint(name, data, tmp_path):
    """--lr 1e39 (inf in float32) blows the weights up at once; with a checkpoint due every step (and the
    log, which also checks, only every 50) the checkpoint on disk stays the last finite one, the run
    stops with one line naming it, and --resume with a lower --lr (as that line advises) continues."""
    m = MODULES[name]
    m.train(config(name, tmp_path, data, steps=2))
    message = stops(m.train, config(name, tmp_path, data, steps=20, lr=1e39, ckpt_every=1, log_every=50, resume=True))
    kept = load(tmp_path / "ckpt.pt")
    assert "diverged by step 3" in message and "last good one (step 2)" in message and "--lr" in message, message
    assert kept["step"] == 2
    for key in SAVED[name][:1 + (name == "dcgan")]:  # the networks' weights and buffers
        assert all(torch.isfinite(v.float()).all() for v in kept[key].values()), key
    m.train(config(name, tmp_path, data, steps=kept["step"] + 2, lr=1e-4, resume=True))
    assert load(tmp_path / "ckpt.pt")["step"] == kept["step"] + 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(name, data, trained, tmp_path, monkeypatch):
    """A disk that fills up while a checkpoint is written (a patched torch.save that writes part of the
    file and fails as PyTorch does): one line with the free space, the previous ckpt.pt intact, no .tmp."""
    m = MODULES[name]
    import shutil
    shutil.copytree(trained / name, tmp_path / "run")
    save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", disk_full)
    message = stops(m.train, config(name, tmp_path / "run", data, steps=4, resume=True))
    assert "cannot write" in message and "MiB free" in message and "intact" in message, message
    monkeypatch.setattr(torch, "save", save)
    assert load(tmp_path / "run" / "ckpt.pt")["step"] == 2
    assert not (tmp_path / "run" / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_space_at_the_start_or_while_sampling_is_one_line(name, data, trained, tmp_path, monkeypatch):
    """An OSError anywhere else (ENOSPC while writing config.json or a PNG; a read-only folder) goes
    through run_main: one line, no traceback."""
    m = MODULES[name]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr(json, "dump", no_space)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--dataset", data, "--out", str(tmp_path / "r"), "--device", "cpu"])
    message = stops(m.run_main, m.main)
    assert "No space left on device" in message and "free some space" in message, message
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", no_space)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--sample", "--ckpt", str(trained / name / "ckpt.pt"),
                                      "--num-samples", "2", "--device", "cpu", "--out", str(tmp_path / "s")])
    assert "No space left on device" in stops(m.run_main, m.main)


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_tolerates_the_debris_of_a_killed_run(name, data, tmp_path):
    """A kill can leave a half-written grid newer than the checkpoint, a half-written ckpt.pt.tmp and a
    metrics.csv.tmp: --resume removes or overwrites them and never reads them as history."""
    m = MODULES[name]
    m.train(config(name, tmp_path, data, steps=4, sample_every=2))
    grid = (tmp_path / "samples" / "step_0000004.png").read_bytes()
    (tmp_path / "samples" / "step_0000006.png").write_bytes(grid[:300])  # killed while writing step 6's grid
    (tmp_path / "samples" / "step_0000002.png").write_bytes(grid[:300])  # a grid cut short (older than ckpt.pt)
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"PK half")
    (tmp_path / "metrics.csv.tmp").write_text("step,loss\n1,")
    m.train(config(name, tmp_path, data, steps=8, sample_every=2, resume=True))
    from PIL import Image
    for step in (4, 6, 8):  # rewritten, complete
        with Image.open(tmp_path / "samples" / f"step_{step:07d}.png") as image:
            image.load()
    assert Image.open(tmp_path / "progression.png").height == 3 * (2 + 16 + 2)  # the cut grid is skipped
    assert [r[0] for r in rows(tmp_path / "metrics.csv", [])] == [str(s) for s in range(1, 9)]
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_metrics_csv_is_never_left_shorter_than_its_history(trained, tmp_path, monkeypatch):
    """open_metrics (the shared plumbing block) rewrites metrics.csv through a temporary file: a kill
    during that rewrite (here: at the rename) leaves the old file whole, and a resume keeps the rows
    up to the checkpoint's step."""
    import shutil
    import vae
    shutil.copytree(trained / "vae", tmp_path / "run")
    path = str(tmp_path / "run" / "metrics.csv")
    before = open(path).read()

    def killed(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            vae.open_metrics(path, 1, ["step", "loss"])
    assert open(path).read() == before
    vae.open_metrics(path, 1, before.splitlines()[0].split(",")).close()
    assert [r[0] for r in rows(path, [])] == ["1"]


# --------------------------------------------------------------------------------------------
# Checkpoints: never another run's files, never a traceback, old versions still sample
# --------------------------------------------------------------------------------------------
def old_format(name, state):
    """A checkpoint as the previous version of `name` wrote it: no "script" entry (nor "log_sums"), and
    for vaegan one Adam per network under "optimizers"."""
    old = {k: v for k, v in state.items() if k not in ("script", "log_sums")}
    if name == "vaegan":
        optimizer = old.pop("optimizer")
        old["optimizers"] = {n: optimizer for n in ("encoder", "decoder", "discriminator")}
    return old


def foreign_checkpoints(folder, trained, name):
    """Files a user might pass as --ckpt that this script cannot use, and a word its refusal must say."""
    other = {"dcgan": "vae", "vae": "vaegan", "vaegan": "dcgan"}[name]
    state = load(trained / other / "ckpt.pt")
    files = {"empty.pt": (b"", "empty (0 bytes)"), "junk.pt": (b"not a checkpoint", "cannot read checkpoint"),
             "other.pt": (state, f"written by {other}.py"), "old.pt": (old_format(other, state), f"written by {other}.py"),
             "weights.pt": (state[SAVED[other][0]], "bare state_dict"), "tensor.pt": (torch.zeros(3), "Tensor"),
             "list.pt": ([1, 2], "list"), "dict.pt": ({"step": 3}, "keys step")}
    for file, (content, _) in files.items():
        if isinstance(content, bytes):
            (folder / file).write_bytes(content)
        else:
            torch.save(content, folder / file)
    return {folder / file: words for file, (_, words) in files.items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoints_that_are_not_this_scripts_are_refused_in_one_line(name, trained, tmp_path):
    """Zero-byte, junk, another script's (new or old format), a bare state_dict, a tensor, a list: the
    refusal names what the file is (and which script to use), for --sample and for --resume alike; the
    other run's folder is left as it was."""
    files = foreign_checkpoints(tmp_path, trained, name)
    for path, words in files.items():
        for flags in (["--sample", "--ckpt", path], ["--resume", "--ckpt", path, "--dataset", "x.npy"]):
            message = cli(name, *flags)
            assert words in message and str(path) in message, (flags, message)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in files)  # nothing written there, nothing removed


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoints_of_the_previous_version_still_sample(name, trained, tmp_path):
    """Checkpoints written before this version (no "script" entry; vaegan: three optimisers) sample as
    before, into their own folder; resuming them is refused in one line, not a KeyError."""
    (tmp_path / "old").mkdir()
    torch.save(old_format(name, load(trained / name / "ckpt.pt")), tmp_path / "old" / "ckpt.pt")
    m = MODULES[name]
    m.main(m.parse_args(["--sample", "--ckpt", str(tmp_path / "old" / "ckpt.pt"), "--num-samples", "3", "--device", "cpu"]))
    assert sorted(os.listdir(tmp_path / "old" / "generated")) == ["000000.png", "000001.png", "000002.png"]
    if name == "vaegan":
        message = cli(name, "--resume", "--ckpt", tmp_path / "old" / "ckpt.pt", "--dataset", "x.npy")
        assert "cannot be resumed" in message and "--sample still reads it" in message


@pytest.mark.parametrize("name", SCRIPTS)
def test_sample_into_a_new_folder(name, trained, tmp_path):
    """--sample --out NEW/DEEPER: the folder is made before anything is written into it (grid included)."""
    m = MODULES[name]
    for extra in ([], ["--reconstruct"]) if name != "dcgan" else ([],):
        out = tmp_path / f"new{len(extra)}" / "deeper"
        m.main(m.parse_args(["--sample", *extra, "--ckpt", str(trained / name / "ckpt.pt"), "--num-samples", "3",
                             "--device", "cpu", "--out", str(out)]))
        kind = "reconstructed" if extra else "generated"
        assert len(os.listdir(out / kind)) == 3 and (out / f"{kind}_grid.png").is_file()


# --------------------------------------------------------------------------------------------
# Bad flags and bad files: one line each
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_is_range_checked(name):
    """Every int and float flag (except --seed) has a range in RANGES; a value outside it, NaN or inf
    stops with one line naming the flag, before anything runs."""
    m = MODULES[name]
    numeric = {f.name for f in m.dataclasses.fields(m.Config) if f.type in (int, float)} - {"seed"}
    assert numeric == set(m.RANGES), numeric ^ set(m.RANGES)
    bad = {">0": ["0", "-1"], ">=0": ["-1"], ">=1": ["0", "-3"], "[0,1)": ["1", "-0.1"]}
    for field, rule in m.RANGES.items():
        flag = "--" + field.replace("_", "-")
        for value in bad[rule] + ["nan", "inf", "-inf"]:
            message = cli(name, flag, value)
            assert flag in message, (flag, value, message)


@pytest.mark.parametrize("name", SCRIPTS)
def test_npy_files_follow_the_pixel_rule_and_bad_ones_are_one_line(name, tmp_path):
    """Integers of any dtype are pixels 0..255; floats are [0, 1] (or [-1, 1] if any value is negative);
    anything else, and arrays that are not images, stop with one line."""
    m = MODULES[name]
    pixels = np.random.default_rng(1).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    expected = torch.as_tensor(pixels).float()[:, None] / 127.5 - 1
    for kind, array in (("uint8", pixels), ("int64", pixels.astype(np.int64)), ("unit", pixels / 255.0),
                        ("signed", pixels.astype(np.float32) / 127.5 - 1)):
        np.save(tmp_path / f"{kind}.npy", array)
        x, labels = m.get_data(m.Config(dataset=str(tmp_path / f"{kind}.npy")))
        assert torch.allclose(x, expected, atol=1e-6) and labels is None, kind
    cases = {"float255": (pixels.astype(np.float64), "[0, 1] or [-1, 1]"), "int300": (pixels.astype(np.int64) + 100, "[0, 255]"),
             "0d": (np.array(3, dtype=np.uint8), "shape ()"), "1d": (pixels[0, 0], "shape (8,)"),
             "5d": (pixels[None, :, None], "shape (1, 4, 1, 8, 8)"), "words": (np.array(["a", "b"]), "cannot read"),
             "objects": (np.array([{}, None], dtype=object), "cannot read")}
    for kind, (array, words) in cases.items():
        np.save(tmp_path / f"{kind}.npy", array, allow_pickle=True)
        assert words in stops(m.get_data, m.Config(dataset=str(tmp_path / f"{kind}.npy"))), kind
    (tmp_path / "junk.npy").write_bytes(b"junk")
    assert "cannot read" in stops(m.get_data, m.Config(dataset=str(tmp_path / "junk.npy")))


def test_an_image_folder_is_read_one_file_at_a_time(tmp_path):
    """A folder of more images than the process may hold open files (ulimit -n) still loads."""
    import resource

    import dcgan
    from PIL import Image
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to count open files")
    for i in range(60):
        Image.fromarray(np.full((8, 8), 4 * i, dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 30, hard))
    try:
        x, _ = dcgan.get_data(dcgan.Config(dataset=str(tmp_path)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert x.shape == (60, 1, 8, 8)


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_reaches_the_terminal_as_one_line(name, tmp_path):
    """The same checks as a user meets them: one line on stderr, no traceback."""
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_one_line_error(subprocess.run([sys.executable, f"{name}.py", "--sample", "--ckpt", str(tmp_path / "empty.pt"),
                                          "--lr", "inf"], cwd=ROOT, capture_output=True, text=True, timeout=120),
                          "--lr", "finite")
    assert_one_line_error(subprocess.run([sys.executable, f"{name}.py", "--sample", "--ckpt", str(tmp_path / "empty.pt")],
                                         cwd=ROOT, capture_output=True, text=True, timeout=120), "empty (0 bytes)")


# --------------------------------------------------------------------------------------------
# Long waits print progress; nothing float64 goes to an accelerator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_sampling_prints_progress_that_ends_at_100_percent(name, trained, capsys, monkeypatch):
    """With PROGRESS_EVERY=0 every batch prints a line (in a log file: one every 10 s); the last says 100%."""
    m = MODULES[name]
    monkeypatch.setattr(m.Progress, "EVERY", 0)
    model, cfg, shape, _ = m.load_for_sampling(m.Config(ckpt=str(trained / name / "ckpt.pt"), batch_size=8))
    cpu = torch.device("cpu")
    capsys.readouterr()
    images = m.generate(model, cfg, 20, shape, cpu, torch.Generator().manual_seed(0))
    lines = capsys.readouterr().out.splitlines()
    assert images.shape[0] == 20 and [line.split(" img")[0] for line in lines] == \
        ["sampling: 8/20", "sampling: 16/20", "sampling: 20/20"], lines
    assert "(100%)" in lines[-1] and "done in" in lines[-1]
    if name != "dcgan":  # reconstructions, and vae's test −ELBO
        m.reconstruct(model, cfg, images, cpu)
        assert capsys.readouterr().out.splitlines()[-1].startswith("reconstructing: 20/20 img (100%)")
    if name == "vae":
        m.evaluate(model, images, cpu, 8, 0)
        assert capsys.readouterr().out.splitlines()[-1].startswith("test −ELBO: 20/20 img (100%)")


class OnDevice(torch.Tensor):
    """A stand-in for a tensor on an Apple GPU (MPS has no float64): every result computed from it stays
    "on the device" until .cpu(), and a float64 result there fails, as it would on MPS."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu:
            return result.as_subclass(torch.Tensor)
        if isinstance(result, OnDevice) and result.dtype == torch.float64:
            raise AssertionError(f"float64 on the device (MPS cannot): {func}")
        return result


def test_nothing_float64_is_computed_on_the_device(trained):
    """The quality check's statistics (dcgan) and the test −ELBO's sums (vae) are float64: they must be
    computed on the host, after .cpu(), never on the device (where MPS would fail)."""
    import dcgan
    import vae
    images = (torch.rand(12, 1, 16, 16) * 2 - 1).as_subclass(OnDevice)
    assert isinstance(images * 2, OnDevice)  # the stand-in is catching what it should
    with pytest.raises(AssertionError, match="float64 on the device"):
        images.double()
    mu, sigma = dcgan.feature_stats(dcgan.feature_net(1), images, torch.device("cpu"))
    assert mu.dtype == sigma.dtype == torch.float64 and type(mu) is torch.Tensor
    model, cfg, _, _ = vae.load_for_sampling(vae.Config(ckpt=str(trained / "vae" / "ckpt.pt")))
    result = vae.evaluate(model, images.expand(-1, 3, -1, -1).as_subclass(OnDevice), torch.device("cpu"), 8, 0)
    assert math.isfinite(result["neg_elbo"])
