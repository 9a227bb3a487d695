"""fid.py: Fréchet Inception Distance, small enough to read in one sitting.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500, Eq. 6) fits a Gaussian N(μ, Σ) to the
2048-d pool features of Inception v3 for each of two image sets, and reports the Fréchet distance
(the squared 2-Wasserstein distance) between the two Gaussians. Lower is better; 0 = same statistics.

    python fid.py samples/ cifar10-train                # torchvision weights (the default, see below)
    python fid.py samples/ cifar10-train --weights pt_inception-2015-12-05-6726825d.pth   # paper numbers
    python fid.py samples/ --save-stats samples.npz     # statistics only, reusable later
    python fid.py a.npz b.npz                           # two saved statistics: instant
    from Python:   import fid;  fid.score(images_in_minus1_to_1, "cifar10-train", device="cuda")

Each side is a folder of images, a .npz of statistics (keys mu, sigma: the pytorch-fid/TTUR
format), a .npy of images, or a dataset (cifar10-train, mnist-train, fashion-mnist-train: all
training images, no augmentation; their statistics are cached under <data-root>/fid_stats/).
A .npy is read by the rule of the training scripts' get_data, so a dataset file means the same
images to both: integers are pixels 0..255; floats are [0, 1], or [-1, 1] if any value is negative.
A tensor handed over in Python (score(), from the scripts' --fid) is always floats in [-1, 1].
Cost (benchmarks/fid_speed.py, 2 CPU threads): the 2048-d Fréchet distance 1.9 s (scipy's sqrtm route:
11.4 s); Inception features ~8 images/s on that CPU, so use a GPU for 50k images.

Only paper-comparable with pytorch-fid's weights file: torchvision's IMAGENET1K_V1 weights are a
different network, so their FID is a different (self-consistent) number. See README, section FID.
Sections: 1. Config  2. Data  3. Model  4. Metric  5. Main
"""
import argparse
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- plumbing: 1. Config ---
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DATASETS = {"cifar10-train": "CIFAR10", "mnist-train": "MNIST", "fashion-mnist-train": "FashionMNIST"}
# What to place where when torchvision cannot download a dataset (it skips the download if these exist).
MNIST_FILES = "train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
DATASET_FILES = {"cifar10-train": "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {root}/",
                 "mnist-train": MNIST_FILES + " in {root}/MNIST/raw/",
                 "fashion-mnist-train": MNIST_FILES + " in {root}/FashionMNIST/raw/"}
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # TF's FID Inception, ported by pytorch-fid
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"  # what torchvision downloads for IMAGENET1K_V1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="FID between two image sources (folder, .npz, .npy or dataset).")
    parser.error = lambda message: sys.exit(f"fid: {message} (see --help)")  # one line, not usage + error
    parser.add_argument("a", help="folder of images, .npz statistics, .npy images, or " + " | ".join(DATASETS))
    parser.add_argument("b", nargs="?", help="the other side (optional with --save-stats)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="where Inception runs")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: torchvision IMAGENET1K_V1; "
                        f"{FID_WEIGHTS_FILE} gives paper-comparable FID; 'random': tests only)")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz", help="write the statistics of A to OUT.npz")
    parser.add_argument("--data-root", default="data", help="where datasets and their cached statistics live")
    return parser.parse_args(argv)


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"fid: --device {device} is not available here; use --device cpu or auto")
    return device


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- plumbing: 2. Data: every source becomes uint8 batches (B, C, H, W), C = 1 or 3 ---
def to_uint8(images, floats="[-1, 1]", name="images"):
    """Tensor/array → uint8 (N, C, H, W). Integers (uint8 or any integer dtype) are pixels in [0, 255].
    Floats: floats="[-1, 1]" (a tensor from our scripts, their range), rounded to 8 bits exactly like
    torchvision.utils.save_image, so a tensor and the PNG files saved from it give the same FID; or
    floats="auto" (a .npy file), the rule of the scripts' get_data: [0, 1], or [-1, 1] if any value is
    negative. (N, H, W) and channels-last (N, H, W, C) are accepted too."""
    x = (images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))).detach().cpu()
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W) → (N, 1, H, W)
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        sys.exit(f"fid: {name} must be (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not (x.is_floating_point() or x.dtype == torch.bool):  # integers: pixels 0..255, as in the scripts
        if len(x) and not 0 <= x.min() <= x.max() <= 255:
            sys.exit(f"fid: {name}: integer pixels must be in [0, 255], got [{x.min()}, {x.max()}]")
        return x.to(torch.uint8)
    x = x.float()
    low, high = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
    if floats == "auto":  # a .npy file, read as get_data reads it: [0, 1], or [-1, 1] if any value is negative
        if not (math.isfinite(low + high) and (0 <= low and high <= 1 or -1 <= low < 0 and high <= 1)):
            sys.exit(f"fid: {name}: float pixels must be in [0, 1] or [-1, 1], got [{low:.3g}, {high:.3g}] "
                     "(save pixel values 0..255 as uint8)")
        return ((x + 1) / 2 if low < 0 else x).mul(255).round().to(torch.uint8)  # get_data's rounding
    if not (math.isfinite(low + high) and low >= -1.001 and high <= 1.001):
        sys.exit(f"fid: {name}: float images must be in [-1, 1], got [{low:.3g}, {high:.3g}] (uint8 is read as [0, 255])")
    # [-1, 1] → [0, 1] → {0..255}:  ⌊255·(x + 1)/2 + 0.5⌋, the same rounding as save_image
    return ((x + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def read_npy(path):
    """A .npy file of images (no pickles: a file from a stranger cannot run code) → uint8, by get_data's rule."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # junk, truncated, or an object array (which needs pickle)
        sys.exit(f"fid: cannot read {path} as a numpy array of images: {first_line(error)}")
    if array.dtype.kind not in "iufb":
        sys.exit(f"fid: {path}: cannot read {array.dtype} values as pixels (use uint8, or floats in [0, 1])")
    return to_uint8(array, floats="auto", name=str(path))


def read_image(path):
    from PIL import Image
    try:
        with Image.open(path) as image:  # convert("RGB") repeats a grey channel 3× and drops alpha
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (H, W, 3) → (3, H, W)
    except Exception as error:
        sys.exit(f"fid: cannot read image {path} ({type(error).__name__}: {error}); remove or fix that file")


def folder_batches(files, batch_size):
    first_shape = None
    for start in range(0, len(files), batch_size):
        images = [read_image(path) for path in files[start:start + batch_size]]
        first_shape = first_shape or images[0].shape
        for path, image in zip(files[start:], images):
            if image.shape != first_shape:  # a batch needs one size; so does a fair comparison
                sys.exit(f"fid: {path} is {tuple(image.shape)} but {files[0]} is {tuple(first_shape)}; "
                         "FID needs images of one size (resize them first)")
        yield torch.stack(images)  # (B, 3, H, W)


def load_dataset(name, data_root):
    """All training images of a torchvision dataset as uint8: no augmentation, no flips, no crops."""
    import torchvision
    try:
        dataset = getattr(torchvision.datasets, DATASETS[name])(data_root, train=True, download=True)
    except Exception as error:  # offline, proxy, broken file...
        sys.exit(f"fid: cannot load {name} ({type(error).__name__}); offline? place "
                 + DATASET_FILES[name].format(root=data_root))
    return dataset.data  # CIFAR-10: (50000, 32, 32, 3) numpy; MNIST, Fashion: (60000, 28, 28) tensor


def image_batches(source, batch_size, data_root):
    """Folder, .npy, dataset name, tensor or array → (number of images, iterator over uint8 batches)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():  # the folder's own files, not subfolders, in sorted order
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            return len(files), folder_batches(files, batch_size)
        if str(source) in DATASETS:
            source = load_dataset(str(source), data_root)
        elif path.suffix == ".npy" and path.is_file():
            source = read_npy(path)
        else:
            sys.exit(f"fid: {source} is not a folder, a .npz or .npy file, or one of {', '.join(DATASETS)}")
    images = to_uint8(source)  # uint8 stays uint8; a tensor or array of floats from a script: [-1, 1]
    return len(images), (images[start:start + batch_size] for start in range(0, len(images), batch_size))


# --- core: 3. Model: Inception v3 up to its 2048-d average pool ---
def fid_block(block_class, pool):
    """pytorch-fid's FIDInceptionA/C/E: a torchvision block whose pool branch (always the last of its
    outputs) is recomputed with TF's pooling. The discarded torchvision pool branch costs ~5% more
    compute; in exchange we do not copy 60 lines of torchvision, and the parameter names stay the same."""
    class FIDBlock(block_class):
        def _forward(self, x):
            outputs = super()._forward(x)  # [branch1x1, ..., branch_pool]
            outputs[-1] = self.branch_pool(pool(x))
            return outputs
    FIDBlock.__name__ = "FID" + block_class.__name__
    return FIDBlock


def build_fid_inception():
    """The network of TF's FID code (and pytorch-fid): torchvision's Inception v3 with 1008 classes, no
    auxiliary classifier, and the pooling quirks of TF's 2015 graph that its weights were trained with."""
    from torchvision.models import inception as tv
    model = tv.Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
    # TF's average pool divides by the pixels inside the image (4 at a corner), not by 9 padded ones
    average = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    # the last block max-pools (likely a slip in TF's graph, but the weights were trained with it)
    maximum = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)
    block_a, block_c = fid_block(tv.InceptionA, average), fid_block(tv.InceptionC, average)
    model.Mixed_5b, model.Mixed_5c, model.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
    model.Mixed_6b, model.Mixed_6c = block_c(768, channels_7x7=128), block_c(768, channels_7x7=160)
    model.Mixed_6d, model.Mixed_6e = block_c(768, channels_7x7=160), block_c(768, channels_7x7=192)
    model.Mixed_7b, model.Mixed_7c = fid_block(tv.InceptionE, average)(1280), fid_block(tv.InceptionE, maximum)(2048)
    return model


class InceptionFeatures(nn.Module):
    """uint8 images (B, C, H, W) of any size → pool features (B, 2048) float32."""

    def __init__(self, inception, fid_variant, description):
        super().__init__()
        inception.fc = nn.Identity()  # drop the classifier: the output is the 2048-d average pool
        self.inception, self.fid_variant, self.description = inception, fid_variant, description
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def prepare(self, images):
        x = images.float() / 255  # [0, 255] → [0, 1]
        x = x.expand(-1, 3, -1, -1)  # grey (B, 1, H, W) → (B, 3, H, W) by repetition; RGB unchanged
        # bilinear, align_corners=False, no antialias: exactly pytorch-fid's F.interpolate call
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        if self.fid_variant:
            return 2 * x - 1  # the FID network expects [-1, 1]
        # torchvision's API takes ImageNet-normalised x̂ = (x − m)/s, and its transform_input=True (set by
        # inception_v3 whenever weights are loaded) maps it back: x̂·s/0.5 + (m − 0.5)/0.5 = 2x − 1.
        # So both networks really see 2x − 1; we feed what torchvision documents.
        return (x - self.mean) / self.std

    def forward(self, images):
        return self.inception(self.prepare(images))  # (B, 2048)


@functools.lru_cache(maxsize=2)
def load_inception(weights=None, device="cpu"):
    """None: torchvision IMAGENET1K_V1; a path: a local state dict (pytorch-fid's 1008-class file builds
    the FID variant); "random": seeded random weights, for tests only: the numbers are meaningless."""
    from torchvision.models import Inception_V3_Weights, inception_v3
    fid_variant = False
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # seed 0, leaving the caller's random numbers alone
            torch.manual_seed(0)
            net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
            for module in net.modules():  # He init keeps features O(1); torchvision's init gives ~1e11
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        description = "torchvision Inception v3, random weights (tests only: numbers are meaningless)"
    elif weights is None:
        try:
            net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
        except Exception as error:
            sys.exit(f"fid: cannot get torchvision's Inception weights ({type(error).__name__}); offline? put "
                     f"{TORCHVISION_WEIGHTS_FILE} in {torch.hub.get_dir()}/checkpoints/, or pass --weights PATH "
                     f"(paper-comparable: {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL})")
        description = "torchvision Inception v3, IMAGENET1K_V1 weights"
    else:
        if not os.path.isfile(weights):
            sys.exit(f"fid: weights file {weights} not found (paper-comparable: {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL})")
        if os.path.getsize(weights) == 0:
            sys.exit(f"fid: weights file {weights} is empty (0 bytes): a download cut short? "
                     f"(paper-comparable: {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL})")
        try:  # weights_only: a file from a stranger cannot run code
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"the file holds a {type(state).__name__}, not a dict of weights")
            fid_variant = state["fc.weight"].shape[0] == 1008  # TF's 1008 classes mark pytorch-fid's file
            net = build_fid_inception() if fid_variant else inception_v3(
                weights=None, init_weights=False, transform_input=True, aux_logits="AuxLogits.fc.weight" in state)
            net.load_state_dict(state)  # strict: every name and shape must match
        except Exception as error:
            sys.exit(f"fid: {weights} is not an Inception v3 state dict of torchvision or pytorch-fid "
                     f"({type(error).__name__}: {first_line(error)[:200]})")
        kind = "FID Inception v3 (TF/pytorch-fid variant)" if fid_variant else "torchvision Inception v3"
        description = f"{kind}, weights {Path(weights).name}"
    return InceptionFeatures(net, fid_variant, description).eval().to(device)


# --- core: 4. Metric ---
@dataclass
class Stats:
    mu: np.ndarray  # (d,) float64 mean of the features
    sigma: np.ndarray  # (d, d) float64 covariance
    n: int | None  # number of images (None: an .npz from elsewhere)
    backbone: str  # which network made them


def stats_of_images(source, device, batch_size, weights, data_root):
    n, batches = image_batches(source, batch_size, data_root)
    if n < 2:
        sys.exit(f"fid: {source if isinstance(source, (str, Path)) else 'the images'} gave {n} image(s); "
                 "a covariance needs at least 2 (and FID is only comparable at equal n, 50k standard)")
    model = load_inception(weights, device)
    feature_sum, product_sum = np.zeros(2048), np.zeros((2048, 2048))  # float64 accumulators, on the host
    progress, done = Progress(f"Inception features ({model.description.split(',')[0]})", n), 0
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would shift FID with the GPU model
    try:
        with torch.inference_mode():
            for images in batches:
                features = model(images.to(device)).cpu().double().numpy()  # (B, 2048), float64 only on the host
                feature_sum += features.sum(axis=0)
                product_sum += features.T @ features  # Σ f fᵀ, (2048, 2048)
                done += len(features)
                progress.update(done)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    # μ = (1/n) Σ f,   Σ = (Σ f fᵀ − n μ μᵀ) / (n − 1)   (unbiased, as np.cov; float64 keeps this exact
    # to ~1e-14 here, since pool features are O(1) and never far from their mean in relative terms)
    mu = feature_sum / n
    sigma = (product_sum - n * np.outer(mu, mu)) / (n - 1)
    return Stats(mu, sigma, n, model.description)


def statistics(source, device="cpu", batch_size=50, weights=None, data_root="data"):
    """Any source → Stats. Datasets are cached in <data_root>/fid_stats/<name>-<weights tag>.npz."""
    device = resolve_device(device)
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        return read_stats(source)
    if isinstance(source, (str, Path)) and str(source) in DATASETS and not Path(source).is_dir():
        tag = "torchvision" if weights is None else Path(weights).stem
        cache = Path(data_root) / "fid_stats" / f"{source}-{tag}.npz"
        if cache.is_file():
            return read_stats(cache)
        stats = stats_of_images(source, device, batch_size, weights, data_root)
        save_stats(cache, stats.mu, stats.sigma, stats.n, stats.backbone)
        return stats
    return stats_of_images(source, device, batch_size, weights, data_root)


def compute_stats(source, *, device="cpu", batch_size=50, weights=None, data_root="data"):
    """Folder, .npy, tensor/array (float in [-1, 1] or uint8) or dataset name → (μ (2048,), Σ (2048, 2048))."""
    stats = statistics(source, device, batch_size, weights, data_root)
    return stats.mu, stats.sigma


def save_stats(path, mu, sigma, n=None, backbone=None):
    """pytorch-fid/TTUR .npz (keys mu, sigma), plus n and backbone when known (other tools ignore them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"n": n} if n is not None else {}
    temporary = path.with_name(path.name + ".tmp.npz")  # written whole, then renamed: a kill never
    np.savez(temporary, mu=mu, sigma=sigma, backbone=str(backbone or "unknown"), **extra)  # leaves half a file
    os.replace(temporary, path)


def read_stats(path):
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["n"]) if "n" in data else None
            backbone = str(data["backbone"]) if "backbone" in data else "unknown"
    except Exception as error:
        sys.exit(f"fid: cannot read statistics {path} ({type(error).__name__}: {error}); "
                 "expected an .npz with keys mu and sigma")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        sys.exit(f"fid: {path} has mu {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    return Stats(mu, sigma, n, backbone)


def load_stats(path):
    stats = read_stats(path)
    return stats.mu, stats.sigma


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr √(Σ1 Σ2), in float64, without scipy."""
    mu1, sigma1, mu2, sigma2 = (np.array(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        sys.exit(f"fid: statistics differ in dimension (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                 f"vs {sigma2.shape}); compute both sides with the same network")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        sys.exit("fid: statistics contain NaN or inf (broken images or features?)")
    # √Σ1 = V diag(√λ) Vᵀ from Σ1 = V diag(λ) Vᵀ; λ < 0 can only be round-off of a PSD matrix
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    # AB and BA have the same eigenvalues; with A = √Σ1, B = √Σ1 Σ2: AB = Σ1 Σ2, BA = M = √Σ1 Σ2 √Σ1,
    # which is symmetric PSD (even when Σ1 is singular, as it is for n ≤ 2048). So
    # tr √(Σ1 Σ2) = Σᵢ √λᵢ(M), with real λᵢ ≥ 0 from eigvalsh: nothing complex, no slow sqrtm
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    # For n ≤ d, M has exact zero eigenvalues that come out as ±d·ε·λ_max; their square roots (~1e-7
    # each, thousands of them) would add up, so below that round-off level we count λ as 0
    tolerance = len(m) * np.finfo(np.float64).eps * np.abs(eigenvalues).max()
    trace_sqrt = np.sqrt(np.where(eigenvalues > tolerance, eigenvalues, 0)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # d² ≥ 0 exactly; a tiny negative is only round-off


def score(images, reference, *, device="cpu", batch_size=50, weights=None, data_root="data"):
    """FID of images (float tensor (N, C, H, W) in [-1, 1], C = 1 or 3) against a dataset name, an
    .npz or a folder. Reference statistics of datasets are computed once and cached."""
    options = dict(device=device, batch_size=batch_size, weights=weights, data_root=data_root)
    first, second = statistics(images, **options), statistics(reference, **options)
    return frechet_distance(first.mu, first.sigma, second.mu, second.sigma)


# >>> shared: progress
class Progress:
    """'sampling: 1200/2000 (60%) | 3.4 img/s | ETA 3m52s' for a long wait: rewritten in place on a
    terminal; in a file or a CI log, a new line every PROGRESS_EVERY seconds (10) and one at the end."""
    EVERY = float(os.environ.get("PROGRESS_EVERY", 10))

    def __init__(self, label: str, total: int, unit: str = "img"):
        self.label, self.total, self.unit, self.shown, self.done = label, total, unit, False, False
        self.start = self.last = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, done: float) -> None:
        now, finished = time.time(), done >= self.total
        if self.done or not finished and now - self.last < (min(0.5, self.EVERY) if self.tty else self.EVERY):
            return
        if finished and not self.shown and now - self.start < 2 and self.EVERY > 0:
            return  # a wait too short to need a progress line
        self.last, self.shown, self.done, rate = now, True, finished, done / max(now - self.start, 1e-9)
        clock = lambda s: f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m" if s >= 3600 else f"{s // 60:.0f}m{s % 60:02.0f}s"
        line = (f"{self.label}: {done:.0f}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%) | "
                f"{rate:.1f} {self.unit}/s | " + (f"done in {clock(now - self.start)}" if finished else
                                                 f"ETA {clock((self.total - done) / max(rate, 1e-9))}"))
        print("\r" + line + "   " if self.tty else line, end="\n" if finished or not self.tty else "", flush=True)
# <<< shared: progress


# --- plumbing: 5. Main ---
def main(args):
    if args.b is None and args.save_stats is None:
        sys.exit("fid: give two sources A B, or one source with --save-stats OUT.npz")
    if args.batch_size < 1:
        sys.exit("fid: --batch-size must be at least 1")
    if args.save_stats and not args.save_stats.endswith(".npz"):
        sys.exit(f"fid: --save-stats {args.save_stats}: the file name must end in .npz")
    options = dict(device=args.device, batch_size=args.batch_size, weights=args.weights, data_root=args.data_root)
    first = statistics(args.a, **options)
    if args.save_stats:
        save_stats(args.save_stats, first.mu, first.sigma, first.n, first.backbone)
        print(f"saved statistics of {args.a} (n={first.n}) to {args.save_stats}")
    if args.b is None:
        return
    second = statistics(args.b, **options)
    value = frechet_distance(first.mu, first.sigma, second.mu, second.sigma)
    known = {first.backbone, second.backbone} - {"unknown"}  # pytorch-fid's .npz files do not say
    backbone = " | ".join(sorted({first.backbone, second.backbone}))
    print(f"FID {value:.4f}  (A: {args.a}, n={first.n}; B: {args.b}, n={second.n}; backbone: {backbone})")
    if len(known) > 1:
        print("fid: warning: the two sides come from different networks; this FID is not meaningful", file=sys.stderr)
    if first.n != second.n:
        print("fid: note: n differs between the sides; FID is biased by n, compare only at equal n", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        sys.exit("fid: interrupted")
