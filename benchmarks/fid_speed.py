"""Benchmark, not a test: how fast and how exact is fid.py?

1. frechet_distance on 2048-d statistics, against pytorch-fid's formula (scipy.linalg.sqrtm of Σ1Σ2,
   real part, trace) when scipy is importable, for a full-rank case (n = 4096 samples) and a small-n
   case (n = 1000 < 2048, singular Σ), both checked against an exact low-dimensional formula.
2. Inception feature extraction, images/s at batch 64 on the CPU (random weights: same cost).

    python benchmarks/fid_speed.py
    # scipy is never a dependency; for the comparison install it in a scratch folder:
    pip install --target /tmp/scipy_scratch scipy && PYTHONPATH=/tmp/scipy_scratch python benchmarks/fid_speed.py
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fid  # noqa: E402


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance, rewritten: tr of the real part of sqrtm(Σ1Σ2)."""
    from scipy import linalg
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # pytorch-fid then retries with Σ + 1e-6·I
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    difference = mu1 - mu2
    return difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def gaussian_statistics(n, d, rng):
    """Statistics of n samples with a decaying spectrum (like Inception features); also their factor
    A = centred samplesᵀ/√(n−1), so that Σ = A Aᵀ."""
    samples = rng.standard_normal((n, d)) * (1.0 / np.arange(1, d + 1)) ** 0.5 + rng.uniform(0, 1, d)
    factor = (samples - samples.mean(axis=0)).T / np.sqrt(n - 1)  # (d, n)
    return samples.mean(axis=0), factor @ factor.T, factor


def exact_distance(mu1, sigma1, factor1, mu2, sigma2):
    # the nonzero eigenvalues of Σ1Σ2 = A1 (A1ᵀΣ2) are those of the small (n, n) matrix A1ᵀΣ2A1
    small = factor1.T @ sigma2 @ factor1
    eigenvalues = np.linalg.eigvalsh(small)
    eigenvalues = np.where(eigenvalues > len(small) * np.finfo(float).eps * eigenvalues.max(), eigenvalues, 0)
    difference = mu1 - mu2
    return difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()


def timed(function, *args, repeats=1):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function(*args)
        best = min(best, time.perf_counter() - start)
    return value, best


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    try:
        import scipy
        print(f"scipy {scipy.__version__} found: comparing with pytorch-fid's formula")
    except ImportError:
        scipy = None
        print("scipy not importable: timing fid.frechet_distance only")
    rng = np.random.default_rng(0)
    d = 2048
    for n in (4096, 1000):
        mu1, sigma1, factor1 = gaussian_statistics(n, d, rng)
        mu2, sigma2, _ = gaussian_statistics(n, d, rng)
        mu2 += 0.05
        exact = exact_distance(mu1, sigma1, factor1, mu2, sigma2) if n < d else None
        ours, ours_seconds = timed(fid.frechet_distance, mu1, sigma1, mu2, sigma2, repeats=3)
        print(f"\nd = {d}, n = {n} ({'singular' if n <= d else 'full-rank'} Σ)")
        print(f"  fid.frechet_distance   {ours:.10f}   {ours_seconds:8.2f} s")
        if exact is not None:
            print(f"  exact (n×n formula)    {exact:.10f}   ours − exact = {ours - exact:.2e}")
        if scipy is not None:
            theirs, theirs_seconds = timed(pytorch_fid_formula, mu1, sigma1, mu2, sigma2)
            print(f"  pytorch-fid (sqrtm)    {theirs:.10f}   {theirs_seconds:8.2f} s")
            print(f"  speed-up {theirs_seconds / ours_seconds:.1f}x,  relative difference {(ours - theirs) / theirs:.2e}")
            if exact is not None:
                print(f"  sqrtm − exact = {theirs - exact:.2e}")

    model = fid.load_inception("random", "cpu")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        model(images)  # warm-up: the first pass at a shape builds its kernels
        _, seconds = timed(model, images)
    print(f"\nInception features, batch 64, CPU, {torch.get_num_threads()} threads: {64 / seconds:.1f} images/s")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="It takes no options: run it as it is "
                            "(--help only prints this).").parse_args()
    main()
