"""Shared test helpers. Every test runs on the CPU without network access."""
import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import ddpm` etc. from the repository root

# Real MNIST, for the real-data tests only: in the repository's data/ (where `python ddpm.py --dataset
# mnist` downloads it) or, on the team's machines, in ../shared/data beside the repository. Where
# neither holds all four files, those tests skip and say so (pytest -rs).
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_ROOTS = [os.path.join(ROOT, "data"), os.path.join(os.path.dirname(ROOT), "shared", "data")]
MNIST_ROOT = next((r for r in MNIST_ROOTS if all(os.path.isfile(os.path.join(r, "MNIST", "raw", f))
                                                 for f in MNIST_FILES)), None)
HAVE_MNIST = MNIST_ROOT is not None
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="REAL-DATA TEST SKIPPED: no MNIST in data/MNIST/raw/ "
                                 "(torchvision.datasets.MNIST('data', download=True) puts it there)")


def run_script(*args, timeout=300):
    """Run a script of the repository as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_in_process(script, *args):
    """The same, in the test's process (an interpreter start costs seconds): main(parse_args(args)) of the
    script's module, with what it prints as stdout and its sys.exit message as stderr."""
    module, printed, code, message = importlib.import_module(script.removesuffix(".py")), io.StringIO(), 0, ""
    with contextlib.redirect_stdout(printed):
        try:
            module.main(module.parse_args([str(a) for a in args]))
        except SystemExit as e:
            code, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
    return subprocess.CompletedProcess([script, *args], code, printed.getvalue(), message)


@pytest.fixture(autouse=True)
def own_signal_handlers():
    """A training in-process installs its Ctrl-C and SIGTERM handlers in pytest's process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


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
