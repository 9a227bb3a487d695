"""Tests for fid.py: CPU only, no network, under a minute.

The network tests use weights="random" (a seeded random Inception): its FID values are meaningless,
but every step of the pipeline (preprocessing, features, statistics, distance, CLI) is the real one.
Level 1 (math against references) needs no network at all and runs in a fraction of a second.
"""
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small CPU machines shared with other jobs: OpenMP threads that spin-wait for a busy core make a
    # 2048-d eigh or an Inception pass 5-20x slower than a single thread. Restored after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_spd(d, rng, rank=None):
    """A random symmetric PSD matrix, (d, d); rank < d gives a singular one, as from n ≤ d samples."""
    x = rng.standard_normal((rank or d + 3, d)) * rng.uniform(0.2, 3.0, size=d)
    return x.T @ x / len(x)


def trace_sqrt_eig(a, b):
    # Independent 1: eigenvalues of the non-symmetric product Σ1Σ2 (real and ≥ 0 for SPD inputs)
    eigenvalues = np.linalg.eigvals(a @ b)
    assert np.abs(eigenvalues.imag).max() < 1e-8 * np.abs(eigenvalues).max()
    return np.sqrt(eigenvalues.real).sum()


def trace_sqrt_denman_beavers(a, b, steps=60):
    # Independent 2: the matrix square root of Σ1Σ2 itself, by the Denman–Beavers iteration
    # Y ← (Y + Z⁻¹)/2, Z ← (Z + Y⁻¹)/2 from Y = Σ1Σ2, Z = I; Y → √(Σ1Σ2)
    y, z = a @ b, np.eye(len(a))
    for _ in range(steps):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    assert np.abs(y @ y - a @ b).max() <= 1e-9 * np.abs(a @ b).max()  # converged (elementwise rtol is too strict for
    # the near-zero entries, whose rounding depends on the BLAS's thread count)
    return np.trace(y)


# ---------- Level 1: the Fréchet distance against closed forms and independent computations ----------
def test_distance_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    for d, rank in [(8, None), (64, None), (64, 10), (200, 3)]:  # rank-deficient: n ≤ d, scipy's weak spot
        mu, sigma = rng.standard_normal(d), random_spd(d, rng, rank)
        value = fid.frechet_distance(mu, sigma, mu, sigma)
        assert isinstance(value, float) and 0 <= value < 1e-9 * np.trace(sigma)


def test_distance_symmetric_and_nonnegative():
    rng = np.random.default_rng(1)
    for d, rank in [(16, None), (100, 7)]:
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        sigma1, sigma2 = random_spd(d, rng, rank), random_spd(d, rng, rank)
        forward, backward = fid.frechet_distance(mu1, sigma1, mu2, sigma2), fid.frechet_distance(mu2, sigma2, mu1, sigma1)
        assert forward > 0 and forward == pytest.approx(backward, rel=1e-10)


def test_distance_diagonal_closed_form():
    # Σ1 = diag(a), Σ2 = diag(b):  d² = ‖μ1 − μ2‖² + Σᵢ (√aᵢ − √bᵢ)²
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.01, 4, 50), rng.uniform(0.01, 4, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_distance_scaled_covariance_closed_form():
    # Σ2 = c·Σ1 (dense):  tr √(Σ1Σ2) = √c·tr Σ1,  so  d² = (1 − √c)²·tr Σ1
    rng = np.random.default_rng(3)
    sigma, mu = random_spd(40, rng), rng.standard_normal(40)
    expected = (1 - np.sqrt(2.5)) ** 2 * np.trace(sigma)
    assert fid.frechet_distance(mu, sigma, mu, 2.5 * sigma) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [5, 30, 120])
def test_distance_matches_independent_dense_computations(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = random_spd(d, rng), random_spd(d, rng)
    base = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(base - 2 * trace_sqrt_eig(sigma1, sigma2), rel=1e-9)
    assert ours == pytest.approx(base - 2 * trace_sqrt_denman_beavers(sigma1, sigma2), rel=1e-9)


@pytest.mark.parametrize("d, rank", [(100, 7), (300, 40)])
def test_distance_rank_deficient_matches_small_space_formula(d, rank):
    # n ≤ d samples give a singular Σ (rank n − 1): where sqrtm-based FID turns complex, NaN or negative.
    # Σ1 = A1 A1ᵀ with A1 (d, r): the nonzero eigenvalues of Σ1Σ2 = A1 (A1ᵀΣ2) are those of the small,
    # nonsingular (r, r) matrix A1ᵀ Σ2 A1, so tr √(Σ1Σ2) needs no (d, d) square root at all
    rng = np.random.default_rng(d)
    a1, a2 = rng.standard_normal((d, rank)), rng.standard_normal((d, rank))
    sigma1, sigma2, mu = a1 @ a1.T, a2 @ a2.T, rng.standard_normal(d)
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.linalg.eigvalsh(a1.T @ sigma2 @ a1)).sum()
    assert fid.frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu, sigma2, mu, sigma1) == pytest.approx(expected, rel=1e-10)


def test_distance_rejects_mismatched_dimensions():
    with pytest.raises(SystemExit, match="^fid: statistics differ in dimension"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


def test_npz_round_trip_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(6), random_spd(6, rng)
    fid.save_stats(tmp_path / "s.npz", mu, sigma, n=123, backbone="test net")
    with np.load(tmp_path / "s.npz") as data:  # what pytorch-fid reads: f["mu"], f["sigma"]
        assert np.array_equal(data["mu"], mu) and np.array_equal(data["sigma"], sigma)
    stats = fid.read_stats(tmp_path / "s.npz")
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma) and stats.mu.dtype == np.float64
    assert (stats.n, stats.backbone) == (123, "test net")
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)  # a TTUR / pytorch-fid file: no n, no backbone
    assert fid.read_stats(tmp_path / "plain.npz").n is None
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed away


# ---------- Level 1: preprocessing and the FID variant of Inception ----------
def test_to_uint8_matches_save_image_png(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])
    save_image((x[0] + 1) / 2, tmp_path / "x.png")  # how our scripts write samples
    from_png = torch.from_numpy(np.array(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    assert torch.equal(fid.to_uint8(x)[0], from_png)
    channels_last = np.zeros((2, 5, 5, 3), dtype=np.uint8)  # numpy (N, H, W, C), as CIFAR-10's .data
    assert fid.to_uint8(channels_last).shape == (2, 3, 5, 5)
    with pytest.raises(SystemExit, match=r"must be uint8 pixels or floats in \[-1, 1\], got torch.float32 in \[-255"):
        fid.to_uint8(x * 255)
    with pytest.raises(SystemExit, match=r"got torch.int64 in \[0, 255\]"):  # other integers are not guessed at
        fid.to_uint8(torch.full((2, 3, 4, 4), 255, dtype=torch.int64).tril())
    with pytest.raises(SystemExit, match=r"got torch.float32 in \[nan, nan\]"):
        fid.to_uint8(torch.full((2, 3, 4, 4), float("nan")))


@pytest.mark.parametrize("size", [16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_resizes_and_scales(size, channels):
    images = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    # expected: [0, 1], grey repeated to RGB, pytorch-fid's bilinear resize, then 2x − 1
    x = images.float().div(255).repeat(1, 3 // channels, 1, 1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    prepared = fid.InceptionFeatures(torch.nn.Identity(), description="")(images)  # an identity "network"
    assert prepared.shape == (2, 3, 299, 299) and torch.equal(prepared, 2 * x - 1)
    # torchvision's documented route (ImageNet normalisation, undone by transform_input=True) feeds the
    # same 2x − 1, so switching transform_input off and feeding 2x − 1 changes nothing but round-off
    from torchvision.models.inception import Inception3
    net = Inception3(aux_logits=False, transform_input=True, init_weights=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's m and s
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(net._transform_input((x - mean) / std), 2 * x - 1, atol=1e-5)
    fid.InceptionFeatures(net, description="")
    assert not net.transform_input


def test_fid_blocks_pool_like_tensorflow():
    model = fid.build_fid_inception().eval()
    average = dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)
    expected_pool = {"Mixed_5b": "avg", "Mixed_5c": "avg", "Mixed_5d": "avg", "Mixed_6b": "avg",
                     "Mixed_6c": "avg", "Mixed_6d": "avg", "Mixed_6e": "avg", "Mixed_7b": "avg", "Mixed_7c": "max"}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, pool in expected_pool.items():
            block = getattr(model, name)
            x = torch.rand(1, block.branch_pool.conv.in_channels, 5, 5)
            out = block(x)
            tf_pooled = F.max_pool2d(x, 3, 1, 1) if pool == "max" else F.avg_pool2d(x, **average)
            last = block.branch_pool(tf_pooled)  # pytorch-fid's patched pool branch
            assert torch.allclose(out[:, -last.shape[1]:], last, atol=1e-6), name
            # and not torchvision's average pool, which counts the zero padding
            assert not torch.allclose(out[:, -last.shape[1]:], block.branch_pool(F.avg_pool2d(x, 3, 1, 1)), atol=1e-4)
            # the other branches are torchvision's unchanged
            plain = type(block).__mro__[1]._forward(block, x)
            assert torch.equal(out[:, :-last.shape[1]], torch.cat(plain[:-1], 1)), name
    assert type(model.Mixed_6a).__name__ == "InceptionB" and type(model.Mixed_7a).__name__ == "InceptionD"


def pytorch_fid_state_dict():
    """A state dict with the names and shapes of pt_inception-2015-12-05-6726825d.pth. pytorch-fid
    builds torchvision's Inception3(num_classes=1008, aux_logits=False), swaps in FIDInceptionA/C/E_1/
    E_2 (subclasses that add no parameters) and load_state_dict()s the file strictly; so the file's keys
    are exactly those of a plain torchvision Inception3 with 1008 classes and no AuxLogits."""
    from torchvision.models.inception import Inception3
    torch.manual_seed(1)
    state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    # spot checks written out from pytorch-fid's architecture, so a change in torchvision would show
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
              "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
              "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
              "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(key.startswith("AuxLogits") for key in state)
    return {key: value.clone() for key, value in state.items()}


@pytest.mark.parametrize("with_batch_counts", [True, False])  # files saved before PyTorch 0.4.1 lack them
def test_pytorch_fid_weights_build_the_fid_variant(tmp_path, with_batch_counts):
    state = pytorch_fid_state_dict()
    if not with_batch_counts:
        state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / fid.FID_WEIGHTS_FILE
    torch.save(state, path)
    model = fid.load_inception(str(path), "cpu")
    assert model.description == f"FID Inception v3 (TF/pytorch-fid variant), weights {fid.FID_WEIGHTS_FILE}"
    assert [type(getattr(model.inception, name)).__name__ for name in ("Mixed_5b", "Mixed_6e", "Mixed_7b", "Mixed_7c")] \
        == ["FIDInceptionA", "FIDInceptionC", "FIDInceptionE", "FIDInceptionE"]
    loaded = model.inception.state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], state["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(loaded["Conv2d_4a_3x3.bn.running_mean"], state["Conv2d_4a_3x3.bn.running_mean"])
    # a file whose names or shapes do not match must not load
    renamed = dict(state)
    renamed["Mixed_7c.pool_branch.conv.weight"] = renamed.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(SystemExit, match="is not a torchvision or pytorch-fid Inception v3 state dict.*Missing key"):
        fid.load_inception(str(tmp_path / "renamed.pth"), "cpu")


def test_torchvision_weights_file_and_offline_message(tmp_path, monkeypatch):
    from torchvision.models import WeightsEnum, inception_v3
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), tmp_path / fid.TORCHVISION_WEIGHTS_FILE)
    model = fid.load_inception(str(tmp_path / fid.TORCHVISION_WEIGHTS_FILE), "cpu")
    assert model.description.startswith("torchvision Inception v3, weights") and not model.inception.transform_input
    with pytest.raises(SystemExit, match="weights file .* is missing or empty"):
        fid.load_inception(str(tmp_path / "missing.pth"), "cpu")

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(SystemExit) as error:
        fid.load_inception(None, "cpu")
    message = str(error.value.code)
    assert "\n" not in message and fid.TORCHVISION_WEIGHTS_FILE in message and "checkpoints" in message
    assert fid.FID_WEIGHTS_FILE in message


# ---------- Level 2: the whole pipeline on a random Inception ----------
@pytest.fixture(scope="module")
def image_sets():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(clean.shape, generator=generator)
    return {level: (clean + level * noise).clamp(-1, 1) for level in (0.0, 0.1, 0.3)}


@pytest.fixture(scope="module")
def stats_sets(image_sets):
    return {level: fid.statistics(images, weights="random") for level, images in image_sets.items()}


def test_stats_are_mean_and_unbiased_covariance_of_features(image_sets, stats_sets):
    model = fid.load_inception("random", "cpu")
    with torch.inference_mode():
        features = model(fid.to_uint8(image_sets[0.0])).double().numpy()  # (4, 2048)
    assert features.shape == (4, 2048) and np.isfinite(features).all()
    stats = stats_sets[0.0]
    assert stats.n == 4 and stats.mu.dtype == np.float64 and stats.sigma.shape == (2048, 2048)
    assert np.allclose(stats.mu, features.mean(axis=0), rtol=1e-12, atol=1e-12)
    assert np.allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_grows_as_noise_is_added(stats_sets):
    # (FID of a set with itself ≈ 0 through the whole pipeline: test_dataset_reference_statistics_are_cached)
    clean = stats_sets[0.0]
    distances = [fid.frechet_distance(clean.mu, clean.sigma, stats_sets[level].mu, stats_sets[level].sigma)
                 for level in (0.1, 0.3)]
    assert 0 < distances[0] < distances[1]


def test_tensor_and_saved_pngs_give_the_same_statistics(tmp_path, image_sets, stats_sets):
    from torchvision.utils import save_image
    for index, image in enumerate(image_sets[0.0]):
        save_image((image + 1) / 2, tmp_path / f"{index:03d}.png")
    mu, sigma = fid.compute_stats(str(tmp_path), weights="random")
    assert np.allclose(mu, stats_sets[0.0].mu, rtol=1e-12) and np.allclose(sigma, stats_sets[0.0].sigma, rtol=1e-9)


def write_fake_mnist(root, count=3):
    """Tiny MNIST in torchvision's raw layout (idx files), so the dataset path runs offline."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        header = np.array([2051, count, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, count], dtype=">i4").tobytes() + bytes(count))
    return images


def test_dataset_reference_statistics_are_cached(tmp_path, monkeypatch):
    images = write_fake_mnist(tmp_path)
    first = fid.statistics("mnist-train", weights="random", data_root=str(tmp_path))
    cache = tmp_path / "fid_stats" / "mnist-train-random.npz"
    assert cache.is_file() and first.n == 3
    direct = fid.statistics(torch.from_numpy(images), weights="random")  # grey 28 px through the network
    assert np.allclose(first.sigma, direct.sigma, rtol=1e-9)
    monkeypatch.setattr(fid.torchvision.datasets, "MNIST", lambda *args, **kwargs: pytest.fail("cache not used"))
    again = fid.score(images[:, None].astype(np.float32) / 127.5 - 1, "mnist-train", weights="random",
                      data_root=str(tmp_path))
    assert again < 1e-6 * np.trace(first.sigma)


def test_missing_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision
    def offline(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(SystemExit, match=r"^fid: cannot load cifar10-train .*cifar-10-python\.tar\.gz in "):
        fid.compute_stats("cifar10-train", weights="random", data_root=str(tmp_path))
    with pytest.raises(SystemExit, match=r"^fid: cannot load fashion-mnist-train .*images-idx3.*/FashionMNIST/raw/"):
        fid.compute_stats("fashion-mnist-train", weights="random", data_root=str(tmp_path))


# ---------- Level 2: the command line, and the mistakes a user can make ----------
def make_pngs(folder, count, size, mode):
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(len(str(folder)))
    for index in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{index}.png")
    return folder


def run_cli(*args, cwd):
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # see one_thread()
    return subprocess.run([sys.executable, str(ROOT / "fid.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=environment, timeout=300)


def test_cli_on_two_png_folders(tmp_path):
    grey = make_pngs(tmp_path / "grey16", 3, 16, "L")
    rgb = make_pngs(tmp_path / "rgb28", 3, 28, "RGB")
    result = run_cli(grey, rgb, "--weights", "random", "--save-stats", tmp_path / "grey.npz", "--batch-size", 2,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = [row for row in result.stdout.splitlines() if row.startswith("FID ")][0]
    assert float(line.split()[1]) > 0 and line.count("n=3") == 2 and "random weights" in line
    saved = fid.read_stats(tmp_path / "grey.npz")  # --save-stats wrote A's statistics, as the library computes them
    mu, sigma = fid.compute_stats(str(grey), weights="random", batch_size=2)  # same batches: same features
    assert saved.n == 3 and np.allclose(saved.mu, mu, rtol=1e-6) and np.allclose(saved.sigma, sigma, rtol=1e-6)


def assert_one_line_error(result, words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("fid: ") and words in result.stderr, result.stderr


def test_cli_bad_inputs_fail_with_one_line(tmp_path):
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "d32.npz", mu=np.zeros(32), sigma=np.eye(32))
    assert_one_line_error(run_cli("d64.npz", "d32.npz", cwd=tmp_path), "differ in dimension")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("empty", "d64.npz", "--weights", "random", cwd=tmp_path), "gave 0 image(s)")


@pytest.mark.parametrize("case", ["one image", "unreadable file", "bad npz", "mixed sizes", "unknown source"])
def test_bad_inputs_raise_one_clear_line(tmp_path, case):
    # In-process (no torch start-up per case); SystemExit("fid: ...") is what the CLI prints as its one line.
    folder = make_pngs(tmp_path / "images", 1 if case == "one image" else 2, 16, "RGB")
    if case == "unreadable file":
        (folder / "broken.png").write_bytes(b"not a png")
    if case == "mixed sizes":
        make_pngs(tmp_path / "big", 1, 20, "RGB").joinpath("0.png").rename(folder / "z.png")
    source = {"bad npz": tmp_path / "bad.npz", "unknown source": "imagenet-train"}.get(case, folder)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    expected = {"one image": "at least 2", "unreadable file": "cannot read image", "bad npz": "cannot read statistics",
                "mixed sizes": "resize them", "unknown source": "is not a folder"}[case]
    with pytest.raises(SystemExit) as error:
        fid.main(fid.parse_args([str(source), str(folder), "--weights", "random"]))
    message = str(error.value.code)
    assert message.startswith("fid: ") and "\n" not in message and expected in message


# ---------- .npy files: the training scripts' pixel rule; the mistakes a user can make ----------
def npy_cases(tmp_path):
    """The same 4 grey 16x16 images saved as uint8 and as floats in [0, 1] (float64 and float32)."""
    pixels = np.random.default_rng(5).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    cases = {"uint8": pixels, "unit64": pixels / 255.0, "unit32": (pixels / 255.0).astype(np.float32)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
    return pixels, {name: tmp_path / f"{name}.npy" for name in cases}


def test_npy_files_are_read_by_the_scripts_rule(tmp_path):
    """A .npy holds uint8 pixels, or floats in [0, 1] that become round(255·x): the rule of the training
    scripts' get_data, so both see the same pixels. Anything else is one line naming what was found
    (floats in [-1, 1], once read as [-1, 1] here, are now refused like the rest)."""
    pixels, paths = npy_cases(tmp_path)
    for name, path in paths.items():
        assert torch.equal(fid.read_npy(path)[:, 0], torch.from_numpy(pixels)), name
    assert fid.read_npy(paths["uint8"]).shape == (4, 1, 16, 16)
    refused = {"signed": (pixels / 127.5 - 1, r"got float64 in \[-1, 1\]"),
               "f255": (pixels.astype(np.float64), r"got float64 in \[0, 255\]"),
               "nan": (np.full((2, 4, 4), np.nan), "got float64 in"),
               "int64": (pixels.astype(np.int64), "got int64$")}
    for name, (array, words) in refused.items():
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(SystemExit) as error:
            fid.read_npy(tmp_path / f"{name}.npy")
        message = str(error.value.code)
        assert message.startswith(f"fid: {tmp_path / name}.npy: a .npy must hold uint8 pixels or floats in [0, 1]")
        assert re.search(words, message) and "\n" not in message, message


def test_a_float_npy_dataset_against_itself_scores_zero(tmp_path):
    """The path of `dcgan.py --dataset images.npy --fid N`: the training images as get_data hands them
    over (uint8 / 127.5 − 1, floats in [-1, 1]) against the .npy file itself as the reference: FID ≈ 0."""
    pixels, paths = npy_cases(tmp_path)
    as_get_data_gives_them = torch.from_numpy(pixels)[:, None].float() / 127.5 - 1
    reference = fid.statistics(str(paths["unit32"]), weights="random")
    handed_over = fid.statistics(as_get_data_gives_them, weights="random")
    value = fid.frechet_distance(reference.mu, reference.sigma, handed_over.mu, handed_over.sigma)
    misread = fid.statistics(as_get_data_gives_them * 0.5 + 0.5, weights="random")  # [0, 1] taken as [-1, 1]
    assert 0 <= value < 1e-6 * np.trace(reference.sigma), value
    # the misreading (pixels 128..255) is far from it: ‖Δμ‖², a lower bound on its FID, is far above
    # the round-off level that `value` stays under
    assert np.sum((misread.mu - reference.mu) ** 2) > 1e-3 * np.trace(reference.sigma)


@pytest.mark.parametrize("case", ["junk npy", "object npy", "text npy", "empty weights", "missing weights",
                                  "junk weights", "tensor weights", "cuda"])
def test_bad_files_and_devices_are_one_line(tmp_path, case, monkeypatch):
    np.save(tmp_path / "objects.npy", np.array([{}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    folder = make_pngs(tmp_path / "images", 2, 16, "RGB")
    not_weights = "not a torchvision or pytorch-fid Inception v3 state dict"
    args, expected = {"junk npy": (["junk.npy", folder], "cannot read junk.npy"),
                      "object npy": (["objects.npy", folder], "cannot read objects.npy"),
                      "text npy": (["text.npy", folder], "got <U1"),
                      "empty weights": ([folder, folder, "--weights", "empty.pth"], "is missing or empty"),
                      "missing weights": ([folder, folder, "--weights", "nope.pth"], "is missing or empty"),
                      "junk weights": ([folder, folder, "--weights", "junk.pth"], not_weights),
                      "tensor weights": ([folder, folder, "--weights", "tensor.pth"], not_weights),
                      "cuda": ([folder, folder, "--device", "cuda"], "--device cuda is not available")}[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as error:
        fid.main(fid.parse_args([str(a) for a in args]))
    message = str(error.value.code)
    assert message.startswith("fid: ") and "\n" not in message and expected in message, message
    if "weights" in case:
        assert fid.FID_WEIGHTS_FILE in message or not_weights in message  # where to get the right file


@pytest.mark.parametrize("case", ["full disk", "missing folder", "folder as target"])
def test_save_stats_problems_are_one_line_and_leave_no_partial_file(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("a.npz", mu=np.zeros(4), sigma=np.eye(4))  # source A: statistics, so no network is needed
    target = {"full disk": "out.npz", "missing folder": "missing/out.npz", "folder as target": "out.npz"}[case]
    if case == "full disk":
        def full_disk(file, **arrays):  # the first bytes land, then the disk is full
            Path(file).write_bytes(b"PK\x03\x04 half an npz")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(fid.np, "savez", full_disk)
    else:  # checked before any statistics are computed, not after an hour of feature extraction
        monkeypatch.setattr(fid, "statistics", lambda *args, **kwargs: pytest.fail("checked too late"))
    if case == "folder as target":
        Path("out.npz").mkdir()
    with pytest.raises(SystemExit) as error:
        fid.main(fid.parse_args(["a.npz", "--save-stats", target]))
    message = str(error.value.code)
    expected = {"full disk": "fid: cannot write statistics to out.npz: No space left on device",
                "missing folder": "fid: --save-stats missing/out.npz: there is no folder missing",
                "folder as target": "fid: --save-stats out.npz: that is a folder"}[case]
    assert message == expected
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == (["a.npz", "out.npz"] if case == "folder as target" else ["a.npz"]), left  # nothing half-written
    if case == "full disk":  # the library path too: the dataset cache, written by statistics()
        with pytest.raises(SystemExit, match="No space left on device"):
            fid.save_stats(tmp_path / "fid_stats" / "mnist-train-random.npz", np.zeros(4), np.eye(4), 3, "net")
        assert not list((tmp_path / "fid_stats").iterdir())


def test_save_stats_library_call_onto_a_folder_is_one_line(tmp_path):
    (tmp_path / "s.npz").mkdir()
    with pytest.raises(SystemExit, match=r"^fid: cannot write statistics to .*s\.npz: Is a directory$"):
        fid.save_stats(tmp_path / "s.npz", np.zeros(4), np.eye(4))
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"] and not list((tmp_path / "s.npz").iterdir())


def test_feature_extraction_prints_progress(image_sets, capsys, monkeypatch):
    monkeypatch.setattr(fid, "PROGRESS_BATCHES", 1)  # a line per batch
    fid.statistics(image_sets[0.1], weights="random", batch_size=3)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Inception features: 3/4 images", "Inception features: 4/4 images"], lines
