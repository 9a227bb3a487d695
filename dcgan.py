"""dcgan.py: Deep Convolutional GAN in one file, at the data's own size (32, 28 or 16 px).

Radford, Metz & Chintala 2015, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", https://arxiv.org/abs/1511.06434
on the GAN game of Goodfellow et al. 2014, https://arxiv.org/abs/1406.2661

Two networks play a game. The generator G turns noise z ~ N(0, I) into an image; the
discriminator D gives the probability that an image is real. D learns to tell the two apart,
G learns to fool D. Nothing says when to stop: the losses do not fall as samples improve, and
DCGAN's samples often get worse late in training. So this script measures sample quality every
--check-every steps and keeps the best generator in best.pt, beside the latest in ckpt.pt.

Commands
  python dcgan.py                           # CIFAR-10 at 32x32, ~100 epochs (40k steps of 128).
                                            # (FID ≈ 42.7 is often quoted for 32x32 DCGANs; unsourced.)
  python dcgan.py --sample --ckpt runs/dcgan-cifar10/best.pt --num-samples 50000 --fid 50000
  python dcgan.py --dataset mnist --g-channels 64 --d-channels 64 --steps 6000 --precision bf16 ...
        # the CPU recipe (11 min on 2 cores): the exact command and its MNIST score are in README.md

Sections
  1. Config     2. Data     3. Model (G and D)     4. Objective (the minimax game, BCE on logits)
  5. Sampler and the quality check     6. Train     7. Main

Where we depart from the paper (and why)
  - Native 32x32 (the paper's nets are 64x64): the 4x4x1024 layer is dropped, so G goes
    4 -> 8 -> 16 -> 32 with 512, 256, 128 channels (--g-channels 128), and D mirrors it.
    MNIST runs at 28x28 (7 -> 14 -> 28), sprites at 16x16 (4 -> 8 -> 16); no image is resized.
  - The paper picks no model; we keep the one with the best quality check (see Sampler).
  - Batches are drawn uniformly with replacement instead of in shuffled epochs (as in ddpm.py).
"""
import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "dcgan": names runs and error messages


# =============================================================================================
# 1. Config
# =============================================================================================
@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy file
    data_root: str = "data"  # where torchvision datasets are (or will be downloaded)
    image_size: int = 0  # 0: the dataset's own size; otherwise images are resized to this
    # --- model ---
    latent: int = 100  # size of the noise vector z (paper: 100)
    g_channels: int = 128  # generator width: channels of its last hidden layer, doubling towards z (paper: 128)
    d_channels: int = 128  # discriminator width: channels of its first layer, doubling with depth (paper: 128)
    # --- optimisation ---
    steps: int = 40_000  # training steps, each one D update and one G update (40k x 128 ≈ 100 CIFAR-10 epochs)
    batch_size: int = 128  # real images per step, and as many fakes (paper: 128); also the sampling batch
    lr: float = 2e-4  # Adam learning rate of both networks (paper: 2e-4)
    beta1: float = 0.5  # Adam β₁ (paper: 0.5; the usual 0.9 made training oscillate)
    beta2: float = 0.999  # Adam β₂ (paper: 0.999)
    # --- quality check and best model ---
    check: str = "proxy"  # quality check: proxy (built in, no download; see README) | fid (fid.py, Inception)
    check_every: int = 2000  # steps between quality checks; the best one so far is kept as best.pt
    check_n: int = 2000  # generated images per check (and real ones for the proxy's reference)
    # --- run ---
    out: str = ""  # run directory ("": runs/dcgan-<dataset>)
    device: str = "auto"  # auto | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile both networks for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (drawn from the same fixed z)
    ckpt_every: int = 2000  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or sample from (RUN/best.pt: the best generator)
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs from --ckpt's generator
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate this many images and print their FID (needs fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; a path; see fid.py)


CHOICES = {"check": ("proxy", "fid"), "device": ("auto", "cuda", "cpu", "mps"),
           "precision": ("auto", "fp32", "bf16")}
ARCH_FIELDS = ("dataset", "image_size", "latent", "g_channels", "d_channels")  # fixed by a checkpoint


# >>> shared: argparse
class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we print one line
        sys.exit(f"{PROG}: {message} (see --help)")


def parse_args(argv=None) -> Config:
    """Every Config field becomes a flag; its comment in the class above is the --help text."""
    helps = dict(re.findall(r"^\s+(\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    parser = OneLineErrorParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) \
            else {"type": type(f.default), "choices": CHOICES.get(f.name)}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=helps.get(f.name), **kind)
    return Config(**vars(parser.parse_args(argv)))
# <<< shared: argparse


# =============================================================================================
# 2. Data
# =============================================================================================
# >>> shared: data
TORCHVISION_FILES = {  # what to put where when torchvision cannot download (offline machines)
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)", ""),
    "mnist": ("MNIST", "train-images-idx3-ubyte and train-labels-idx1-ubyte (.gz is fine)", "MNIST/raw/"),
    "fashion-mnist": ("FashionMNIST", "train-images-idx3-ubyte and train-labels-idx1-ubyte (.gz is fine)",
                      "FashionMNIST/raw/"),
}


def get_data(cfg: Config) -> torch.Tensor:
    """The whole training set as one float tensor (N, C, H, W) in [-1, 1].

    Small image datasets fit in memory (CIFAR-10 is 0.6 GB as float32), so we skip the
    DataLoader: a batch is one indexing operation, on whatever device the tensor lives."""
    name = cfg.dataset
    if name in TORCHVISION_FILES:
        import torchvision
        cls, files, sub = TORCHVISION_FILES[name]
        try:  # no network needed when the files are already there
            ds = getattr(torchvision.datasets, cls)(cfg.data_root, train=True, download=False)
        except RuntimeError:
            try:
                ds = getattr(torchvision.datasets, cls)(cfg.data_root, train=True, download=True)
            except Exception as e:  # offline: say exactly what to put where
                sys.exit(f"{PROG}: cannot download {name} ({type(e).__name__}); "
                         f"put {files} in {os.path.join(cfg.data_root, sub)} and run again")
        images = torch.as_tensor(np.asarray(ds.data))  # uint8, (N, H, W) or (N, H, W, C)
    elif os.path.isdir(name):
        from PIL import Image
        paths = sorted(p for p in os.listdir(name) if p.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
        if not paths:
            sys.exit(f"{PROG}: no .png/.jpg/.bmp images in folder {name}")
        try:
            pils = [Image.open(os.path.join(name, p)) for p in paths]
            grey = all(im.mode in ("L", "1") for im in pils)
            size = cfg.image_size or pils[0].size[0]  # folders are resized to one square size
            images = torch.as_tensor(np.stack([np.asarray(im.convert("L" if grey else "RGB").resize(
                (size, size), Image.BICUBIC)) for im in pils]))
        except OSError as e:
            sys.exit(f"{PROG}: cannot read an image in {name}: {e}")
    elif name.endswith(".npy") and os.path.isfile(name):
        try:
            images = torch.as_tensor(np.load(name))  # (N, H, W), (N, H, W, C) or (N, C, H, W)
        except (ValueError, OSError) as e:
            sys.exit(f"{PROG}: cannot read {name} as a numpy array: {str(e).splitlines()[0]}")
        if images.dtype != torch.uint8:  # floats: [0, 1], or [-1, 1] if any value is negative
            images = images.float()
            images = ((images + 1) / 2 if images.min() < 0 else images) * 255
    else:
        sys.exit(f"{PROG}: --dataset {name!r} is not cifar10, mnist, "
                 f"fashion-mnist, an existing folder of images or an existing .npy file")
    if images.dim() == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        sys.exit(f"{PROG}: {name} must hold at least 2 grey or RGB images, "
                 f"got shape {tuple(images.shape)}")
    x = images.float() / 127.5 - 1  # uint8 [0, 255] -> float [-1, 1]   (N, C, H, W)
    if cfg.image_size and cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1).contiguous()
# <<< shared: data


# =============================================================================================
# 3. Model: generator and discriminator (Radford et al. Sec. 3 and Fig. 1)
# =============================================================================================
# --- core: the two networks ---
def layer_plan(image_size: int):
    """(start, doublings): G starts at start×start and doubles the size `doublings` times.
    32 -> (4, 3), 28 -> (7, 2), 16 -> (4, 2), 64 -> (4, 4): halve while the half is still ≥ 4."""
    start, doublings = image_size, 0
    while start % 2 == 0 and start // 2 >= 4:
        start, doublings = start // 2, doublings + 1
    if doublings == 0:
        sys.exit(f"{PROG}: image size {image_size} is not an even size of at least 8 px (G doubles from "
                 f"a start of 4 px or more); use --image-size 16, 28, 32 or 64")
    return start, doublings


class Generator(nn.Module):
    """G(z): z (B, latent) -> image (B, C, S, S) in [-1, 1]. Transposed convolutions, each
    doubling the size, with BatchNorm and ReLU; tanh on the output, no BatchNorm there."""

    def __init__(self, latent: int, image_channels: int, image_size: int, width: int):
        super().__init__()
        start, doublings = layer_plan(image_size)
        widths = [width * 2 ** i for i in reversed(range(doublings))]  # 32 px, width 128: [512, 256, 128]
        # z as a 1x1 image; a start×start kernel on it is a fully connected layer, reshaped:
        # (B, latent, 1, 1) -> (B, widths[0], start, start)
        layers = [nn.ConvTranspose2d(latent, widths[0], start, 1, 0, bias=False),
                  nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for a, b in zip(widths, widths[1:]):  # kernel 4, stride 2, padding 1: exactly twice the size
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False),  # (B, a, s, s) -> (B, b, 2s, 2s)
                       nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], image_channels, 4, 2, 1, bias=False),  # -> (B, C, S, S)
                   nn.Tanh()]  # bounded output, like the data in [-1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z: (B, latent)
        return self.net(z[:, :, None, None])  # (B, C, S, S)


class Discriminator(nn.Module):
    """D(x): image (B, C, S, S) -> logit (B,), D = σ(logit) = P(real). Strided convolutions (no
    pooling), BatchNorm and LeakyReLU(0.2); no BatchNorm on the input layer."""

    def __init__(self, image_channels: int, image_size: int, width: int):
        super().__init__()
        start, doublings = layer_plan(image_size)
        widths = [width * 2 ** i for i in range(doublings)]  # 32 px, width 128: [128, 256, 512]
        layers = [nn.Conv2d(image_channels, widths[0], 4, 2, 1, bias=False),  # (B, C, S, S) -> (B, w, S/2, S/2)
                  nn.LeakyReLU(0.2)]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False),  # (B, a, s, s) -> (B, b, s/2, s/2)
                       nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-1], 1, start, 1, 0, bias=False)]  # (B, w_last, start, start) -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # x: (B, C, S, S)
        return self.net(x).flatten()  # (B,) logits; no sigmoid here: the loss takes logits


def init_weights(module: nn.Module) -> None:
    """Radford et al. Sec. 4: weights from N(0, 0.02). BatchNorm scales from N(1, 0.02) and
    shifts 0, as in their code (a scale near 0 would switch the layer off)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_model(cfg: Config, image_channels: int):
    """(G, D) for cfg's image size, initialised as in the paper."""
    G = Generator(cfg.latent, image_channels, cfg.image_size, cfg.g_channels)
    D = Discriminator(image_channels, cfg.image_size, cfg.d_channels)
    return G.apply(init_weights), D.apply(init_weights)


# =============================================================================================
# 4. Objective: the minimax game (Goodfellow et al. Eq. 1), with BCE on logits
# =============================================================================================
# Eq. 1:  min_G max_D V(D, G) = E_x[log D(x)] + E_z[log(1 − D(G(z)))]
# With D = σ(ℓ) for a logit ℓ, BCE-with-logits(ℓ, y) = −[y log σ(ℓ) + (1−y) log(1 − σ(ℓ))],
# computed as softplus without ever taking log(0): the stable way to write both logs.
def discriminator_loss(D, real, fake):
    """D's side of Eq. 1, as a loss to minimise: −log D(x) − log(1 − D(G(z))). Also returns the
    logits, for the D(x) and D(G(z)) columns of metrics.csv."""
    # real and fake in separate batches: BatchNorm normalises each on its own (as in the paper)
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


# =============================================================================================
# 5. Sampler, and the quality check that picks the best model
# =============================================================================================
SAMPLER_FIELDS = ()  # nothing but the checkpoint describes a DCGAN sample (for run_fid's label)


@torch.no_grad()
def generate(model, cfg: Config, n: int, shape, device, generator) -> torch.Tensor:
    """n images G(z), z ~ N(0, I) from `generator`, in batches of --batch-size: (n, C, H, W) in [-1, 1].
    G runs in eval mode: BatchNorm uses its running statistics, so an image depends on its own
    z only (not on the rest of the batch), and generating changes nothing in G."""
    training = model.training
    model.eval()
    z = torch.randn(n, cfg.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        images = torch.cat([model(z[i:i + cfg.batch_size]).float() for i in range(0, n, cfg.batch_size)])
    model.train(training)
    return images.cpu()  # (n, C, H, W)


# --- core: the built-in quality check ("proxy"): a Fréchet distance in fixed random features ---
# FID (Heusel et al. 2017) compares Gaussians fitted to Inception features of real and generated
# images. Inception weights are a download; this check needs none. φ below is a small conv net
# with random weights drawn once from seed 0 and never trained: the same φ for every run, step
# and machine, so its values compare across checkpoints of a run (and across runs on one dataset).
# Random conv features respond to edges, strokes and their layout, so the distance falls as
# samples get sharper, better placed and more varied; it is NOT an Inception FID, it does not
# know what a digit or a cat is, and its values mean nothing next to published FIDs.
def feature_net(image_channels: int) -> nn.Sequential:
    """φ: (B, C, H, W) -> (B, 512), random fixed weights (He-normal, seed 0)."""
    net = nn.Sequential(nn.Conv2d(image_channels, 32, 3, 1, 1), nn.ReLU(),  # (B, 32, H, W)
                        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, H/2, W/2)
                        nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),  # (B, 128, H/4, W/4)
                        nn.AdaptiveAvgPool2d(2), nn.Flatten())  # (B, 512): four quadrants keep the layout
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Conv2d):  # N(0, 2/fan_in) keeps the activations' scale layer to layer
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2 / fan_in))
                layer.bias.zero_()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def feature_stats(net, images: torch.Tensor, device):
    """μ and Σ of φ(images) in float64: (512,), (512, 512)."""
    features = torch.cat([net(images[i:i + 500].to(device).float()).double().cpu()
                          for i in range(0, len(images), 500)])  # (N, 512)
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), Heusel et al. Eq. 6:
    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½   (the same trace as (Σ₁ Σ₂)^½,
    but of a symmetric matrix, so eigvalsh gives it stably)."""
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = vectors * values.clamp(min=0).sqrt() @ vectors.T  # Σ₁^½
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    return max(((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross).item(), 0.0)


# =============================================================================================
# 6. Train
# =============================================================================================
# >>> shared: plumbing
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"{PROG}: --device {name} is not available here; use --device cpu or auto")
    return torch.device(name)


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves a broken ckpt.pt."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        sys.exit(f"{PROG}: checkpoint {path} does not exist; train first, or pass --ckpt RUN/ckpt.pt")
    try:  # weights_only: a checkpoint from a stranger cannot run code when loaded
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"{PROG}: cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def open_metrics(path: str, step: int, header: list):
    """metrics.csv, open for appending rows. On resume, rows logged after the checkpoint's step
    are dropped (they will be logged again), so the file always tells one consistent history."""
    rows = list(csv.reader(open(path))) if step and os.path.exists(path) else []
    f = open(path, "w", newline="")
    csv.writer(f).writerows([header] + [r for r in rows[1:] if int(r[0]) <= step])
    return f


def save_grid(x: torch.Tensor, path: str, nrow: int = 8) -> None:
    import torchvision
    torchvision.utils.save_image(x.float().cpu() * 0.5 + 0.5, path, nrow=nrow)  # [-1, 1] -> [0, 1]


def save_pngs(x: torch.Tensor, folder: str) -> None:
    """One PNG per image (000000.png, ...), the format FID tools read."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # drop an earlier run's images, or an FID tool would count them
        if re.fullmatch(r"\d{6}\.png", old):
            os.remove(os.path.join(folder, old))
    pixels = ((x.float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i, p in enumerate(pixels):  # (H, W, C) uint8
        Image.fromarray(p[:, :, 0] if p.shape[2] == 1 else p).save(os.path.join(folder, f"{i:06d}.png"))


def stack_progression(folder: str, out_path: str) -> None:
    """Stack the first row of every samples/step_N.png into one image: samples over training."""
    from PIL import Image
    grids = [Image.open(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
             if re.fullmatch(r"step_\d+\.png", f)]
    height = (grids[0].width - 2) // 8 + 2  # save_grid: 8 tiles a row with 2-pixel padding
    canvas = Image.new("RGB", (grids[0].width, height * len(grids)))
    for i, grid in enumerate(grids):
        canvas.paste(grid.crop((0, 0, grid.width, height)), (0, i * height))
    canvas.save(out_path)


def run_fid(cfg: Config, images: torch.Tensor, run_dir: str, step: int) -> float:
    """FID of generated images against the training set, printed and appended to fid.csv.
    fid.py is imported only here: the scripts need it only when --fid is asked for."""
    import fid
    reference = f"{cfg.dataset}-train" if cfg.dataset in TORCHVISION_FILES else cfg.dataset
    value = fid.score(images, reference, device=str(pick_device(cfg.device)), batch_size=50,
                      weights=cfg.fid_weights or None, data_root=cfg.data_root)
    sampler = f"{PROG} " + " ".join(f"{k}={getattr(cfg, k)}" for k in SAMPLER_FIELDS)
    weights = cfg.fid_weights or "torchvision IMAGENET1K_V1"
    print(f"FID {value:.2f} ({len(images)} samples, {sampler}, vs {reference}, Inception weights: {weights})")
    path = os.path.join(run_dir, "fid.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "n", "fid", "sampler", "weights"])
        writer.writerow([step, len(images), f"{value:.4f}", sampler, weights])
    return value
# <<< shared: plumbing


def train(cfg: Config) -> None:
    # --- plumbing: device, run directory, checkpoint to resume, data ---
    device = pick_device(cfg.device)
    run_dir = cfg.out or f"runs/{PROG}-{os.path.basename(cfg.dataset.rstrip('/')).removesuffix('.npy')}"
    ckpt_path, best_path = cfg.ckpt or os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "best.pt")
    if not cfg.resume and os.path.exists(ckpt_path):  # never overwrite a trained model by accident
        sys.exit(f"{PROG}: {ckpt_path} exists; pass --resume to continue that run or --out NEW_DIR to start anew")
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    if state:  # the networks are fixed by the checkpoint
        cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls/convs
    data = get_data(cfg).to(device)  # (N, C, H, W) in [-1, 1], resident on the device
    cfg.image_size = data.shape[-1]
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- core: the two networks and their optimisers (one each: they pull opposite ways) ---
    G, D = (net.to(device) for net in build_model(cfg, data.shape[1]))
    optimizer_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    optimizer_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # The quality check's fixed parts: the same z at every check (seed + 1), and for the proxy
    # φ and the statistics of a fixed set of real images (drawn with their own generator). φ is
    # built before the saved random state is restored, so a resumed run draws what the
    # uninterrupted one drew.
    if cfg.check == "proxy":
        phi = feature_net(data.shape[1]).to(device)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:cfg.check_n]
        reference = feature_stats(phi, data[pick.to(device)], device)
    step, best_value, best_step = 0, math.inf, 0
    if state:
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        optimizer_d.load_state_dict(state["optimizer_d"])
        step, best_value, best_step = state["step"], state["best_value"], state["best_step"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"])
        print(f"resumed from {ckpt_path} at step {step}")
    train_G, train_D = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)  # share the weights
    millions = [sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D)]
    print(f"G {millions[0]:.2f}M + D {millions[1]:.2f}M parameters | {len(data)} images {tuple(data.shape[1:])} | "
          f"{device} | {'bf16' if use_bf16(cfg, device) else 'fp32'} | quality check: {cfg.check}")

    def checkpoint(path):
        save_checkpoint(path, {
            "generator": G.state_dict(), "discriminator": D.state_dict(), "optimizer_g": optimizer_g.state_dict(),
            "optimizer_d": optimizer_d.state_dict(), "step": step, "best_value": best_value,
            "best_step": best_step, "config": dataclasses.asdict(cfg), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0)})

    def sample_grid():  # the same z every time: the grids show progress, not luck
        generator = torch.Generator(device).manual_seed(cfg.seed)
        save_grid(generate(G, cfg, 64, data.shape[1:], device, generator),
                  os.path.join(run_dir, "samples", f"step_{step:07d}.png"))
        stack_progression(os.path.join(run_dir, "samples"), os.path.join(run_dir, "progression.png"))

    def quality_check() -> float:  # lower is better
        generator = torch.Generator(device).manual_seed(cfg.seed + 1)
        images = generate(G, cfg, cfg.check_n, data.shape[1:], device, generator)
        if cfg.check == "fid":
            return run_fid(cfg, images, run_dir, step)
        return frechet_distance(*feature_stats(phi, images, device), *reference)

    metrics = open_metrics(os.path.join(run_dir, "metrics.csv"), step,
                           ["step", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "elapsed_s"])
    quality = open_metrics(os.path.join(run_dir, "quality.csv"), step,
                           ["step", "check", "value", "best_value", "best_step"])
    writer, quality_writer = csv.writer(metrics), csv.writer(quality)
    sums = torch.zeros(4, device=device)  # Σ loss_d, loss_g, D(x), D(G(z)): on the device until we log
    start, last_time, last_step = time.time(), time.time(), step
    while step < cfg.steps:
        # --- core: one step of the game: D ascends V(D, G), then G descends it ---
        G.train(), D.train()
        real = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W)
        z = torch.randn(cfg.batch_size, cfg.latent, device=device)  # (B, latent), z ~ N(0, I)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            fake = train_G(z)  # (B, C, H, W)
            # (1) discriminator: one Adam step on −[log D(x) + log(1 − D(G(z)))]. detach(): this
            #     step moves D only; no gradient flows back into G.
            loss_d, logits_real, logits_fake = discriminator_loss(train_D, real, fake.detach())
        optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        optimizer_d.step()
        # (2) generator: one Adam step on −log D(G(z)), scored by the D just updated. The
        #     gradient flows through D into G; D's weights are frozen for this pass (their
        #     gradients would be thrown away anyway), which spares about half of D's backward.
        D.requires_grad_(False)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            loss_g = generator_loss(train_D, fake)
        optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizer_g.step()
        D.requires_grad_(True)
        # D(x) → 1 and D(G(z)) → 0 means D wins; both near 0.5 is the game's equilibrium
        sums += torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(logits_real.detach().float()).mean(),
                             torch.sigmoid(logits_fake.detach().float()).mean()])
        step += 1

        # --- plumbing: log, sample, check quality (keep the best), checkpoint ---
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_d_mean, loss_g_mean, d_real, d_fake = (sums / (step - last_step)).tolist()
            if not math.isfinite(loss_d_mean + loss_g_mean):
                sys.exit(f"{PROG}: the loss became {loss_d_mean + loss_g_mean} by step {step}; lower --lr and run "
                         f"again with --resume (it continues from the last checkpoint, written before this)")
            now = time.time()
            speed = (step - last_step) * cfg.batch_size / (now - last_time)
            print(f"step {step:>7}/{cfg.steps} | D loss {loss_d_mean:.3f} | G loss {loss_g_mean:.3f} | "
                  f"D(x) {d_real:.2f} | D(G(z)) {d_fake:.2f} | {speed:7.1f} img/s | "
                  f"ETA {(cfg.steps - step) * cfg.batch_size / speed / 3600:5.2f} h", flush=True)
            writer.writerow([step, f"{loss_d_mean:.6f}", f"{loss_g_mean:.6f}", f"{d_real:.4f}", f"{d_fake:.4f}",
                             f"{speed:.1f}", f"{now - start:.1f}"])
            metrics.flush()
            sums.zero_()
            last_time, last_step = now, step
        if step % cfg.sample_every == 0 or step == cfg.steps:
            sample_grid()
        if step % cfg.check_every == 0 or step == cfg.steps:
            value = quality_check()
            if value < best_value:  # a new best generator: keep it (with everything, so it can resume too)
                best_value, best_step = value, step
                checkpoint(best_path)
            print(f"check at step {step}: {cfg.check} {value:.3f} | best {best_value:.3f} at step {best_step}")
            quality_writer.writerow([step, cfg.check, f"{value:.4f}", f"{best_value:.4f}", best_step])
            quality.flush()
            last_time = time.time()  # the check's time does not count against the training speed
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint(ckpt_path)
    metrics.close(), quality.close()
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; best {cfg.check} {best_value:.3f} "
          f"at step {best_step} (best.pt); run in {run_dir}")
    if cfg.fid:  # the FID of the model we keep: the best one
        G.load_state_dict(load_checkpoint(best_path)["generator"])
        run_fid(cfg, generate(G, cfg, cfg.fid, data.shape[1:], device,
                              torch.Generator(device).manual_seed(cfg.seed + 2)), run_dir, best_step)


# =============================================================================================
# 7. Main: train, or generate from a checkpoint
# =============================================================================================
def load_for_sampling(cfg: Config):
    """The generator of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt)
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["discriminator"]["net.0.weight"].shape[1]  # D's first convolution reads the image
    G, _ = build_model(cfg, channels)
    G.load_state_dict(state["generator"])
    return G.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state["step"]


def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the sampling speed (and FID with --fid)."""
    device = pick_device(cfg.device)
    model, cfg, shape, step = load_for_sampling(cfg)
    run_dir = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt))
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    images = generate(model.to(device), cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed))
    seconds = time.time() - start  # generate() ends by copying to the host: the clock is honest
    save_pngs(images, os.path.join(run_dir, "generated"))
    save_grid(images[:64], os.path.join(run_dir, "generated_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          f"step {step}) -> {run_dir}/generated/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, step)


def main(cfg: Config) -> None:
    for name in ("latent", "g_channels", "d_channels", "steps", "batch_size", "check_every", "log_every",
                 "sample_every", "ckpt_every", "num_samples"):
        if getattr(cfg, name) < 1:
            sys.exit(f"{PROG}: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.check_n < 2:
        sys.exit(f"{PROG}: --check-n must be at least 2 (a covariance needs two images), got {cfg.check_n}")
    if not 0 <= cfg.beta1 < 1 or not 0 <= cfg.beta2 < 1 or cfg.lr <= 0 or cfg.fid < 0:
        sys.exit(f"{PROG}: need 0 <= --beta1 < 1, 0 <= --beta2 < 1, --lr > 0 and --fid >= 0")
    if cfg.sample and not cfg.ckpt:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/best.pt (or RUN/ckpt.pt, written by training)")
    if cfg.sample:
        sample_mode(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main(parse_args())
