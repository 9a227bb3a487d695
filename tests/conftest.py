"""Shared test helpers. Every test runs on the CPU without network access."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import ddpm` etc. from the repository root

# Real MNIST, for the real-data tests only: our own machines keep it beside the repository.
# Users and fresh machines do not have it; those tests then skip, and say so (pytest -rs).
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
HAVE_MNIST = os.path.isfile(os.path.join(SHARED_DATA, "MNIST", "raw", "train-images-idx3-ubyte"))
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"REAL-DATA TEST SKIPPED: no MNIST in {SHARED_DATA}")


def run_script(*args, timeout=300):
    """Run a script of the repository as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(result, *words):
    """Bad input: non-zero exit, one line on stderr naming the problem, and no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def tiny_npy(tmp_path):
    """48 random 16x16 RGB 'sprites' as a uint8 .npy file (N, H, W, C), like the seed's sprite set."""
    rng = np.random.default_rng(0)
    path = tmp_path / "sprites.npy"
    np.save(path, rng.integers(0, 256, size=(48, 16, 16, 3), dtype=np.uint8))
    return str(path)
