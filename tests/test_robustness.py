"""Nothing lost, never a traceback (ddpm.py and ddim.py, which share this code): divergence, Ctrl-C and
SIGTERM, a kill while metrics.csv is rewritten, a full disk, debris from a killed run, foreign and empty
checkpoints, bad flags and files; progress lines; and nothing float64 sent to a device (Apple's MPS has none)."""
import csv
import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddim
import ddpm
from conftest import ROOT, assert_one_line_error, run_script

TINY = dict(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none", timesteps=10, device="cpu",
            batch_size=4, dropout=0.0, sample_every=1000)
TINY_FLAGS = ["--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none",
              "--timesteps", "10", "--device", "cpu", "--batch-size", "4", "--dropout", "0", "--sample-every", "1000"]


def exits_with(fn, *words):
    """fn() stops with one line (no newline in the message) that contains every word."""
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --------------------------------------------------------------------------------------------
# Data lost
# --------------------------------------------------------------------------------------------
def test_a_diverging_run_keeps_its_last_finite_checkpoint_and_resumes_with_a_lower_lr(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    good = ["--dataset", tiny_npy, "--out", out, *TINY_FLAGS, "--warmup", "1", "--log-every", "50"]
    assert run_script("ddpm.py", *good, "--steps", "5", "--ckpt-every", "5").returncode == 0
    # the finiteness check at a save comes before the log step's: --ckpt-every 5 < --log-every 50
    r = run_script("ddpm.py", *good, "--steps", "200", "--ckpt-every", "5", "--lr", "1e4", "--resume")
    assert_one_line_error(r, "diverged", "last good one (step 5)", "--resume --lr")
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 5 and all(v.isfinite().all() for v in state["model"].values())
    r = run_script("ddpm.py", *good, "--steps", "7", "--lr", "1e-4", "--resume")
    assert r.returncode == 0 and "learning rate 0.0001, was 0.0002" in r.stdout, r.stderr
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"][0]["lr"] \
        == pytest.approx(1e-4)


def test_a_new_lr_on_resume_replaces_the_saved_one_and_the_same_lr_changes_nothing(tmp_path, tiny_npy):
    cfg = ddpm.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=2, warmup=1, lr=1e-3, log_every=1, **TINY)
    ddpm.train(cfg)
    ddpm.train(ddpm.dataclasses.replace(cfg, steps=3, resume=True, lr=5e-4))
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 5e-4]


def test_sigint_saves_at_the_current_step_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_npy):
    flags = ["--dataset", tiny_npy, *TINY_FLAGS, "--steps", "400", "--log-every", "20", "--ckpt-every", "1000"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "ddpm.py", *flags, "--out", b], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # wait until it trains, then press Ctrl-C
        if line.startswith("step"):
            proc.send_signal(signal.SIGINT)
            break
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in stderr and "--resume" in stderr
    stopped = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"]
    assert 20 <= stopped < 400  # saved where it stopped, not at a --ckpt-every step
    assert run_script("ddpm.py", *flags, "--out", b, "--resume").returncode == 0
    assert run_script("ddpm.py", *flags, "--out", a).returncode == 0
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]), key
    rows = [[r["loss"] for r in csv.DictReader(open(os.path.join(d, "metrics.csv")))] for d in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == 20  # even the log row cut in two by the stop


def test_sigterm_saves_and_exits_in_one_line(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "ddpm.py", "--dataset", tiny_npy, *TINY_FLAGS, "--steps", "100000",
                             "--log-every", "10", "--out", out], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step"):
            proc.send_signal(signal.SIGTERM)
            break
    stderr = proc.communicate(timeout=120)[1]
    assert "stopped by SIGTERM" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] >= 10


def test_metrics_are_rewritten_through_a_temporary_file(tmp_path, monkeypatch):
    """A kill while a resumed run rewrites metrics.csv leaves the old file whole, never a shorter one."""
    path = str(tmp_path / "metrics.csv")
    with open(path, "w") as f:
        f.write("step,loss\n1,0.5\n2,0.4\n3,0.3\n")
    before = open(path).read()

    def killed(*args):
        raise KeyboardInterrupt  # the moment between writing the new file and renaming it
    monkeypatch.setattr(ddpm.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ddpm.open_metrics(path, 2, ["step", "loss"])
    assert open(path).read() == before
    monkeypatch.undo()
    ddpm.open_metrics(path, 2, ["step", "loss"]).close()
    assert open(path).read() == "step,loss\n1,0.5\n2,0.4\n"  # rows after the checkpoint's step are dropped


def test_sampling_another_scripts_checkpoint_never_deletes_its_samples(tmp_path, tiny_npy):
    out = tmp_path / "run"
    ddpm.train(ddpm.Config(dataset=tiny_npy, out=str(out), steps=1, **TINY))
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["script"]  # as an older version wrote it
    torch.save(state, out / "ckpt.pt")
    assert run_script("ddpm.py", "--sample", "--ckpt", str(out / "ckpt.pt"), "--num-samples", "3",
                      "--device", "cpu").returncode == 0
    r = run_script("ddim.py", "--sample", "--ckpt", str(out / "ckpt.pt"), "--num-samples", "2", "--sample-steps", "2",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(out / "generated")) == 3 and len(os.listdir(out / "ddim-samples" / "generated")) == 2


def test_resume_removes_a_truncated_grid_from_after_the_checkpoint(tmp_path, tiny_npy):
    cfg = ddpm.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=2, log_every=1, **TINY | {"sample_every": 2})
    ddpm.train(cfg)
    samples = tmp_path / "run" / "samples"
    (samples / "step_0000003.png").write_bytes((samples / "step_0000002.png").read_bytes()[:100])  # killed mid-write
    ddpm.train(ddpm.dataclasses.replace(cfg, steps=4, resume=True))
    assert sorted(os.listdir(samples)) == ["step_0000002.png", "step_0000004.png"]


# --------------------------------------------------------------------------------------------
# One line, never a traceback
# --------------------------------------------------------------------------------------------
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_npy, monkeypatch):
    cfg = ddpm.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=1, **TINY)
    ddpm.train(cfg)
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()

    def full(state, path):  # what torch.save raises when the disk fills mid-write
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1000")
    monkeypatch.setattr(ddpm.torch, "save", full)
    exits_with(lambda: ddpm.train(ddpm.dataclasses.replace(cfg, steps=2, resume=True)),
               "cannot write", "MiB free", "previous checkpoint is intact", "--resume")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before and not os.path.exists(tmp_path / "run" / "ckpt.pt.tmp")


def test_a_full_disk_or_read_only_folder_elsewhere_is_one_line(tmp_path, monkeypatch, tiny_npy):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "generated" / "000000.png"))
    ddpm.train(ddpm.Config(dataset=tiny_npy, out=str(tmp_path), steps=1, **TINY))
    monkeypatch.setattr(ddpm, "save_pngs", full)
    monkeypatch.setattr(sys, "argv", ["ddpm.py", "--sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "1",
                                      "--device", "cpu"])
    exits_with(lambda: ddpm.run_main(ddpm.main), "No space left on device", "000000.png", "free some space")
    monkeypatch.undo()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)  # read-only (root ignores the mode: then this run simply succeeds)
    r = run_script("ddpm.py", "--dataset", tiny_npy, "--out", str(locked / "run"), "--steps", "1", *TINY_FLAGS)
    assert r.returncode == 0 or (len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr), r.stderr


def test_empty_foreign_and_bare_checkpoints_are_one_line(tmp_path):
    cases = {"empty.pt": None, "dcgan.pt": {"generator": {}, "discriminator": {}, "config": {}, "step": 1},
             "vae.pt": {"model": {}, "optimizer": {}, "config": {}, "step": 1, "script": "vae"},
             "bare.pt": {"conv.weight": torch.zeros(2)}, "tensor.pt": torch.zeros(3), "list.pt": [1, 2]}
    words = {"empty.pt": ["empty (0 bytes)"], "dcgan.pt": ["written by dcgan.py", "use dcgan.py"],
             "vae.pt": ["written by vae.py"], "bare.pt": ["bare state_dict"], "tensor.pt": ["a Tensor"],
             "list.pt": ["a list"]}
    for name, thing in cases.items():
        path = tmp_path / name
        path.write_bytes(b"") if thing is None else torch.save(thing, path)
        for script in (ddpm, ddim):
            exits_with(lambda: script.sample_mode(script.Config(ckpt=str(path), device="cpu")), *words[name])


@pytest.mark.parametrize("args,words", [
    (["--lr", "nan"], ["--lr", "finite"]), (["--lr", "inf"], ["--lr", "finite"]), (["--lr", "0"], ["--lr", "> 0"]),
    (["--grad-clip", "nan"], ["--grad-clip"]), (["--grad-clip", "-1"], ["--grad-clip", "> 0"]),
    (["--grad-clip", "0"], ["--grad-clip"]), (["--num-res-blocks", "0"], ["--num-res-blocks", ">= 1"]),
    (["--num-res-blocks", "-1"], ["--num-res-blocks"]), (["--warmup", "-5"], ["--warmup", ">= 0"]),
    (["--image-size", "-1"], ["--image-size"]), (["--channels", "-8"], ["--channels"]),
    (["--channel-mult", "1,x"], ["--channel-mult", "1,x"]), (["--channel-mult", "0"], ["--channel-mult"]),
    (["--attn-res", "abc"], ["--attn-res", "abc"]), (["--p-uncond", "1"], ["--p-uncond", "[0, 1)"]),
    (["--ema-decay", "1"], ["--ema-decay"]), (["--guidance", "-1"], ["--guidance"]),
])
def test_every_bad_number_is_one_line_before_anything_runs(args, words):
    for script in (ddpm, ddim):
        exits_with(lambda: script.main(script.parse_args(args)), *words)
    exits_with(lambda: ddim.main(ddim.parse_args(["--eta", "1.5"])), "--eta", "[0, 1]")


def test_npy_shapes_and_pixel_ranges(tmp_path):
    def data(array):
        np.save(tmp_path / "x.npy", array)
        return lambda: ddpm.get_data(ddpm.Config(dataset=str(tmp_path / "x.npy")))
    for bad in (np.float32(3), np.zeros(5, np.uint8), np.zeros((2, 1, 3, 4, 4), np.uint8)):
        exits_with(data(bad), "grey or RGB images")
    exits_with(data(np.full((2, 4, 4), 255.0)), "float pixels must be in [0, 1] or [-1, 1]", "uint8")
    exits_with(data(np.full((2, 4, 4), 300, np.int64)), "integer pixels must be in [0, 255]")
    exits_with(data(np.array([["a", "b"]])), "cannot read")
    x, _ = data(np.stack([np.zeros((4, 4), np.int64), np.full((4, 4), 255, np.int64)]))()  # int64 pixels
    assert x.min() == -1 and x.max() == 1
    x, _ = data(np.stack([np.zeros((4, 4)), np.full((4, 4), 0.5)]))()  # float64 in [0, 1]
    assert x.min() == -1 and x.max() == pytest.approx(0.0039, abs=0.01)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    exits_with(lambda: ddpm.get_data(ddpm.Config(dataset=str(tmp_path / "o.npy"))), "cannot read")


def test_an_image_folder_is_read_one_file_at_a_time(tmp_path):
    from PIL import Image
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        Image.fromarray(np.full((4, 4), i % 256, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); sys.path.insert(0, '.');"
            f"import ddpm; x, _ = ddpm.get_data(ddpm.Config(dataset={str(folder)!r})); print(tuple(x.shape))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "(300, 1, 4, 4)" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------
# Progress on long waits; nothing float64 moved to a device
# --------------------------------------------------------------------------------------------
def test_sampling_prints_progress_lines_that_end_at_100_percent(monkeypatch, capsys):
    monkeypatch.setattr(ddpm.Progress, "EVERY", 0.0)  # every update (a terminal would redraw one line)
    cfg = ddpm.Config(dataset="mnist", timesteps=5, batch_size=3, **{k: v for k, v in TINY.items()
                                                                     if k not in ("timesteps", "batch_size")})
    model = ddpm.UNet(1, 8, channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none")
    ddpm.generate(model, cfg, 7, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sampling")]
    assert len(lines) == 15 and "5 network calls per image" in lines[0]  # 3 batches × 5 calls
    done = [float(l.split(": ")[1].split("/")[0]) for l in lines]
    assert done == sorted(done) and lines[-1].split(": ")[1].startswith("7/7 img (100%)") and "done in" in lines[-1]


def test_nothing_float64_is_sent_to_the_device(tmp_path, tiny_npy, monkeypatch):
    """Apple's MPS has no float64: record every tensor moved with .to(device) during a training run, a
    grid and sampling with both scripts (on the CPU, which stands in for the device)."""
    moved, original = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs:
            moved.append(out.dtype)
        return out
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    cfg = ddpm.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=2, **TINY | {"sample_every": 2})
    ddpm.train(cfg)
    for script in (ddpm, ddim):
        script.sample_mode(script.Config(ckpt=str(tmp_path / "run" / "ckpt.pt"), num_samples=2, device="cpu",
                                         **({"sample_steps": 3} if script is ddim else {})))
    assert moved and torch.float64 not in moved, moved
