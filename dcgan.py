"""dcgan.py: Deep Convolutional GAN in one file, at the data's own size (32, 28 or 16 px).

Radford, Metz & Chintala 2015, "Unsupervised Representation Learning with Deep Convolutional Generative
Adversarial Networks", https://arxiv.org/abs/1511.06434, on the GAN game of Goodfellow et al. 2014,
https://arxiv.org/abs/1406.2661: a generator G turns noise z into images, a discriminator D tells them
from real ones, and each learns against the other. Samples often get worse late in training, so a
quality check scores G every --check-every steps and the best G so far is kept in best.pt.

    python dcgan.py                  # CIFAR-10 at 32 px, 40k steps of 128 (≈ 100 epochs): a GPU job
    python dcgan.py --recipe mnist   # MNIST digits in about 11 minutes on 2 CPU cores
Sampling (--sample --ckpt RUN/best.pt), times, scores and more commands: docs/dcgan.md.

Sections: 1. Config  2. Data  3. Model (G and D)  4. Objective (the minimax game, BCE on logits)
          5. Sampler (and the quality check)  6. Train (the game, then the plumbing it calls)  7. Main

Where we depart from the paper (and why)
  - The data's own size: the paper's 64 px nets less their 4x4x1024 layer, so at 32 px G goes
    4 -> 8 -> 16 -> 32 with 512, 256, 128 channels and D mirrors it; MNIST: 7 -> 14 -> 28.
  - z ~ N(0, I), as in pytorch/examples; the paper's code drew z ~ U(−1, 1).
  - The paper picks no model; we keep the one with the best quality check (section 5).
  - Samples use BatchNorm's running statistics (an image depends on its own z only); the check scores
    samples normalised by their batch's statistics, which ranked checkpoints better (docs/dcgan.md).
  - Batches are drawn with replacement instead of in shuffled epochs (as in ddpm.py).
"""
import argparse
import copy
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.utils import save_image

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "dcgan": names runs and error messages
READS = ("dcgan",)  # the scripts whose checkpoints this one reads


# 1. Config: every field is a flag (batch_size: --batch-size), its comment the --help text ==========
@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy of images
    data_root: str = "data"  # where torchvision keeps its datasets (downloaded there if missing)
    image_size: int = 0  # resize the images to this (0: the dataset's own size; G and D are built for it)
    # --- model ---
    latent: int = 100  # size of the noise vector z (paper: 100)
    g_channels: int = 128  # generator width: its last hidden layer's channels, doubling towards z (paper: 128)
    d_channels: int = 128  # discriminator width: its first layer's channels, doubling with depth (paper: 128)
    # --- optimisation ---
    steps: int = 40_000  # training steps, each one D update and one G update (40k × 128 ≈ 100 CIFAR-10 epochs)
    batch_size: int = 128  # real images per step, and as many fakes (paper: 128); also the sampling batch
    lr: float = 2e-4  # Adam's learning rate, for both networks (paper: 2e-4)
    beta1: float = 0.5  # Adam's β₁, below 1 (paper: 0.5, as the usual 0.9 made training oscillate; β₂: 0.999)
    # --- the quality check and best.pt ---
    check: str = "proxy"  # how a check scores samples: proxy (no download, section 5) | fid (fid.py's Inception FID)
    check_every: int = 2000  # steps between quality checks; the best generator so far is kept in best.pt
    check_n: int = 2000  # images a check generates, at least 2 (and real ones for the proxy's reference)
    # --- run ---
    recipe: str = ""  # a measured setting from RECIPES, e.g. mnist (flags given as well win)
    out: str = ""  # run folder ("": runs/dcgan-<recipe or dataset>; --sample: the checkpoint's folder)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast on CPUs with AVX512-BF16 or AMX)
    compile: bool = False  # torch.compile both networks for training (the saved weights are the same)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between log lines (and rows of metrics.csv)
    sample_every: int = 2000  # steps between sample grids, always from the same z
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
    resume: bool = False  # continue training from --ckpt (default: the run folder's ckpt.pt)
    ckpt: str = ""  # the checkpoint to resume or sample (RUN/best.pt: the best generator)
    # --- generation ---
    sample: bool = False  # do not train: write --num-samples PNGs from --ckpt's generator
    num_samples: int = 64  # images that --sample writes
    fid: int = 0  # with --sample: the FID of this many samples against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; pytorch-fid's file for paper numbers)


# What parse_args allows besides finite numbers >= 0: the choices of a text, and flags >= 1 or <= 1
CHOICES = {"check": ["proxy", "fid"], "device": ["auto", "cuda", "cpu", "mps"], "precision": ["auto", "fp32", "bf16"]}
COUNTS = ("latent", "g_channels", "d_channels", "steps", "batch_size", "check_every", "check_n", "log_every",
          "sample_every", "ckpt_every", "num_samples")
FRACTIONS = ("beta1",)
ARCH_FIELDS = ("dataset", "image_size", "latent", "g_channels", "d_channels")  # what a checkpoint fixes: read from it

# Measured recipes: --recipe NAME sets these flags (times, scores and how they were found: docs/dcgan.md).
# Without a recipe, every default above is the paper's CIFAR-10 setting.
RECIPES = {"mnist": dict(dataset="mnist", g_channels=64, d_channels=64, steps=6000, check_every=250, ckpt_every=500,
                         sample_every=500, precision="bf16", device="cpu")}  # benchmarks/compare.py's cpu-mnist


# >>> shared: flags
def parse_args(argv=None) -> Config:
    """The flags as a Config: a --recipe replaces the defaults, and flags given as well win."""
    helps = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"{PROG}: {message} (see --help)")  # one line, not the usage
    for f in dataclasses.fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=f.type, choices=list(RECIPES) if f.name == "recipe" else CHOICES.get(f.name))
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                            help=helps[f.name].replace("%", "%%") + f" (default: {f.default!r})", **kind)
    parser.set_defaults(**RECIPES.get(parser.parse_args(argv).recipe, {}))
    cfg = Config(**vars(parser.parse_args(argv)))
    for name, value in dataclasses.asdict(cfg).items():  # numbers: finite and >= 0 (--label: >= -1)
        low, high = (1 if name in COUNTS else -1 if name == "label" else 0), (1 if name in FRACTIONS else math.inf)
        if type(value) in (int, float) and not (math.isfinite(value) and low <= value <= high):
            parser.error(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {value}")
    return cfg
# <<< shared: flags


# 2. Data: the whole training set as one tensor in [-1, 1] ==========================================
# >>> shared: data
def get_data(cfg):
    """The training set as one float tensor (N, C, H, W) in [-1, 1], and its labels (N,) or None.
    Small image datasets fit in memory (CIFAR-10 is 0.6 GB as float32), so there is no DataLoader:
    a batch is one indexing operation, on whatever device the tensor lives."""
    if cfg.dataset in TORCHVISION:  # downloaded by torchvision
        images, labels = read_torchvision(cfg.dataset, cfg.data_root)
    elif os.path.isdir(cfg.dataset):  # a folder of images, or of class subfolders of images
        images, labels = read_folder(cfg.dataset)
    elif cfg.dataset.endswith(".npy") and os.path.isfile(cfg.dataset):
        images, labels = read_npy(cfg.dataset), read_npy(cfg.labels, True) if getattr(cfg, "labels", "") else None
    else:
        sys.exit(f"{PROG}: --dataset {cfg.dataset} is not {', '.join(TORCHVISION)}, a folder or a .npy file")
    x = torch.as_tensor(images)  # uint8 (N, H, W) or (N, H, W, C)
    x = (x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
    if x.shape[1] not in (1, 3) or len(x) < 2 or labels is not None and len(labels) != len(x):
        sys.exit(f"{PROG}: {cfg.dataset} must hold 2 or more grey or RGB images, (N, H, W) or (N, H, W, C), "
                 f"and a label for each if it has labels; got images of shape {tuple(images.shape)}")
    if cfg.image_size and cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True).clamp(-1, 1)
    return x.contiguous(), None if labels is None else torch.as_tensor(np.asarray(labels)).long()


TORCHVISION = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IMAGES = (".png", ".jpg", ".jpeg", ".bmp")


def read_torchvision(name: str, root: str):
    """A torchvision dataset's training split: uint8 pixels (N, H, W[, C]) and labels (N,)."""
    try:
        dataset = getattr(torchvision.datasets, TORCHVISION[name])(root, train=True, download=True)
    except Exception as e:  # offline: say which files to put where
        where = os.path.join(root, "" if name == "cifar10" else TORCHVISION[name] + "/raw")
        files = "cifar-10-python.tar.gz" if name == "cifar10" else "train-images-idx3-ubyte and train-labels-idx1-ubyte"
        sys.exit(f"{PROG}: cannot download {name} ({type(e).__name__}); put {files} in {where} and run again")
    return np.asarray(dataset.data), np.asarray(dataset.targets)


def read_folder(folder: str):
    """The images of a folder, or of its subfolders, one per class (torchvision's ImageFolder layout: the
    sorted subfolders are classes 0, 1, ...), as uint8 (N, H, W[, 3]), resized to the first one's width."""
    from PIL import Image
    files, labels = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGES)), None
    if not files:
        try:
            files, labels = zip(*torchvision.datasets.ImageFolder(folder).samples)
        except (FileNotFoundError, ValueError):
            sys.exit(f"{PROG}: no images ({', '.join(IMAGES)}) in {folder}, nor in subfolders of it, one per class")
    pictures = []
    for path in files:
        try:
            with Image.open(path) as p:  # 16-bit grey ("I;16") is scaled to 8 bits, which convert() would clip
                pictures.append(Image.fromarray((np.asarray(p) / 257).astype(np.uint8)) if p.mode.startswith("I")
                                else p.convert("L" if p.mode in ("1", "L") else "RGB"))
        except OSError as e:
            sys.exit(f"{PROG}: cannot read image {path}: {e}")
    mode, size = "L" if all(p.mode == "L" for p in pictures) else "RGB", pictures[0].width
    return np.stack([np.asarray(p.convert(mode).resize((size, size), Image.BICUBIC)) for p in pictures]), labels


def read_npy(path: str, labels: bool = False) -> np.ndarray:
    """A .npy of images (N, H, W) or (N, H, W, C), uint8 pixels or floats in [0, 1]; or, for --labels, of
    integer labels (N,) or one-hot rows (N, K), as the 16x16 Sprites set ships them."""
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        sys.exit(f"{PROG}: cannot read {path} as a numpy array: {e}")
    if labels:
        x = x.argmax(1) if x.ndim == 2 else x
        if x.ndim != 1 or x.dtype.kind not in "iu" or x.min(initial=0) < 0:
            sys.exit(f"{PROG}: --labels {path} must hold integers 0, 1, ... (N,) or one-hot rows (N, K)")
        return x
    if x.ndim not in (3, 4) or x.dtype != np.uint8 and not (x.dtype.kind == "f" and ((0 <= x) & (x <= 1)).all()):
        sys.exit(f"{PROG}: {path} must hold images (N, H, W[, C]), uint8 or floats in [0, 1]; got {x.dtype} {x.shape}")
    return x if x.dtype == np.uint8 else (x * 255).round().astype(np.uint8)
# <<< shared: data


# 3. Model: the generator and the discriminator (Radford et al. Sec. 3 and Fig. 1) ==================
def layer_plan(image_size: int):
    """(start, doublings): G starts at start×start and doubles the size `doublings` times.
    32 -> (4, 3), 28 -> (7, 2), 16 -> (4, 2), 64 -> (4, 4): halve while the half is still ≥ 4."""
    start, doublings = image_size, 0
    while start % 2 == 0 and start // 2 >= 4:
        start, doublings = start // 2, doublings + 1
    if doublings == 0:
        sys.exit(f"{PROG}: image size {image_size} is not an even size of 8 px or more: use --image-size 16, 28 or 32")
    return start, doublings


def build_model(cfg: Config, image_channels: int):
    """(G, D) for cfg's image size (Radford et al. Sec. 3 and Fig. 1), initialised as in their Sec. 4."""
    start, doublings = layer_plan(cfg.image_size)
    # G(z): z (B, latent, 1, 1) -> image (B, C, S, S) in [-1, 1]. Transposed convolutions, each doubling the
    # size, with BatchNorm and ReLU; tanh on the output, no BatchNorm there. The first layer takes z as a
    # 1x1 image: a start×start kernel on it is a fully connected layer, reshaped to start×start.
    widths = [cfg.g_channels * 2 ** i for i in reversed(range(doublings))]  # 32 px, width 128: [512, 256, 128]
    G = [nn.ConvTranspose2d(cfg.latent, widths[0], start, 1, 0, bias=False)]  # (B, widths[0], start, start)
    for a, b in zip(widths, widths[1:] + [image_channels]):  # kernel 4, stride 2, padding 1: twice the size
        G += [nn.BatchNorm2d(a), nn.ReLU(), nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)]  # (B, b, 2s, 2s)
    G = nn.Sequential(*G, nn.Tanh())  # bounded output, like the data in [-1, 1]
    # D(x): image (B, C, S, S) -> logit (B,), D = σ(logit) = P(real). Strided convolutions (no pooling),
    # BatchNorm and LeakyReLU(0.2); no BatchNorm on the input layer. The last layer sees the whole
    # start×start map: a fully connected layer to one logit (no sigmoid here: the loss takes logits).
    widths = [cfg.d_channels * 2 ** i for i in range(doublings)]  # 32 px, width 128: [128, 256, 512]
    D = [nn.Conv2d(image_channels, widths[0], 4, 2, 1, bias=False)]  # (B, widths[0], S/2, S/2)
    for a, b in zip(widths, widths[1:]):  # (B, a, s, s) -> (B, b, s/2, s/2)
        D += [nn.LeakyReLU(0.2), nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b)]
    D = nn.Sequential(*D, nn.LeakyReLU(0.2), nn.Conv2d(widths[-1], 1, start, 1, 0, bias=False), nn.Flatten(0))
    # Sec. 4: weights from N(0, 0.02); BatchNorm scales from N(1, 0.02) and shifts 0, as in their code
    # (a scale near 0 would switch the layer off)
    for layer in [*G.modules(), *D.modules()]:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
    return G, D


# 4. Objective: the minimax game (Goodfellow et al. Eq. 1), with BCE on logits ======================
# Eq. 1:  min_G max_D V(D, G) = E_x[log D(x)] + E_z[log(1 − D(G(z)))]
# With D = σ(ℓ) for a logit ℓ, BCE-with-logits(ℓ, y) = −[y log σ(ℓ) + (1−y) log(1 − σ(ℓ))],
# computed as softplus without ever taking log(0): the stable way to write both logs.
def discriminator_loss(D, real, fake):
    """D's side of Eq. 1, as a loss to minimise: −log D(x) − log(1 − D(G(z))). Also returns the
    logits, for the D(x) and D(G(z)) columns of metrics.csv."""
    # real and fake in separate batches: BatchNorm normalises each on its own (as in the paper's code)
    logits_real, logits_fake = D(real), D(fake)  # (B,), (B,)
    # −log D(x) = BCE(ℓ_real, 1);  −log(1 − D(G(z))) = BCE(ℓ_fake, 0)
    loss = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real)) \
        + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return loss, logits_real, logits_fake


def generator_loss(D, fake):
    """G's side, non-saturating (Goodfellow et al. Sec. 3): minimise −log D(G(z)) instead of
    log(1 − D(G(z))). Same fixed point, but strong gradients early on, when D rejects every
    fake and log(1 − D(G(z))) is flat."""
    logits_fake = D(fake)  # (B,)
    # −log D(G(z)) = BCE(ℓ_fake, 1): G is scored as if its fakes were labelled real
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


def game_step(G, D, optimizer_g, optimizer_d, real, z, bf16: bool) -> torch.Tensor:
    """One step of the game (Goodfellow et al. Algorithm 1, k = 1): D ascends V(D, G), then G descends it.
    Returns loss_d, loss_g, D(x) and D(G(z)) (batch means) as one tensor, left on the device."""
    with torch.autocast(real.device.type, torch.bfloat16, enabled=bf16):
        fake = G(z)  # (B, C, H, W)
        # (1) D: one Adam step on −[log D(x) + log(1 − D(G(z)))]; detach(): this step moves D only
        loss_d, logits_real, logits_fake = discriminator_loss(D, real, fake.detach())
    optimizer_d.zero_grad(set_to_none=True)
    loss_d.backward()
    optimizer_d.step()
    # (2) G: one Adam step on −log D(G(z)), scored by the D just updated. The gradient flows through D
    #     into G; D's weights are frozen for this pass (their gradients would be thrown away anyway),
    #     which spares about half of D's backward.
    D.requires_grad_(False)
    with torch.autocast(real.device.type, torch.bfloat16, enabled=bf16):
        loss_g = generator_loss(D, fake)
    optimizer_g.zero_grad(set_to_none=True)
    loss_g.backward()
    optimizer_g.step()
    D.requires_grad_(True)
    # D(x) → 1 with D(G(z)) → 0 means D wins; both near 0.5 is the game's equilibrium
    return torch.stack([loss_d, loss_g, logits_real.sigmoid().mean(), logits_fake.sigmoid().mean()]).detach().float()


# 5. Sampler, and the quality check that picks the best generator ===================================
@torch.no_grad()
def generate(G, cfg: Config, n: int, device, generator, batch_statistics: bool = False) -> torch.Tensor:
    """n images G(z), z ~ N(0, I) from `generator`, in batches of --batch-size: (n, C, H, W) in [-1, 1] on the
    host. BatchNorm uses the running statistics of training (eval mode): an image depends on its own z only.
    batch_statistics (the check's mode): each batch normalised by its own statistics, on a copy of G."""
    model = copy.deepcopy(G).train() if batch_statistics else G.eval()
    z = torch.randn(n, cfg.latent, 1, 1, generator=generator, device=device)  # (n, latent, 1, 1)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        images = [model(z[i:i + cfg.batch_size]).float().cpu() for i in range(0, n, cfg.batch_size)]
    G.train()  # back to training mode, which the loop needs
    return torch.cat(images)  # (n, C, H, W)


# The proxy: FID (Heusel et al. 2017) compares Gaussians fitted to Inception features of real and generated
# images, and Inception weights are a download. The proxy takes the same Fréchet distance in the features of
# φ, a small conv net with random weights drawn once from seed 0 and never trained: the same φ for every run,
# step and machine, so its values compare across a run's checkpoints. Random conv features respond to edges,
# strokes and their layout, so the distance falls as samples get sharper, better placed and more varied. It
# is NOT an Inception FID: it knows no digit or cat, and its values mean nothing next to published FIDs.
def proxy(real: torch.Tensor, device):
    """The function images -> fid.py's Fréchet distance between Gaussians fitted to φ(images) and φ(real)."""
    import fid  # fid.py, beside this file
    phi = nn.Sequential(nn.Conv2d(real.shape[1], 32, 3, 1, 1), nn.ReLU(),  # (B, 32, H, W)
                        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, H/2, W/2)
                        nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),  # (B, 128, H/4, W/4)
                        nn.AdaptiveAvgPool2d(2), nn.Flatten()).to(device).requires_grad_(False)  # (B, 512):
    generator = torch.Generator().manual_seed(0)  # four quadrants keep the layout. φ's weights: seed 0, always
    for conv in phi[0:6:2]:  # He-normal, N(0, 2/fan_in): keeps the activations' scale layer to layer
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / fan_in))
        conv.bias.zero_()

    def stats(images):  # μ and Σ of φ(images) in float64, on the host (MPS has no float64): (512,), (512, 512)
        features = torch.cat([phi(images[i:i + 500].to(device).float()).cpu().double()
                              for i in range(0, len(images), 500)])  # (N, 512)
        return features.mean(0).numpy(), torch.cov(features.T).numpy()
    reference = stats(real)
    return lambda images: fid.frechet_distance(*stats(images), *reference)


def quality_check(cfg: Config, data: torch.Tensor, device, best: dict):
    """check(G, step, run): --check-n samples from the same z every time, scored against --check-n fixed training
    images by the proxy (or --check fid: fid.py's FID); printed, a row of quality.csv; True for a new best G."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:cfg.check_n]  # its own seed
    score = proxy(data[pick.to(data.device)], device) if cfg.check == "proxy" else lambda x: run_fid(cfg, x)

    def check(G, step: int, run: dict) -> bool:
        images = generate(G, cfg, cfg.check_n, device, torch.Generator(device).manual_seed(cfg.seed + 1),
                          batch_statistics=True)  # (the check's mode: see generate() and docs/dcgan.md)
        if not images.isfinite().all():  # a diverged G (its checkpoint is not saved)
            diverged(run, step, "the generator's samples are NaN or infinite")
        value = score(images)  # lower is better
        new = value < best["best_value"]
        best.update(dict(best_value=value, best_step=step) if new else {}, checks=best["checks"] + [[step, value]])
        # quality.csv, rewritten whole from best["checks"], which checkpoints hold: after --resume, no stale rows
        with open(os.path.join(run["out"], "quality.csv"), "w", newline="") as f:
            csv.writer(f).writerows([["step", cfg.check], *best["checks"]])
        print(f"step {step} check: {cfg.check} {value:.4g} (best {best['best_value']:.4g}, step {best['best_step']})")
        return new
    return check


# 6. Train: the game (Goodfellow et al. Algorithm 1, k = 1), then the plumbing it calls =============
def train(cfg: Config) -> None:
    """Goodfellow et al.'s Algorithm 1 with one D step per G step, and Adam as in Radford et al.: repeat {
    x ~ data, z ~ N(0, I); one step of D on −[log D(x) + log(1 − D(G(z)))]; one step of G on −log D(G(z)) }."""
    # --- plumbing: the device, the run folder, --resume ---
    device = pick_device(cfg.device)
    cfg, out, state = open_run(cfg, ("generator", "discriminator", "optimizer_g", "optimizer_d", "checks"))
    data = get_data(cfg)[0].to(device)  # (N, C, H, W) in [-1, 1], resident on the device
    cfg.image_size = data.shape[-1]

    # --- core: the two networks and their optimisers (one each: they pull opposite ways) ---
    torch.manual_seed(cfg.seed)  # the initial weights, then every batch of x and z
    G, D = (net.to(device) for net in build_model(cfg, data.shape[1]))
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)  # β₂ as in the paper; fused: one kernel
    opt_g, opt_d = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    best = dict(best_value=math.inf, best_step=0, checks=[])  # the best check so far, and every check's value
    check = quality_check(cfg, data, device, best)  # (section 5) before the restore: building φ draws random numbers
    # --resume: the weights, the optimisers, the step, the random state and the checks, as they were
    step = restore(state, generator=G, discriminator=D, optimizer_g=opt_g, optimizer_d=opt_d) if state else 0
    start_files(out, cfg, step)  # OUT/config.json, OUT/samples/
    best.update({k: state[k] for k in best} if state else {})  # (open_run refuses checkpoints without checks)
    train_G, train_D = (torch.compile(net) if cfg.compile else net for net in (G, D))  # (the same weights)
    bf16 = use_bf16(cfg, device)
    millions = [sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D)]
    print(f"G {millions[0]:.2f}M + D {millions[1]:.2f}M parameters | {len(data)} images | {device} "
          f"{'bf16' if bf16 else 'fp32'} | check: {cfg.check} | {out}")
    stop = catch_stop_signals()  # Ctrl-C and SIGTERM ask the loop to save and stop
    run = dict(out=out, start=time.time(), last=time.time(), step=step, saved=state and step, resumed=state and step)
    sums = torch.zeros(4, device=device)  # loss_d, loss_g, D(x), D(G(z)), summed on the device between log lines

    while step < cfg.steps:
        # --- core: one step of the game (section 4) ---
        real = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
        z = torch.randn(cfg.batch_size, cfg.latent, 1, 1, device=device)  # (B, latent, 1, 1), z ~ N(0, I)
        sums += game_step(train_G, train_D, opt_g, opt_d, real, z, bf16)
        step += 1

        # --- plumbing: the log, grids from fixed z, the quality check, checkpoints, a clean stop on Ctrl-C ---
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = (sums / (step - run["step"])).tolist()  # the means since the last log line
            log_line(run, step, cfg, **dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means)))
            sums.zero_()
        paused = time.time()  # grids and checks are not training: they are kept off the img/s clock
        if step % cfg.sample_every == 0 or step == cfg.steps:  # 64 images from the same z: grids show progress
            save_image(generate(G, cfg, 64, device, torch.Generator(device).manual_seed(cfg.seed)) * 0.5 + 0.5,
                       os.path.join(out, "samples", f"step_{step:07d}.png"))  # [-1, 1] -> [0, 1]
        new_best = (step % cfg.check_every == 0 or step == cfg.steps) and check(G, step, run)  # True: a new best
        run["last"] += time.time() - paused
        if "by" in stop or new_best or step % cfg.ckpt_every == 0 or step == cfg.steps:
            ckpt = dict(generator=G.state_dict(), discriminator=D.state_dict(), config=dataclasses.asdict(cfg),
                        optimizer_g=opt_g.state_dict(), optimizer_d=opt_d.state_dict(), step=step, script=PROG, **best)
            save_checkpoint(run, step, ckpt, device)  # ckpt.pt: the latest state (written at a new best too)
            save_checkpoint(run, step, ckpt, device, "best.pt") if new_best else None  # the same: resumable
            if "by" in stop:  # Ctrl-C or SIGTERM, and the checkpoint is saved: stop (finish() says how to go on)
                break
    finish(stop, step, out)  # after Ctrl-C or SIGTERM: how to continue, and the end of the program


# >>> shared: plumbing
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"{PROG}: --device {name} is not available here; use --device cpu or auto")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 on GPUs that have it
    return torch.device(name)


def use_bf16(cfg, device: torch.device) -> bool:
    return cfg.precision == "bf16" or cfg.precision == "auto" and device.type == "cuda"


def open_run(cfg, needs: tuple):
    """cfg (on --resume, with what the checkpoint fixes), the run folder (--out: written) and the state of
    --ckpt or the run's ckpt.pt (--resume: read; else None). A run's ckpt.pt is only overwritten by itself."""
    name = cfg.recipe or os.path.basename(cfg.dataset.rstrip("/")).removesuffix(".npy")
    out = cfg.out or (os.path.dirname(cfg.ckpt) if cfg.resume and cfg.ckpt else f"runs/{PROG}-{name}")
    path = os.path.join(out, "ckpt.pt")
    if os.path.exists(path) and not (cfg.resume and os.path.realpath(path) == os.path.realpath(cfg.ckpt or path)):
        sys.exit(f"{PROG}: {path} exists; pass --resume to continue it, or --out NEW_FOLDER to start anew")
    state = load_checkpoint(cfg.ckpt or path, needs + ("config", "step", "rng_cpu")) if cfg.resume else None
    if state:  # the networks are the checkpoint's (a field it predates: the default)
        cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, getattr(Config, k)) for k in ARCH_FIELDS})
    return cfg, out, state


def start_files(out: str, cfg, step: int) -> None:
    """OUT/samples/ and OUT/config.json, once the data is read. On --resume, the rows of metrics.csv after the
    checkpoint's step go (they are logged again), through a temporary file: no kill can shorten the log."""
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    path = os.path.join(out, "metrics.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and (not r[0].isdigit() or int(r[0]) <= step)]
        with open(path + ".tmp", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        os.replace(path + ".tmp", path)


def load_checkpoint(path: str, needs: tuple) -> dict:
    """A checkpoint of a script in READS that holds `needs`; anything else is one line."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        sys.exit(f"{PROG}: checkpoint {path} " + ("is empty (0 bytes)" if os.path.isfile(path) else "does not exist"))
    try:  # weights_only: a checkpoint from a stranger cannot run code when it is loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"{PROG}: cannot read checkpoint {path}: {type(e).__name__}: {[*str(e).splitlines(), '?'][0]}")
    state = state if isinstance(state, dict) else {}
    script, missing = state.get("script", PROG), [k for k in needs if k not in state]  # (old ones have no name)
    if script not in READS or missing:
        sys.exit(f"{PROG}: {path} is not a checkpoint that {PROG}.py can use: "
                 + (f"{script}.py wrote it" if script not in READS else f"it lacks {', '.join(missing)}"))
    return state


def save_checkpoint(run: dict, step: int, state: dict, device, name: str = "ckpt.pt") -> None:
    """OUT/name with the random state, if every weight is finite (a diverged run keeps its last good
    checkpoint). Written to a temporary file, then renamed: a kill or a full disk never leaves a broken one."""
    if not all(w.isfinite().all() for v in state.values() if isinstance(v, dict) for w in v.values()
               if torch.is_tensor(w) and w.is_floating_point()):
        diverged(run, step, "weights are NaN or infinite")
    state |= dict(rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda"
                  else torch.empty(0))
    path = os.path.join(run["out"], name)
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        os.path.exists(path + ".tmp") and os.remove(path + ".tmp")
        sys.exit(f"{PROG}: cannot write {path} ({str(e).splitlines()[0]}); " + (
            f"ckpt.pt holds step {run['saved']}: free some space and continue with --resume" if run["saved"]
            else "no checkpoint was written: free some space and start again"))
    run["saved"] = step if name == "ckpt.pt" else run["saved"]


def restore(state: dict, **objects) -> int:
    """--resume: load each object (a network, an optimiser, a generator) and the random state; the step.
    An optimiser keeps the --lr given now, so that a run can continue with a lower one."""
    for name, thing in objects.items():
        lrs = [group["lr"] for group in getattr(thing, "param_groups", [])]
        thing.set_state(state[name]) if isinstance(thing, torch.Generator) else thing.load_state_dict(state[name])
        for group, lr in zip(getattr(thing, "param_groups", []), lrs):
            group["lr"] = lr
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda", torch.empty(0)).numel():
        torch.cuda.set_rng_state(state["rng_cuda"])
    print(f"resumed at step {state['step']}")
    return state["step"]


def catch_stop_signals() -> dict:
    """Ctrl-C (SIGINT) and SIGTERM set stop["by"]: the loop saves a checkpoint, then ends. A second Ctrl-C
    stops at once (as Python does: KeyboardInterrupt)."""
    stop = {}

    def handler(number, frame):
        stop["by"] = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    return stop


def diverged(run: dict, step: int, what: str) -> None:
    """A NaN or infinite loss or weight: one line saying what is left, and what to do."""
    advice = (f"{run['out']}/ckpt.pt holds step {run['saved']}: continue with --resume and a lower --lr"
              if run["saved"] else "no checkpoint was written: start again with a lower --lr")
    if run["saved"] and run["saved"] == run["resumed"]:  # it diverged again from the checkpoint it resumed
        advice = (f"it was resumed from {run['out']}/ckpt.pt (step {run['saved']}), which is finite but does not "
                  "train: start anew with --out NEW_FOLDER and a lower --lr")
    sys.exit(f"{PROG}: training diverged by step {step} ({what}); {advice}")


def log_line(run: dict, step: int, cfg, **values) -> None:
    """One log line: checked for NaN, printed with the speed and the ETA, and a row of OUT/metrics.csv."""
    if not all(math.isfinite(v) for v in values.values()):
        diverged(run, step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    speed = (step - run["step"]) * cfg.batch_size / (time.time() - run["last"])  # images per second
    print(f"step {step:>7}/{cfg.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())
          + f" | {speed:.1f} img/s | ETA {(cfg.steps - step) * cfg.batch_size / speed / 3600:.2f} h", flush=True)
    with open(os.path.join(run["out"], "metrics.csv"), "a", newline="") as f:  # a header if the file is new
        csv.writer(f).writerows(([["step", *values, "images_per_s", "elapsed_s"]] if not f.tell() else []) + [
            [step, *(f"{v:.6g}" for v in values.values()), f"{speed:.1f}", f"{time.time() - run['start']:.1f}"]])
    run.update(last=time.time(), step=step)


def finish(stop: dict, step: int, out: str) -> None:
    """The end of a run: after Ctrl-C or SIGTERM, one line says how to continue."""
    if "by" in stop:
        sys.exit(f"{PROG}: stopped by {stop['by']} at step {step}, saved to {out}/ckpt.pt; continue with the same "
                 "command and --resume")
    print(f"done: {step} steps, the run is in {out}")


def run_fid(cfg, images: torch.Tensor) -> float:
    """FID of generated images against the training set (fid.py, imported only when --fid asks for it)."""
    import fid
    reference = f"{cfg.dataset}-train" if cfg.dataset in TORCHVISION else cfg.dataset
    value = fid.score(images, reference, device=str(pick_device(cfg.device)), weights=cfg.fid_weights or None,
                      data_root=cfg.data_root)
    print(f"FID {value:.2f} ({len(images)} samples vs {reference}, Inception: {cfg.fid_weights or 'torchvision'})")
    return value


def run_main(main) -> None:
    """main(parse_args()), with what a user's machine can throw (a full disk, a read-only folder) as one line."""
    try:
        main(parse_args())
    except OSError as e:
        sys.exit(f"{PROG}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        sys.exit(f"{PROG}: interrupted")
# <<< shared: plumbing


# 7. Main: train, or generate from a checkpoint (--sample) ==========================================
def main(cfg: Config) -> None:
    if cfg.check_n < 2 or cfg.beta1 >= 1:  # (a covariance needs two images; Adam needs β₁ < 1)
        sys.exit(f"{PROG}: need --check-n >= 2 and --beta1 < 1; got --check-n {cfg.check_n}, --beta1 {cfg.beta1}")
    if cfg.sample and not cfg.ckpt:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/best.pt (or RUN/ckpt.pt, written by training)")
    sample_mode(cfg) if cfg.sample else train(cfg)


def sample_mode(cfg: Config) -> None:
    """--sample: --num-samples PNGs in OUT/generated/ (one file each, as FID tools read them), a grid, the
    speed, and --fid. OUT: --out, else the checkpoint's folder. The previous version's checkpoints load too."""
    device = pick_device(cfg.device)
    state = load_checkpoint(cfg.ckpt, ("generator", "discriminator", "config", "step"))
    cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, getattr(Config, k)) for k in ARCH_FIELDS})
    G, _ = build_model(cfg, next(iter(state["discriminator"].values())).shape[1])  # D's first layer: (w, C, 4, 4)
    G.load_state_dict({k.removeprefix("net."): v for k, v in state["generator"].items()})  # (older: G.net.0.weight)
    out, n, start = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt)), max(cfg.num_samples, cfg.fid), time.time()
    images = generate(G.to(device), cfg, n, device, torch.Generator(device).manual_seed(cfg.seed))
    seconds = time.time() - start  # generate() returns images on the host: the clock is honest
    os.makedirs(os.path.join(out, "generated"), exist_ok=True)
    for i, image in enumerate(images * 0.5 + 0.5):  # [-1, 1] -> [0, 1]: 000000.png, 000001.png, …
        save_image(image, os.path.join(out, "generated", f"{i:06d}.png"))
    save_image(images[:64] * 0.5 + 0.5, os.path.join(out, "generated_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s) from step {state['step']} -> {out}/generated/")
    cfg.fid and run_fid(cfg, images[:cfg.fid])


if __name__ == "__main__":
    run_main(main)
