"""Several processes (torchrun + DistributedDataParallel, the gloo backend on CPU) train exactly as one
process does on the whole batch; the precision and compile flags. The shared `train` block is the
same code in ddpm.py and ddim.py, so testing ddpm.py covers both."""
import csv
import json
import os

import pytest
import torch

import ddpm
from conftest import assert_one_line_error, run_in_process, run_script

TINY = ["--channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none",
        "--timesteps", "10", "--device", "cpu", "--batch-size", "8", "--dropout", "0", "--lr", "1e-3",
        "--warmup", "1", "--log-every", "1", "--sample-every", "100"]

# Started by torchrun in each process: ddpm.py's own train(), plus a test-only record of the network
# this process trained (build_model is looked up at call time, so wrapping it here is enough).
RECORD_EACH_PROCESS = """
import os, sys, torch
sys.path.insert(0, os.getcwd())
import ddpm
built = []
build_model = ddpm.build_model
ddpm.build_model = lambda *args: built.append(build_model(*args)) or built[-1]
ddpm.main(ddpm.parse_args())
torch.save(built[0].state_dict(), os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.pt"))
"""


def torchrun(*args):
    return run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args)


def losses(run_dir):
    return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(open(os.path.join(run_dir, "metrics.csv")))}


def test_two_processes_train_exactly_as_one_process_on_the_whole_batch(tmp_path, tiny_npy, monkeypatch):
    monkeypatch.setenv("RECORD_DIR", str(tmp_path))  # where each process records its weights
    script = tmp_path / "record.py"
    script.write_text(RECORD_EACH_PROCESS)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    # two processes × 4 images, 2 steps; then resumed by two processes to step 4
    r = torchrun(str(script), "--dataset", tiny_npy, "--out", two, "--steps", "2", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 8 in 2 process(es)" in r.stdout and r.stdout.count("step       2/2") == 1  # process 0 alone prints
    assert json.load(open(os.path.join(two, "config.json")))["batch_size"] == 8  # the global batch
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    ckpt = torch.load(os.path.join(two, "ckpt.pt"), weights_only=True)
    for name in ranks[0]:  # DDP keeps every process's weights identical, bit for bit
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], ckpt["model"][name]), name
    assert sorted(os.listdir(two)) == ["ckpt.pt", "config.json", "metrics.csv", "samples"]
    r = torchrun(str(script), "--dataset", tiny_npy, "--out", two, "--steps", "4", "--resume", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 2" in r.stdout and r.stdout.count("step       4/4") == 1
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])

    # one process, the whole batch of 8, 4 steps without a stop
    r = run_script("ddpm.py", "--dataset", tiny_npy, "--out", one, "--steps", "4", *TINY)
    assert r.returncode == 0, r.stderr
    a, b = losses(one), losses(two)
    assert list(b) == [1, 2, 3, 4]  # one row per step: resume dropped nothing and repeated nothing
    # Step 1: the same weights, images, t and ε; the mean of two means of 4 = the mean of 8 (float rounding).
    assert b[1] == pytest.approx(a[1], abs=2e-6)
    for step in (2, 3, 4):  # after updates from gradients summed in another order: equal to rounding
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    ckpt_one = torch.load(os.path.join(one, "ckpt.pt"), weights_only=True)["model"]
    for name, theta in ranks[0].items():
        assert torch.allclose(theta, ckpt_one[name], atol=1e-5), name


def test_global_batch_must_split_evenly_over_the_processes(tmp_path, tiny_npy, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 would set it
    with pytest.raises(SystemExit, match="--batch-size 8 must be divisible by the number of processes \\(3\\)"):
        ddpm.train(ddpm.Config(dataset=tiny_npy, batch_size=8, out=str(tmp_path / "run"), device="cpu"))


@pytest.mark.parametrize("value", ["auto", "fp32", "bf16"])
def test_precision_accepts_its_values(value):
    assert ddpm.parse_args(["--precision", value]).precision == value
    cpu = torch.device("cpu")
    assert ddpm.use_bf16(ddpm.parse_args(["--precision", value]), cpu) == (value == "bf16")  # auto: fp32 on CPU
    assert ddpm.use_bf16(ddpm.parse_args(["--precision", value]), torch.device("cuda")) == (value != "fp32")


def test_compile_is_a_switch():
    assert ddpm.parse_args(["--compile"]).compile is True
    assert ddpm.parse_args(["--no-compile"]).compile is False
    assert ddpm.parse_args([]).compile is False


@pytest.mark.parametrize("args,words", [
    (["--precision", "fp16"], ["--precision", "fp16", "bf16"]),
    (["--precision"], ["--precision"]),
    (["--compile=yes"], ["--compile"]),
    (["--compile", "yes"], ["yes"]),
])
def test_bad_precision_and_compile_values_give_one_clear_line(args, words):
    assert_one_line_error(run_in_process("ddpm.py", *args), *words)


def test_bf16_run_trains_and_logs(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_script("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "2", "--precision", "bf16", *TINY)
    assert r.returncode == 0, r.stderr
    assert "cpu bf16 |" in r.stdout and len(losses(out)) == 2


def test_class_conditional_training_is_the_same_on_two_processes(tmp_path, tiny_npy):
    """--class-cond under torchrun: the null labels come from the generator that every process shares with
    t and ε, so two processes × 4 images take the steps of one process on all 8 (equal to rounding)."""
    import numpy as np
    labels = str(tmp_path / "labels.npy")
    np.save(labels, np.arange(len(np.load(tiny_npy))) % 3)
    flags = ["--dataset", tiny_npy, "--labels", labels, "--class-cond", "--steps", "2", *TINY]
    r = torchrun("ddpm.py", *flags, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 8 in 2 process(es)" in r.stdout
    r = run_script("ddpm.py", *flags, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert b[1] == pytest.approx(a[1], abs=2e-6) and b[2] == pytest.approx(a[2], rel=1e-4), (a, b)
