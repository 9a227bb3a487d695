"""The guarantees every training script makes (ddpm.py, ddim.py, dcgan.py, vae.py, vaegan.py), from the shared
`flags`, `data` and `plumbing` blocks: nothing lost (--resume bit for bit, Ctrl-C and SIGTERM, divergence, a full
disk, a kill while metrics.csv is rewritten), checkpoints that cannot run code, one line and never a traceback
for what a user gets wrong, images read right, samples where they belong, and nothing float64 on a device.

Most tests call a script in-process (main(parse_args([...])), whose every refusal is sys.exit(one line)): an
interpreter start costs seconds. A few run a script as a user does, where a real signal or stderr matters."""
import csv
import errno
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import ROOT, assert_one_line_error

SCRIPTS = ("ddpm", "ddim", "dcgan", "vae", "vaegan")
DIFFUSION = ("ddpm", "ddim")
M = {name: importlib.import_module(name) for name in SCRIPTS}
LOG_LINE = {name: M[name].log_line for name in SCRIPTS}
UNET = "--channels 8 --channel-mult 1,2 --num-res-blocks 1 --attn-res none --timesteps 10 --dropout 0 --warmup 1"
TINY = {name: flags.split() + ["--batch-size", "4", "--device", "cpu"] for name, flags in {
    "ddpm": UNET, "ddim": UNET + " --sample-steps 5",
    "dcgan": "--g-channels 8 --d-channels 8 --check-every 4 --check-n 16",
    "vae": "--channels 8 --latent 8 --likelihood gaussian",  # σ is learned: it must resume too
    "vaegan": "--channels 8 --d-channels 8 --latent 8"}.items()}
OTHER = {"ddpm": "dcgan", "ddim": "vae", "dcgan": "vaegan", "vae": "dcgan", "vaegan": "ddpm"}  # a script it can't read


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def flags(name, data, out=None, *more):
    """A tiny run of `name` on `data` into `out` (None: no --out), with `more` flags."""
    return [*TINY[name], "--dataset", str(data), *(["--out", str(out)] if out else []), *map(str, more)]


def run(name, *args):
    """The script's main() on a command line, in-process."""
    M[name].main(M[name].parse_args([str(a) for a in args]))


def stops(fn, *args) -> str:
    """fn(*args) must end in sys.exit with a message of one line: that message."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = e.value.code
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message, message
    return message


def fails(name, *args) -> str:
    """`name` on this command line stops with one line that starts with the script's name."""
    message = stops(run, name, *args)
    assert message.startswith(f"{name}: "), message
    return message


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="ckpt"):
    """Two checkpoint entries (state_dicts, optimiser states, random states, lists) equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_checkpoint(a, b):
    """Everything a checkpoint holds (weights, EMA, optimisers, every random state, the step, dcgan's checks)
    but the flags it was run with (--resume differs)."""
    a, b = load(a), load(b)
    assert a.keys() == b.keys() and {"rng_cpu", "step"} <= a.keys()
    for key in a.keys() - {"config"}:
        assert_same(a[key], b[key], key)


def metrics(path):
    """metrics.csv's rows without the clock's columns (images_per_s, elapsed_s)."""
    rows = list(csv.reader(open(path)))
    assert rows[0][-2:] == ["images_per_s", "elapsed_s"], rows[0]
    return [row[:-2] for row in rows]


def steps_logged(path):
    return [int(row[0]) for row in metrics(path)[1:]]


def tiny_npy_of(out):
    """The dataset a run was trained on (its config.json)."""
    return json.load(open(out / "config.json"))["dataset"]


def snapshot(folder):
    """Every file under folder: its bytes and its modification time."""
    return {os.path.relpath(os.path.join(d, f), folder): (open(os.path.join(d, f), "rb").read(),
                                                         os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def after_log_line(monkeypatch, name, action):
    """Run action(step) right after each log line (and its metrics.csv row) of `name` (instead of an earlier one)."""
    log_line = LOG_LINE[name]

    def wrapped(run, step, cfg, **values):
        log_line(run, step, cfg, **values)
        action(step)
    monkeypatch.setattr(M[name], "log_line", wrapped)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the subprocesses get (OMP_NUM_THREADS=1): their weights then equal in-process ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 random 16x16 RGB images, a uint8 .npy (N, H, W, C), for the module's shared runs."""
    path = tmp_path_factory.mktemp("data") / "sprites.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished 2-step run of each script, logged every step: tests read it, or copy it to change it."""
    out = tmp_path_factory.mktemp("trained")
    for name in SCRIPTS:
        run(name, *flags(name, data, out / name, "--steps", 2, "--log-every", 1))
    return out


def copy_run(trained, name, to):
    shutil.copytree(trained / name, to)
    return to


# --------------------------------------------------------------------------------------------
# 1, 2. --resume continues bit for bit; Ctrl-C and SIGTERM save where they stop
# --------------------------------------------------------------------------------------------
STOP_BY = {"ddpm": signal.SIGINT, "ddim": signal.SIGTERM, "dcgan": signal.SIGINT, "vae": signal.SIGTERM,
           "vaegan": signal.SIGINT}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_kill_then_a_signal_then_resume_match_an_uninterrupted_run(name, tiny_npy, tmp_path, monkeypatch):
    """Six steps in one go (a) against (b): killed just after step 3's log row (its checkpoint is step 2's),
    resumed and stopped by a real SIGINT or SIGTERM, resumed again. b's checkpoint holds what a's does, bit
    for bit (weights, EMA, optimisers, every random state), and its metrics.csv the same rows, once each."""
    a, b, common = tmp_path / "a", tmp_path / "b", ["--steps", 6, "--log-every", 1]
    common += ["--dropout", 0.1] if name in DIFFUSION else []  # (dropout draws from the global generator)
    run(name, *flags(name, tiny_npy, a, *common))

    def killed(step):  # a stand-in for kill -9: after step 3's row, before any checkpoint of step 3
        if step == 3:
            raise KeyboardInterrupt
    after_log_line(monkeypatch, name, killed)
    with pytest.raises(KeyboardInterrupt):
        run(name, *flags(name, tiny_npy, b, *common, "--ckpt-every", 2))
    assert load(b / "ckpt.pt")["step"] == 2 and steps_logged(b / "metrics.csv") == [1, 2, 3]

    sig = STOP_BY[name]
    after_log_line(monkeypatch, name, lambda step: step == 4 and os.kill(os.getpid(), sig))  # as from a terminal
    message = fails(name, *flags(name, tiny_npy, b, *common, "--resume"))
    stopped = load(b / "ckpt.pt")["step"]
    assert stopped in (4, 5), stopped  # where it stopped, not at a --ckpt-every step (the default: thousands)
    assert f"stopped by {sig.name} at step {stopped}, saved to {b}/ckpt.pt" in message and "--resume" in message
    assert steps_logged(b / "metrics.csv") == list(range(1, stopped + 1))  # step 3's first row is gone

    monkeypatch.undo()
    run(name, *flags(name, tiny_npy, b, *common, "--resume"))
    assert_same_checkpoint(a / "ckpt.pt", b / "ckpt.pt")
    assert metrics(b / "metrics.csv") == metrics(a / "metrics.csv")  # every loss, each step once
    if name == "dcgan":  # the checks at steps 4 and 6, and the best generator
        assert open(b / "quality.csv").read() == open(a / "quality.csv").read()
        assert_same_checkpoint(a / "best.pt", b / "best.pt")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_kill_while_resume_rewrites_metrics_csv_loses_nothing(name, trained, tmp_path, monkeypatch):
    """--resume drops metrics.csv's rows after the checkpoint's step through a temporary file and a rename: a
    kill at the rename leaves the old file whole; the next --resume drops the row and logs the step again."""
    out = copy_run(trained, name, tmp_path / "run")
    with open(out / "metrics.csv", "a") as f:
        f.write("3,123,0,0,0,0,0,0,0,0\n")  # logged after the checkpoint (step 2), before a kill
    before = (out / "metrics.csv").read_bytes()
    replace = os.replace

    def killed_at_the_rename(src, dst):
        if str(dst).endswith("metrics.csv"):
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        run(name, *flags(name, tiny_npy_of(out), out, "--steps", 3, "--log-every", 1, "--resume"))
    assert (out / "metrics.csv").read_bytes() == before
    monkeypatch.undo()
    run(name, *flags(name, tiny_npy_of(out), out, "--steps", 3, "--log-every", 1, "--resume"))
    rows = metrics(out / "metrics.csv")
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3] and rows[:3] == metrics(trained / name / "metrics.csv")
    assert rows[3][1] != "123"


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_second_ctrl_c_stops_at_once_and_claims_no_checkpoint(name, tiny_npy, tmp_path, monkeypatch):
    """The first Ctrl-C asks for a save at the end of the step; a second one, before that, is Python's
    KeyboardInterrupt: one line, "interrupted", which promises no checkpoint (and none was written)."""
    def ctrl_c_twice(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    after_log_line(monkeypatch, name, ctrl_c_twice)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags(name, tiny_npy, tmp_path / "run", "--steps", 6,
                                                             "--log-every", 1)])
    assert stops(M[name].run_main, M[name].main) == f"{name}: interrupted"
    assert not (tmp_path / "run" / "ckpt.pt").exists() and steps_logged(tmp_path / "run" / "metrics.csv") == [1, 2]


def start(script, *args):
    """A script as a user starts it; returns once it has printed its first log line."""
    proc = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step"):
            return proc
    pytest.fail(f"{script} ended before its first log line: {proc.communicate()[1]}")


@pytest.mark.parametrize("name,sig", [("ddpm", signal.SIGINT), ("vae", signal.SIGTERM)])
def test_a_real_signal_saves_where_it_stops_in_one_line_and_resume_matches(name, sig, tiny_npy, tmp_path):
    """A signal from outside, at whatever step the run is: one line on stderr (no traceback) naming the step
    and --resume; the checkpoint holds that step; resumed two steps further, the run equals one that never
    stopped, weights and log alike."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    proc = start(f"{name}.py", *flags(name, tiny_npy, stopped, "--steps", 100_000, "--log-every", 1))
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=120)[1]
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    step = load(stopped / "ckpt.pt")["step"]
    assert_one_line_error(result, f"stopped by {sig.name} at step {step}, saved to {stopped}/ckpt.pt", "--resume")
    run(name, *flags(name, tiny_npy, stopped, "--steps", step + 2, "--log-every", 1, "--resume"))
    run(name, *flags(name, tiny_npy, straight, "--steps", step + 2, "--log-every", 1))
    assert_same_checkpoint(straight / "ckpt.pt", stopped / "ckpt.pt")
    assert metrics(stopped / "metrics.csv") == metrics(straight / "metrics.csv")


# --------------------------------------------------------------------------------------------
# 3. Only finite weights are saved; the line says what is left
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_diverging_run_keeps_its_last_finite_checkpoint_and_says_what_is_left(name, trained, tiny_npy, tmp_path,
                                                                                monkeypatch):
    """--lr 1e39 (inf in float32) from the start: "no checkpoint was written". A run that saved step 3 and
    then went NaN: ckpt.pt holds step 3, "continue with --resume and a lower --lr". Resumed from it and
    diverged again before saving another (a finite checkpoint that does not train): start anew with --out
    NEW_FOLDER, not the same advice again. The checkpoint on disk stays step 3's, finite, untouched; and
    --resume with a lower --lr trains with that --lr (an optimiser's saved one does not come back)."""
    message = fails(name, *flags(name, tiny_npy, tmp_path / "new", "--steps", 20, "--lr", 1e39, "--ckpt-every", 1,
                                 "--log-every", 1))
    assert "diverged by step" in message and "no checkpoint was written" in message and "--resume" not in message
    assert not (tmp_path / "new" / "ckpt.pt").exists() and not (tmp_path / "new" / "ckpt.pt.tmp").exists()

    out = copy_run(trained, name, tmp_path / "run")  # a good checkpoint at step 2
    poisoned, adam_step = {"on": False}, torch.optim.Adam.step

    def step_then_nan(self, *args, **kwargs):  # an update that blows up every weight
        result = adam_step(self, *args, **kwargs)
        if poisoned["on"]:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_nan)
    after_log_line(monkeypatch, name, lambda step: poisoned.update(on=step >= 3))  # from step 4's update on
    resume = flags(name, tiny_npy, out, "--steps", 20, "--ckpt-every", 1, "--log-every", 1, "--resume")
    message = fails(name, *resume)
    assert "diverged by step 4" in message and f"{out}/ckpt.pt holds step 3: continue with --resume and a lower " \
                                                 "--lr" in message, message
    kept = (out / "ckpt.pt").read_bytes()
    state = load(out / "ckpt.pt")
    assert state["step"] == 3 and not (out / "ckpt.pt.tmp").exists()
    floats = [w for v in state.values() if isinstance(v, dict) for w in v.values()
              if torch.is_tensor(w) and w.is_floating_point()]
    assert floats and all(w.isfinite().all() for w in floats)

    monkeypatch.undo()
    message = fails(name, *resume, "--lr", 1e39)  # as advised, --resume (with a "lower" --lr that still diverges)
    assert "diverged by step 4" in message and "--out NEW_FOLDER" in message and f"{out}/ckpt.pt" in message
    assert "continue with --resume" not in message, message
    assert (out / "ckpt.pt").read_bytes() == kept

    run(name, *flags(name, tiny_npy, out, "--steps", 4, "--lr", 1e-5, "--resume"))  # this --lr, not the saved one
    state = load(out / "ckpt.pt")
    lrs = [g["lr"] for key in state if key.startswith("optimizer") for g in state[key]["param_groups"]]
    assert state["step"] == 4 and lrs and all(lr == pytest.approx(1e-5) for lr in lrs), lrs


# --------------------------------------------------------------------------------------------
# 4. Checkpoints are loaded with weights_only: a malicious pickle runs nothing
# --------------------------------------------------------------------------------------------
class Payload:
    """Unpickled by a plain torch.load (weights_only=False), this makes a folder: code from a stranger."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_malicious_checkpoint_is_refused_in_one_line_and_runs_nothing(name, tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil" / "ckpt.pt"
    evil.parent.mkdir()
    torch.save({"script": name, "step": 1, "config": {}, "model": Payload(str(marker))}, evil)
    for args in (["--sample", "--ckpt", evil], ["--resume", "--ckpt", evil, *flags(name, "x.npy", tmp_path / "o")]):
        message = fails(name, *args, "--device", "cpu")
        assert f"cannot read checkpoint {evil}" in message and "UnpicklingError" in message, message
        assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: a plain load runs it
    assert marker.is_dir()


# --------------------------------------------------------------------------------------------
# 5. One clear line, never a traceback
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoints_it_cannot_use_are_one_line_for_sample_and_resume(name, trained, tmp_path):
    """Missing, zero-byte, junk, another script's (the line names that script), a bare state_dict, a dict with
    the right "script" but no weights; --resume into a folder with no checkpoint; a run folder with a ckpt.pt
    trained again without --resume. Nothing is written where the files are."""
    other = load(trained / OTHER[name] / "ckpt.pt")
    mine = load(trained / name / "ckpt.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.pt").write_bytes(b"")
    (bad / "junk.pt").write_bytes(b"this is not a checkpoint")
    torch.save(other, bad / "other.pt")
    torch.save(next(v for v in mine.values() if isinstance(v, dict) and v and all(map(torch.is_tensor, v.values()))),
               bad / "bare.pt")
    torch.save({"script": name}, bad / "named.pt")
    cases = {"missing.pt": "does not exist", "empty.pt": "is empty (0 bytes)", "junk.pt": "cannot read checkpoint",
             "other.pt": f"is not a checkpoint that {name}.py can use: {OTHER[name]}.py wrote it",
             "bare.pt": f"is not a checkpoint that {name}.py can use: it lacks", "named.pt": "it lacks"}
    before = snapshot(bad)
    for file, words in cases.items():
        path = bad / file
        for args in (["--sample", "--ckpt", path], ["--resume", "--ckpt", path, *flags(name, "x.npy", tmp_path / "o")]):
            message = fails(name, *args, "--device", "cpu")
            assert words in message and str(path) in message, (args, message)
    assert snapshot(bad) == before and not (tmp_path / "o").exists()

    (tmp_path / "empty").mkdir()
    message = fails(name, *flags(name, "x.npy", tmp_path / "empty", "--resume"))
    assert f"{tmp_path / 'empty' / 'ckpt.pt'} does not exist" in message

    out = copy_run(trained, name, tmp_path / "run")
    before = snapshot(out)
    message = fails(name, *flags(name, "x.npy", out))  # without --resume
    assert f"{out}/ckpt.pt exists; pass --resume" in message and "--out NEW_FOLDER" in message
    assert snapshot(out) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_full_disk_at_the_first_and_at_a_later_checkpoint(name, tiny_npy, tmp_path, monkeypatch):
    """torch.save fails as a full disk makes it (ENOSPC; or PyTorch's RuntimeError) after writing part of the
    file: one line; no half-written file is left. At the first checkpoint it says none was written (nothing
    is intact); at a later one, that ckpt.pt still holds the earlier step and --resume continues it."""
    save = torch.save

    def full_disk_from(step, error):
        def fake(obj, path, *args, **kwargs):
            if obj["step"] < step:
                return save(obj, path, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise error
        return fake
    first, later = tmp_path / "first", tmp_path / "later"
    monkeypatch.setattr(torch, "save", full_disk_from(1, OSError(errno.ENOSPC, "No space left on device")))
    message = fails(name, *flags(name, tiny_npy, first, "--steps", 5, "--ckpt-every", 1, "--log-every", 1))
    assert f"cannot write {first}/ckpt.pt (" in message and "No space left on device" in message, message
    assert "no checkpoint was written" in message and "intact" not in message and "holds" not in message
    assert not {"ckpt.pt", "ckpt.pt.tmp"} & set(os.listdir(first))

    monkeypatch.setattr(torch, "save", full_disk_from(2, RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3")))
    message = fails(name, *flags(name, tiny_npy, later, "--steps", 5, "--ckpt-every", 1, "--log-every", 1))
    assert "cannot write" in message and "ckpt.pt holds step 1" in message and "--resume" in message, message
    assert "no checkpoint was written" not in message
    assert load(later / "ckpt.pt")["step"] == 1 and not (later / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_unusable_out_folder_or_a_full_disk_elsewhere_is_one_line(name, tiny_npy, tmp_path, monkeypatch):
    """run_main turns what a user's machine throws (OSError) into one line naming the file."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags(name, tiny_npy, tmp_path / "a_file" / "run", "--steps", 1)])
    message = stops(M[name].run_main, M[name].main)
    assert message.startswith(f"{name}: ") and str(tmp_path / "a_file" / "run") in message, message

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.json"))
    monkeypatch.setattr(json, "dump", no_space)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags(name, tiny_npy, tmp_path / "run", "--steps", 1)])
    assert stops(M[name].run_main, M[name].main) == \
        f"{name}: No space left on device: {tmp_path / 'run' / 'config.json'}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_read_only_out_folder_is_one_line(name, tiny_npy, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *flags(name, tiny_npy, locked / "run", "--steps", 1)])
        assert stops(M[name].run_main, M[name].main).startswith(f"{name}: Permission denied: {locked / 'run'}")
    finally:
        locked.chmod(0o700)


BAD_FLAGS = [(["--lr", "abc"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
             (["--steps", "0"], "--steps"), (["--steps", "1.5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
             (["--log-every", "-3"], "--log-every"), (["--seed", "-1"], "--seed"), (["--device", "tpu"], "--device"),
             (["--precision", "fp8"], "--precision"), (["--recipe", "no-such-recipe"], "--recipe"),
             (["--image-size", "nan"], "--image-size")]
BAD_FLAGS_OF = {
    "ddpm": [(["--dropout", "1.5"], "--dropout"), (["--ema-decay", "2"], "--ema-decay"), (["--label", "-2"], "--label"),
             (["--timesteps", "0"], "--timesteps"), (["--schedule", "quadratic"], "--schedule"),
             (["--guidance", "nan"], "--guidance"), (["--warmup", "-1"], "--warmup")],
    "ddim": [(["--eta", "1.5"], "--eta"), (["--sample-steps", "0"], "--sample-steps"), (["--skip", "random"], "--skip"),
             (["--p-uncond", "1.1"], "--p-uncond"), (["--grad-clip", "-1"], "--grad-clip")],
    "dcgan": [(["--beta1", "1.5"], "--beta1"), (["--beta1", "1"], "--beta1"), (["--check-n", "0"], "--check-n"),
              (["--check", "is"], "--check"), (["--latent", "0"], "--latent")],
    "vae": [(["--sigma", "0"], "--sigma"), (["--likelihood", "poisson"], "--likelihood"),
            (["--latent", "0"], "--latent"), (["--beta", "-1"], "--beta")],
    "vaegan": [(["--beta1", "2"], "--beta1"), (["--feature-sigma", "0"], "--feature-sigma"),
               (["--d-channels", "0"], "--d-channels"), (["--gamma", "-1"], "--gamma")]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_bad_flag_value_is_one_line_naming_the_flag_before_anything_runs(name, tmp_path):
    for args, flag in BAD_FLAGS + BAD_FLAGS_OF[name]:  # (the data does not exist: a run would say so instead)
        message = fails(name, *args, "--dataset", tmp_path / "none.npy", "--out", tmp_path / "out")
        assert flag in message and "--dataset" not in message, (args, message)
    assert not (tmp_path / "out").exists()


def test_a_bad_flag_reaches_the_terminal_as_one_line():
    assert_one_line_error(subprocess.run([sys.executable, "vaegan.py", "--lr", "nan"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}),
                          "vaegan: ", "--lr", "nan")


@pytest.mark.parametrize("name", SCRIPTS)
def test_data_missing_offline_names_the_files_and_the_folder(name, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror("no network in this test")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    m = M[name]
    message = stops(m.get_data, m.Config(dataset="mnist", data_root=str(tmp_path)))
    assert "cannot download mnist" in message and "train-images-idx3-ubyte and train-labels-idx1-ubyte" in message
    assert f"in {tmp_path / 'MNIST' / 'raw'} and run again" in message, message
    if name == "ddpm":
        message = stops(m.get_data, m.Config(dataset="cifar10", data_root=str(tmp_path)))
        assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_npy_of_bad_dtype_range_or_shape_is_one_line(name, tmp_path):
    pixels = np.zeros((4, 8, 8), np.uint8)
    cases = {"above_one": np.full((4, 8, 8), 2.0), "negative": np.full((4, 8, 8), -0.5, np.float32),
             "nan": np.full((4, 8, 8), np.nan, np.float32), "int64": pixels.astype(np.int64),
             "text": np.array(["a", "b"]), "1d": pixels[0, 0], "2d": pixels[0], "5d": pixels[None, :, None],
             "empty": np.zeros((0, 8, 8), np.float32), "one_image": pixels[:1],
             "two_channels": np.zeros((4, 8, 8, 2), np.uint8)}
    for kind, array in cases.items():
        np.save(tmp_path / f"{kind}.npy", array)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    np.save(tmp_path / "objects.npy", np.array([{}, None], dtype=object), allow_pickle=True)
    for kind in [*cases, "junk", "objects"]:
        path = tmp_path / f"{kind}.npy"
        message = stops(M[name].get_data, M[name].Config(dataset=str(path)))
        assert str(path) in message and ("must hold" in message or "cannot read" in message), (kind, message)


@pytest.mark.parametrize("name", DIFFUSION)
def test_labels_of_the_wrong_length_or_kind_and_class_cond_without_labels_are_one_line(name, tiny_npy, tmp_path):
    m = M[name]
    np.save(tmp_path / "short.npy", np.arange(47) % 3)
    np.save(tmp_path / "floats.npy", np.linspace(0, 1, 48))
    assert "a label for each" in stops(m.get_data, m.Config(dataset=tiny_npy, labels=str(tmp_path / "short.npy")))
    assert "must hold integers" in stops(m.get_data, m.Config(dataset=tiny_npy, labels=str(tmp_path / "floats.npy")))
    message = fails(name, *flags(name, tiny_npy, tmp_path / "run", "--class-cond"))
    assert "--class-cond needs labels" in message


# --------------------------------------------------------------------------------------------
# 7. The U-Net's shape flags (ddpm.py, ddim.py)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIFFUSION)
def test_unet_widths_and_multipliers_that_cannot_work_are_one_line(name, tiny_npy, tmp_path):
    for channels in (1, 3, 5, 7, 2):
        message = fails(name, *flags(name, tiny_npy, tmp_path / "run", "--channels", channels))
        assert "--channels" in message and f"got {channels}," in message and "diverged" not in message, message
    for mult in ("1,1,1,1,1,1", "1,x", "0"):  # five halvings of 16 px; not numbers >= 1
        message = fails(name, *flags(name, tiny_npy, tmp_path / "run", "--channel-mult", mult))
        assert "--channel-mult" in message and mult in message, message
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# --------------------------------------------------------------------------------------------
# 6. --resume --ckpt A/ckpt.pt --out B reads A and writes B
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_from_one_folder_into_another_leaves_the_first_untouched(name, trained, tmp_path):
    a, b = copy_run(trained, name, tmp_path / "a"), tmp_path / "b"
    before = snapshot(a)
    data = tiny_npy_of(a)
    run(name, *flags(name, data, b, "--steps", 3, "--log-every", 1, "--resume", "--ckpt", a / "ckpt.pt"))
    assert snapshot(a) == before
    assert load(b / "ckpt.pt")["step"] == 3 and steps_logged(b / "metrics.csv") == [3]
    run(name, *flags(name, data, None, "--steps", 3, "--log-every", 1, "--resume", "--ckpt", a / "ckpt.pt"))
    assert load(a / "ckpt.pt")["step"] == 3 and steps_logged(a / "metrics.csv") == [1, 2, 3]
    assert_same_checkpoint(a / "ckpt.pt", b / "ckpt.pt")


# --------------------------------------------------------------------------------------------
# 8. Data: images read with the right values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_image_folders_are_read_right(name, tmp_path):
    from PIL import Image
    m = M[name]
    deep = tmp_path / "deep"
    deep.mkdir()
    for i, value in enumerate((0, 30000, 65535)):  # 16-bit grey: scaled to 8 bits, not clipped to white
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(deep / f"{i}.png")
    assert Image.open(deep / "1.png").mode.startswith("I")
    x, labels = m.get_data(m.Config(dataset=str(deep)))
    expected = torch.tensor([0, 30000 // 257, 255]).float() / 127.5 - 1  # 30000 -> 116, dark grey
    assert x.shape == (3, 1, 4, 4) and labels is None and torch.equal(x[:, 0, 0, 0], expected), x[:, 0, 0, 0]

    classes = tmp_path / "classes"
    for cls in ("zebra", "apple", "mango"):  # made out of order; read sorted: 0, 1, 2
        (classes / cls).mkdir(parents=True)
    for cls, level in (("zebra", 200), ("apple", 10), ("mango", 100), ("apple", 11)):
        Image.fromarray(np.full((4, 4), level, np.uint8)).save(classes / cls / f"{level}.png")
    x, labels = m.get_data(m.Config(dataset=str(classes)))
    got = sorted(zip(labels.tolist(), ((x[:, 0, 0, 0] + 1) * 127.5).round().int().tolist()))
    assert got == [(0, 10), (0, 11), (1, 100), (2, 200)]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.full((4, 4), 60, np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.full((4, 4, 3), (255, 0, 30), np.uint8)).save(mixed / "b.png")
    x, _ = m.get_data(m.Config(dataset=str(mixed)))
    assert x.shape == (2, 3, 4, 4)
    assert ((x[:, :, 0, 0] + 1) * 127.5).round().int().tolist() == [[60, 60, 60], [255, 0, 30]]


@pytest.mark.parametrize("name", SCRIPTS)
def test_npy_images_read_into_minus_one_to_one_exactly(name, tmp_path):
    m = M[name]
    pixels = np.random.default_rng(1).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    pixels.flat[:256] = np.arange(256)  # every grey level
    expected = torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    for kind, array in {"grey": pixels[..., 0], "rgb": pixels, "float64": pixels / 255.0,
                        "float32": (pixels / 255.0).astype(np.float32)}.items():
        np.save(tmp_path / f"{kind}.npy", array)
        x, labels = m.get_data(m.Config(dataset=str(tmp_path / f"{kind}.npy")))
        want = expected[:, :1] if kind == "grey" else expected
        assert x.dtype == torch.float32 and labels is None and torch.equal(x, want), kind
    assert x.min() == -1 and x.max() == 1


@pytest.mark.parametrize("name", DIFFUSION)
def test_one_hot_labels_equal_integer_labels(name, tiny_npy, tmp_path):
    m = M[name]
    y = np.random.default_rng(2).integers(0, 5, 48)
    np.save(tmp_path / "int.npy", y)
    np.save(tmp_path / "onehot.npy", np.eye(5, dtype=np.float32)[y])
    _, a = m.get_data(m.Config(dataset=tiny_npy, labels=str(tmp_path / "int.npy")))
    _, b = m.get_data(m.Config(dataset=tiny_npy, labels=str(tmp_path / "onehot.npy")))
    assert a.dtype == b.dtype == torch.long and torch.equal(a, torch.as_tensor(y)) and torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 9. Sampling from a checkpoint
# --------------------------------------------------------------------------------------------
THREE = ["000000.png", "000001.png", "000002.png"]


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_sample_writes_one_png_per_image_and_a_grid_into_out_or_the_checkpoints_folder(name, trained, tmp_path):
    from PIL import Image
    out, new = copy_run(trained, name, tmp_path / "run"), tmp_path / "new" / "deeper"
    sample = ["--sample", "--ckpt", out / "ckpt.pt", "--num-samples", 3, *TINY[name]]
    before = snapshot(out)
    run(name, *sample, "--out", new)
    assert pngs(new / "generated") == THREE and (new / "generated_grid.png").is_file()
    assert Image.open(new / "generated" / "000000.png").size == (16, 16) and snapshot(out) == before
    run(name, *sample)
    assert pngs(out / "generated") == THREE and (out / "generated_grid.png").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


@pytest.mark.parametrize("writer,reader,named", [("ddpm", "ddim", True), ("ddim", "ddpm", True),
                                                 ("ddpm", "ddim", False)])
def test_sampling_the_other_diffusion_scripts_checkpoint_writes_a_subfolder(writer, reader, named, trained, tmp_path):
    """ddim.py reads ddpm.py's checkpoints (and back): its samples go to READER-samples/, and the writer's
    own samples and files stay as they were; also for a checkpoint that does not name its script (an older
    version's), which either script may have written."""
    out = copy_run(trained, writer, tmp_path / "run")
    if not named:
        torch.save({k: v for k, v in load(out / "ckpt.pt").items() if k != "script"}, out / "ckpt.pt")
    run(writer, "--sample", "--ckpt", out / "ckpt.pt", "--num-samples", 2, *TINY[writer])
    before = snapshot(out)
    run(reader, "--sample", "--ckpt", out / "ckpt.pt", "--num-samples", 3, *TINY[reader])
    assert pngs(out / f"{reader}-samples" / "generated") == THREE
    assert (out / f"{reader}-samples" / "generated_grid.png").is_file()
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(f"{reader}-samples")} == before


class Clock:
    """time.time() that moves 11 s at every call: generate() prints a progress line every 10 s."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 11
        return self.now


@pytest.mark.parametrize("name", DIFFUSION)
def test_long_sampling_prints_progress_that_ends_at_done(name, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M[name], "time", Clock())
    capsys.readouterr()
    run(name, "--sample", "--ckpt", trained / name / "ckpt.pt", "--num-samples", 10, "--out", tmp_path,
        *TINY[name])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling:")]
    assert [line.split(" images")[0] for line in lines] == ["sampling: 4/10", "sampling: 8/10", "sampling: 10/10"]
    assert "ETA" in lines[0] and lines[-1].endswith("done"), lines


# --------------------------------------------------------------------------------------------
# 10. Nothing float64 on the device (Apple's MPS has none)
# --------------------------------------------------------------------------------------------
DEVICE = torch.device("cpu", 0)  # the scripts' device: "cpu:0" tells it apart from the host's "cpu"
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.zeros_like,
             torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like}


class DeviceWatch(TorchFunctionMode):
    """Tensors put on DEVICE (.to(DEVICE), a factory's device=...) and all computed from them count as on the
    device until .cpu() or .to("cpu") (which then copy, as from a real device); each float64 one is recorded
    with the function that made it."""

    def __init__(self):
        super().__init__()
        self.on, self.float64, self.seen = {}, [], 0

    def is_on(self, t):
        return torch.is_tensor(t) and (ref := self.on.get(id(t))) is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result, inputs = func(*args, **kwargs), tree_flatten((args, kwargs))[0]
        if func in (torch.Tensor.cpu, torch.Tensor.to):
            places = [torch.device(a) for a in inputs if isinstance(a, (str, torch.device))]
            if func is torch.Tensor.cpu or places and DEVICE not in places:  # to the host
                return result.clone() if result is args[0] and self.is_on(result) else result
            there = DEVICE in places or self.is_on(args[0])  # (a dtype-only .to() stays where it is)
        else:
            there = func in FACTORIES and kwargs.get("device") is not None or any(map(self.is_on, inputs))
        for t in tree_flatten(result)[0] if there else []:
            if torch.is_tensor(t):
                self.on[id(t)], self.seen = weakref.ref(t), self.seen + 1
                if t.dtype == torch.float64:
                    self.float64.append(getattr(func, "__qualname__", str(func)))
        return result


def test_the_watch_sees_float64_on_the_device():
    with DeviceWatch() as watch:
        x = torch.zeros(3).to(DEVICE)
        (x * 2).double()
        x.to(torch.float64)
        torch.ones(2, dtype=torch.float64, device=DEVICE)
        x.cpu().double(), x.to("cpu").double(), torch.zeros(2).double()  # on the host: allowed
        x.sum().double()  # still on the device after .cpu()
    assert [f.split(".")[-1] for f in watch.float64] == ["double", "to", "ones", "double"], watch.float64


@pytest.mark.parametrize("name", SCRIPTS)
def test_nothing_float64_is_sent_to_or_computed_on_the_device(name, tiny_npy, tmp_path, monkeypatch):
    """A tiny training (steps, a sample grid, dcgan's quality check, vae's test −ELBO, a checkpoint) and
    --sample, with the device handed out as "cpu:0"."""
    monkeypatch.setattr(M[name], "pick_device", lambda name: DEVICE)
    with DeviceWatch() as watch:
        run(name, *flags(name, tiny_npy, tmp_path / "run", "--steps", 2, "--log-every", 1))
        run(name, "--sample", "--ckpt", tmp_path / "run" / "ckpt.pt", "--num-samples", 2, *TINY[name])
    assert watch.seen > 100 and not watch.float64, watch.float64
