"""The benchmarks run (their figures are printed, never asserted as timings)."""
import numpy as np
import pytest
import torch

from conftest import MNIST_ROOT, needs_mnist, run_script


def test_speed_benchmark_runs_and_prints_its_ratios():
    r = run_script("benchmarks/speed.py", "--size", "mnist-cpu", "--batch-size", "2", "--steps", "1",
                   "--rounds", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for line in ("training-loop overhead", "sampler overhead", "training images/s", "peak memory", "GFLOP"):
        assert line in r.stdout


@needs_mnist
def test_mnist_fid_ranks_real_digits_far_above_noise():
    import sys
    sys.path.insert(0, "benchmarks")
    import mnist_fid
    real = mnist_fid.mnist(MNIST_ROOT, train=True)[0][:500] * 2 - 1
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1)
    scores = [mnist_fid.score(x, MNIST_ROOT) for x in (real, blurred, noise)]
    assert scores[0] < scores[1] < scores[2] and scores[0] < 20, scores
    assert np.isfinite(scores).all()
