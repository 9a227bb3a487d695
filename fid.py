"""fid.py: Fréchet Inception Distance, small enough to read in one sitting.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500, Eq. 6) fits a Gaussian N(μ, Σ) to the
2048-d pool features of Inception v3 for each of two image sets, and reports the Fréchet distance
(the squared 2-Wasserstein distance) between the two Gaussians. Lower is better; 0 = same statistics.

    python fid.py samples/ cifar10-train                # torchvision weights (the default, see below)
    python fid.py samples/ cifar10-train --weights pt_inception-2015-12-05-6726825d.pth   # paper numbers
    python fid.py samples/ --save-stats samples.npz     # statistics only, reusable later
    python fid.py a.npz b.npz                           # two saved statistics: instant
    from Python:   import fid;  fid.score(images_in_minus1_to_1, "cifar10-train", device="cuda")

Each side is a folder of images, a .npz of statistics (keys mu, sigma: pytorch-fid's format), a .npy of
images (uint8 pixels, or floats in [0, 1], as the training scripts read it) or a dataset (cifar10-train,
mnist-train, fashion-mnist-train: all training images; statistics cached under <data-root>/fid_stats/).
Only pytorch-fid's weights file gives paper-comparable numbers: torchvision's IMAGENET1K_V1 weights are a
different network, with a different (self-consistent) FID. Inception is slow on a CPU (~8 images/s): use a
GPU for 50,000 images. See docs/fid.md. Sections: 1. Config  2. Data  3. Model  4. Metric  5. Main
"""
import argparse
import collections
import functools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import inception as tv

# --- plumbing: 1. Config ---
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DATASETS = {"cifar10-train": "CIFAR10", "mnist-train": "MNIST", "fashion-mnist-train": "FashionMNIST"}
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # TF's FID Inception, ported by pytorch-fid
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"  # what torchvision downloads for IMAGENET1K_V1
PROGRESS_BATCHES = 20  # a long feature extraction prints how far it got every 20 batches
Stats = collections.namedtuple("Stats", "mu sigma n backbone")  # float64 μ (d,), Σ (d, d); n images or None; network


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


def one_line(error):  # an exception as one short line: no message of ours spills over several lines
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


# --- plumbing: 2. Data: every source becomes uint8 batches (B, C, H, W), C = 1 or 3 ---
def to_uint8(images, name="images"):
    """Tensor or array → uint8 (N, C, H, W). uint8 is pixels [0, 255]; floats are [-1, 1] (our scripts'
    range), rounded to 8 bits exactly like torchvision.utils.save_image, so a tensor and the PNG files
    saved from it give the same FID. (N, H, W) and channels-last (N, H, W, C) are accepted too."""
    x = torch.as_tensor(images).detach().cpu()
    x = x[:, None] if x.ndim == 3 else x  # (N, H, W) → (N, 1, H, W)
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        sys.exit(f"fid: {name} must be (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    low, high = (x.min().item(), x.max().item()) if x.numel() else (0, 0)
    if not x.is_floating_point() or not -1.001 <= low <= high <= 1.001:  # NaN fails this test too
        sys.exit(f"fid: {name} must be uint8 pixels or floats in [-1, 1], got {x.dtype} in [{low:.3g}, {high:.3g}]")
    # [-1, 1] → [0, 1] → {0..255}:  ⌊255·(x + 1)/2 + 0.5⌋, the same rounding as save_image
    return ((x.float() + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def read_npy(path):
    """A .npy file of images → uint8 (N, C, H, W). It holds uint8 pixels, or floats in [0, 1] that become
    round(255·x), as the training scripts read them. No pickles: a stranger's file cannot run code."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # junk, truncated, or an object array (which needs pickle)
        sys.exit(f"fid: cannot read {path} as a numpy array of images ({one_line(error)})")
    if array.dtype.kind == "f" and ((array >= 0) & (array <= 1)).all():  # NaN fails this test
        array = (array * 255).round().astype(np.uint8)
    if array.dtype != np.uint8:  # e.g. floats in [-1, 1] or [0, 255], int64, strings
        seen = f" in [{array.min():.3g}, {array.max():.3g}]" if array.dtype.kind == "f" and array.size else ""
        sys.exit(f"fid: {path}: a .npy must hold uint8 pixels or floats in [0, 1], got {array.dtype}{seen}")
    return to_uint8(array, name=str(path))


def folder_batches(files, batch_size):  # batch by batch: 50,000 large images need not fit in memory at once
    from PIL import Image
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            try:
                with Image.open(path) as image:  # convert("RGB") repeats a grey channel 3× and drops alpha
                    batch.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))  # (3, H, W)
            except Exception as error:
                sys.exit(f"fid: cannot read image {path} ({one_line(error)}); remove or fix that file")
            size = size or batch[-1].shape  # the first image's: a batch needs one size, so does a fair test
            if batch[-1].shape != size:
                sys.exit(f"fid: {path} is {tuple(batch[-1].shape)} but {files[0]} is {tuple(size)}: resize them to one")
        yield torch.stack(batch)  # (B, 3, H, W)


def image_batches(source, batch_size, data_root):  # any source → (number of images, iterator over uint8 batches)
    name = str(source) if isinstance(source, (str, Path)) else ""  # "": a tensor or an array
    if name in DATASETS:  # all training images: no augmentation, no flips, no crops (a folder: ./cifar10-train)
        try:
            source = getattr(torchvision.datasets, DATASETS[name])(data_root, train=True, download=True).data
        except Exception as error:  # offline, proxy, broken file...: say what to place where
            where = (f"cifar-10-python.tar.gz in {data_root}/" if name == "cifar10-train" else
                     f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz in {data_root}/{DATASETS[name]}/raw/")
            sys.exit(f"fid: cannot load {name} ({type(error).__name__}); offline? place {where}")
    elif name and Path(name).is_dir():  # the folder's own files, not subfolders, in sorted order
        files = sorted(p for p in Path(name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return len(files), folder_batches(files, batch_size)
    elif name and name.endswith(".npy") and Path(name).is_file():
        source = read_npy(name)
    elif name:
        sys.exit(f"fid: {name} is not a folder, a .npz or .npy file, or one of {', '.join(DATASETS)}")
    images = to_uint8(source)  # a dataset's .data: uint8 (N, H, W[, C]); a script's tensor: floats in [-1, 1]
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

    def __init__(self, inception, description):
        super().__init__()
        inception.fc = nn.Identity()  # drop the classifier: the output is the 2048-d average pool
        # Both networks see 2x − 1 for pixels x in [0, 1]: torchvision's transform_input maps ImageNet-normalised
        # x̂ = (x − m)/s back to x̂·s/0.5 + (m − 0.5)/0.5 = 2x − 1. We switch it off and feed 2x − 1 directly
        inception.transform_input = False
        self.inception, self.description = inception, description

    def forward(self, images):
        x = images.float() / 255  # [0, 255] → [0, 1]
        x = x.expand(-1, 3, -1, -1)  # grey (B, 1, H, W) → (B, 3, H, W) by repetition; RGB unchanged
        # bilinear, align_corners=False, no antialias: exactly pytorch-fid's F.interpolate call
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        return self.inception(2 * x - 1)  # [0, 1] → [-1, 1] → (B, 2048)


@functools.lru_cache(maxsize=2)
def load_inception(weights=None, device="cpu"):
    """None: torchvision IMAGENET1K_V1; a path: a local state dict (pytorch-fid's 1008-class file builds
    the FID variant); "random": seeded random weights, for tests only: the numbers are meaningless."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # seed 0, leaving the caller's random numbers alone
            torch.manual_seed(0)
            net = tv.inception_v3(weights=None, aux_logits=False, init_weights=False)
            for module in net.modules():  # He init keeps features O(1); torchvision's init gives ~1e11
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        description = "torchvision Inception v3, random weights (tests only: numbers are meaningless)"
    elif weights is None:
        description = "torchvision Inception v3, IMAGENET1K_V1 weights"
        try:
            net = tv.inception_v3(weights=tv.Inception_V3_Weights.IMAGENET1K_V1)
        except Exception as error:  # offline: name the file and the folder torchvision looks in
            sys.exit(f"fid: cannot get torchvision's Inception weights ({type(error).__name__}); offline? put "
                     f"{TORCHVISION_WEIGHTS_FILE} in {torch.hub.get_dir()}/checkpoints/, or pass --weights FILE "
                     f"(paper-comparable: {FID_WEIGHTS_URL})")
    else:
        if not Path(weights).is_file() or Path(weights).stat().st_size == 0:  # a typo, or a download cut short
            sys.exit(f"fid: weights file {weights} is missing or empty (paper-comparable: {FID_WEIGHTS_URL})")
        try:  # weights_only: a file from a stranger cannot run code
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(f"the file holds a {type(state).__name__}, not a dict of weights")
            fid_variant = state["fc.weight"].shape[0] == 1008  # TF's 1008 classes mark pytorch-fid's file
            net = build_fid_inception() if fid_variant else tv.inception_v3(
                weights=None, init_weights=False, aux_logits="AuxLogits.fc.weight" in state)
            net.load_state_dict(state)  # strict: every name and shape must match
        except Exception as error:  # a junk file, a tensor, names or shapes that do not match
            sys.exit(f"fid: {weights} is not a torchvision or pytorch-fid Inception v3 state dict ({one_line(error)})")
        kind = "FID Inception v3 (TF/pytorch-fid variant)" if fid_variant else "torchvision Inception v3"
        description = f"{kind}, weights {Path(weights).name}"  # the backbone, as the output names it
    return InceptionFeatures(net, description).eval().to(device)


# --- core: 4. Metric ---
def statistics(source, device="cpu", batch_size=50, weights=None, data_root="data"):
    """Any source → Stats: the mean and covariance of its Inception features. An .npz is read as it is; a
    dataset's statistics are computed once, then read from <data_root>/fid_stats/<name>-<weights>.npz."""
    name = str(source) if isinstance(source, (str, Path)) else ""  # "": a tensor or an array
    cache = Path(data_root, "fid_stats", f"{name}-{'torchvision' if weights is None else Path(weights).stem}.npz")
    if name.endswith(".npz"):  # statistics saved before, by fid.py or by pytorch-fid
        return read_stats(name)
    if name in DATASETS and cache.is_file():  # a dataset: computed once, then read from the cache
        return read_stats(cache)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"fid: --device {device} is not available here; use --device cpu or auto")
    n, batches = image_batches(source, batch_size, data_root)
    if n < 2:
        sys.exit(f"fid: {name or 'the images'} gave {n} image(s); a covariance needs at least 2 (papers: 50,000)")
    model = load_inception(weights, device)
    feature_sum, product_sum = np.zeros(2048), np.zeros((2048, 2048))  # float64 accumulators, on the host
    allow_tf32 = torch.backends.cudnn.allow_tf32  # restored below, whatever happens
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would shift FID with the GPU model
    try:
        with torch.inference_mode():
            for index, images in enumerate(batches, start=1):
                features = model(images.to(device)).cpu().double().numpy()  # (B, 2048), float64 only on the host
                feature_sum += features.sum(axis=0)
                product_sum += features.T @ features  # Σ f fᵀ, (2048, 2048)
                if index % PROGRESS_BATCHES == 0:  # a long extraction says how far it got
                    print(f"Inception features: {min(index * batch_size, n)}/{n} images", flush=True)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    # μ = (1/n) Σ f,   Σ = (Σ f fᵀ − n μ μᵀ) / (n − 1)   (unbiased, as np.cov; float64 keeps this exact
    # to ~1e-14 here, since pool features are O(1) and never far from their mean in relative terms)
    mu = feature_sum / n
    sigma = (product_sum - n * np.outer(mu, mu)) / (n - 1)
    stats = Stats(mu, sigma, n, model.description)
    if name in DATASETS:
        save_stats(cache, *stats)
    return stats


def compute_stats(source, *, device="cpu", batch_size=50, weights=None, data_root="data"):
    """Folder, .npy, tensor/array (float in [-1, 1] or uint8) or dataset name → (μ (2048,), Σ (2048, 2048))."""
    return statistics(source, device, batch_size, weights, data_root)[:2]


def save_stats(path, mu, sigma, n=None, backbone=None):
    """pytorch-fid/TTUR .npz (keys mu, sigma), plus n and backbone when known (other tools ignore them).
    Written whole to a temporary file, then renamed: a kill or a full disk never leaves half a file."""
    temporary = Path(f"{path}.tmp.npz")
    extra = {"n": n} if n is not None else {}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(temporary, mu=mu, sigma=sigma, backbone=str(backbone or "unknown"), **extra)
        temporary.replace(path)
    except OSError as error:  # a full disk, a read-only folder, a folder where the file should go...
        temporary.unlink(missing_ok=True)
        sys.exit(f"fid: cannot write statistics to {path}: {error.strerror or one_line(error)}")


def read_stats(path):
    try:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["n"]) if "n" in data else None
            backbone = str(data["backbone"]) if "backbone" in data else "unknown"
    except Exception as error:
        sys.exit(f"fid: cannot read statistics {path} ({one_line(error)}); expected an .npz with keys mu and sigma")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        sys.exit(f"fid: {path} has mu {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    return Stats(mu, sigma, n, backbone)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr √(Σ1 Σ2), in float64, without scipy."""
    mu1, sigma1, mu2, sigma2 = (np.array(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:  # read_stats checked each side on its own
        sys.exit(f"fid: statistics differ in dimension ({mu1.shape} vs {mu2.shape}); compute both with one network")
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
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # d² ≥ 0 exactly; a tiny negative is only round-off


def score(images, reference, *, device="cpu", batch_size=50, weights=None, data_root="data"):
    """FID of images (a float tensor (N, C, H, W) in [-1, 1], C = 1 or 3) against any source (a dataset: cached)."""
    options = dict(device=device, batch_size=batch_size, weights=weights, data_root=data_root)
    return frechet_distance(*compute_stats(images, **options), *compute_stats(reference, **options))


# --- plumbing: 5. Main ---
def main(args):
    if args.b is None and args.save_stats is None:
        sys.exit("fid: give two sources A B, or one source with --save-stats OUT.npz")
    if args.batch_size < 1:
        sys.exit("fid: --batch-size must be at least 1")
    out = Path(args.save_stats or ".")  # checked now, not after an hour of feature extraction
    if args.save_stats and (out.suffix != ".npz" or out.is_dir() or not out.parent.is_dir()):
        sys.exit(f"fid: --save-stats {out}: " + ("the file name must end in .npz" if out.suffix != ".npz" else
                 "that is a folder" if out.is_dir() else f"there is no folder {out.parent}"))
    options = dict(device=args.device, batch_size=args.batch_size, weights=args.weights, data_root=args.data_root)
    first = statistics(args.a, **options)
    if args.save_stats:
        save_stats(out, *first)
        print(f"saved statistics of {args.a} (n={first.n}) to {out}")
    if args.b is not None:
        second = statistics(args.b, **options)
        value = frechet_distance(first.mu, first.sigma, second.mu, second.sigma)
        backbone = " | ".join(sorted({first.backbone, second.backbone}))  # two names: not one ruler
        print(f"FID {value:.4f}  (A: {args.a}, n={first.n}; B: {args.b}, n={second.n}; backbone: {backbone})")
        if first.n != second.n:
            print("fid: note: n differs between the sides; FID is biased by n: compare at equal n", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        sys.exit("fid: interrupted")
