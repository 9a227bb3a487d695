"""vae.py: a convolutional Variational Autoencoder in one file.

Kingma & Welling 2014, "Auto-Encoding Variational Bayes", https://arxiv.org/abs/1312.6114

A VAE is a latent-variable model: draw a code z ~ p(z) = N(0, I), decode it into an image x ~ p(x|z).
Its likelihood p(x) = ∫ p(x|z) p(z) dz cannot be computed, so an encoder q(z|x) guesses which codes
could have made x, and both nets are trained together on the evidence lower bound (ELBO, Eq. 3):
    log p(x)  ≥  E_q(z|x)[log p(x|z)]  −  KL(q(z|x) ‖ p(z))          (reconstruction − KL)
The first term asks the code to keep what the decoder needs to redraw x; the second asks every
image's codes to look like draws from the prior, so that decoding a fresh z ~ N(0, I) gives a new image.

    python vae.py                  # CIFAR-10, Bernoulli decoder, 40k steps of 128: a GPU job
    python vae.py --recipe mnist   # MNIST on 2 CPU cores: test −ELBO 97.4 nats (times, scores: docs/vae.md)
    python vae.py --sample --ckpt runs/vae-mnist/ckpt.pt   # 64 prior samples as PNGs (--reconstruct: test images)
Sections: 1. Config  2. Data (+ the test split)  3. Model (encoder, decoder)  4. Objective (the ELBO)
          5. Sampler (prior samples, reconstructions, interpolations)  6. Train  7. Main

Where we depart from the paper (and why)
  - Convolutional encoder and decoder instead of one-hidden-layer MLPs, Adam instead of Adagrad, and
    batches drawn with replacement: what VAEs since do. The model, the objective, the estimator are the paper's.
  - The Gaussian decoder's density is replaced by its mass on each 8-bit pixel's bin (as Ho et al. 2020
    do at their last step): the −ELBO is in nats of the 8-bit image, and bits/dim bound −log₂ p(x).
  - The default decoder is Bernoulli on grey levels, as in pytorch/examples (its prior samples beat the
    Gaussian's on MNIST: docs/vae.md). Its −ELBO is then a cross-entropy, comparable with theirs only.
"""
import argparse
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vae": names runs and error messages
READS = ("vae",)  # the scripts whose checkpoints this one reads


# 1. Config: every field is a flag (batch_size: --batch-size), its comment the --help text ==========
@dataclasses.dataclass
class Config:
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy of images
    data_root: str = "data"  # where torchvision keeps its datasets (downloaded there if missing)
    image_size: int = 0  # resize the images to this (0: the dataset's own size)
    latent: int = 128  # dimensions of the code z (128, as in "Generating Realistic Images using DDPM")
    channels: int = 32  # channels after the first convolution, doubled at every halving of the image
    likelihood: str = "bernoulli"  # decoder p(x|z): bernoulli (grey levels as probabilities) | gaussian (discretised)
    sigma: float = 0.1  # σ of the Gaussian decoder on the [-1, 1] pixel scale, > 0 (with --learn-sigma: its start)
    learn_sigma: bool = True  # learn σ by the ELBO (one σ for all pixels: a calibrated decoder), else keep it fixed
    beta: float = 1.0  # weight of the KL term in the training loss (1: the ELBO; the test −ELBO always uses 1)
    steps: int = 40_000  # training steps (≈ 100 CIFAR-10 epochs at batch 128, as that project trained)
    batch_size: int = 128  # images per step (128, as in that project); also the sampling batch
    lr: float = 1e-3  # Adam's learning rate (1e-3, as in that project)
    recipe: str = ""  # a measured setting from RECIPES, e.g. mnist (flags given as well win)
    out: str = ""  # run folder ("": runs/vae-<recipe or dataset>; --sample: the checkpoint's folder)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast on CPUs with AVX512-BF16 or AMX)
    compile: bool = False  # torch.compile the loss (the networks' forward pass) for training
    seed: int = 0  # random seed
    log_every: int = 100  # steps between log lines (and rows of metrics.csv)
    sample_every: int = 2000  # steps between sample grids (from the same z) and interpolations between test images
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
    resume: bool = False  # continue training from --ckpt (default: the run folder's ckpt.pt)
    ckpt: str = ""  # the checkpoint to resume or sample
    sample: bool = False  # do not train: write --num-samples PNGs decoded from prior draws z ~ N(0, I)
    reconstruct: bool = False  # with --sample: the reconstructions of the first --num-samples test images instead
    num_samples: int = 64  # images that --sample writes
    fid: int = 0  # with --sample: the FID of this many images against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; pytorch-fid's file for paper numbers)


# What parse_args allows besides finite numbers >= 0: the choices of a text, flags >= 1, flags <= 1 (none)
CHOICES = {"likelihood": ["bernoulli", "gaussian"], "device": ["auto", "cuda", "cpu", "mps"],
           "precision": ["auto", "fp32", "bf16"]}
COUNTS = ("latent", "channels", "steps", "batch_size", "log_every", "sample_every", "ckpt_every", "num_samples")
FRACTIONS, POSITIVE = (), ("sigma",)  # POSITIVE: flags > 0, which main() checks
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "likelihood", "sigma", "learn_sigma")  # a checkpoint's

# Measured recipes: --recipe NAME sets these flags (times and scores: docs/vae.md). Without a recipe, the
# defaults are the CIFAR-10 setting of the student project "Generating Realistic Images using DDPM".
RECIPES = {"mnist": dict(dataset="mnist", likelihood="bernoulli", channels=16, steps=8000, precision="bf16",
                         device="cpu", log_every=200, sample_every=1000, ckpt_every=1000)}  # compare.py's cpu-mnist


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


# 2. Data: the whole training set as one tensor in [-1, 1], and a held-out test split ===============
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


# >>> shared: test_data
def get_test_data(cfg, data: torch.Tensor) -> tuple:
    """(training images, test images), both (N, C, H, W) in [-1, 1], given get_data's images: torchvision's
    test split (10,000 images for MNIST, Fashion-MNIST, CIFAR-10), or a folder's or a .npy's last 10%."""
    if cfg.dataset not in TORCHVISION:
        return data[:-max(1, len(data) // 10)], data[-max(1, len(data) // 10):]
    try:  # torchvision fetched the test split with the training set (download=True: only a check)
        test = getattr(torchvision.datasets, TORCHVISION[cfg.dataset])(cfg.data_root, train=False, download=True)
    except Exception as e:
        sys.exit(f"{PROG}: no {cfg.dataset} test split in {cfg.data_root} ({type(e).__name__}); put it there")
    x = torch.as_tensor(np.asarray(test.data))  # uint8 (N, H, W) or (N, H, W, C), as get_data reads them
    x = (x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
    if x.shape[-1] != data.shape[-1]:  # --image-size
        x = F.interpolate(x, size=data.shape[-2:], mode="bilinear", antialias=True).clamp(-1, 1)
    return data, x.contiguous()
# <<< shared: test_data


# 3. Model: a convolutional encoder q(z|x) and decoder p(x|z) =======================================
class VAE(nn.Module):
    """Encoder: strided convolutions halve the image while it is even and larger than 4 (28 → 14 → 7,
    32 → 16 → 8 → 4), then a linear layer gives (μ, log σ²) of q(z|x). The decoder mirrors it with
    transposed convolutions and outputs, per pixel, Bernoulli logits or the Gaussian mean."""

    def __init__(self, image_channels=3, image_size=32, latent=128, channels=32, likelihood="bernoulli",
                 sigma=0.1, learn_sigma=True):
        super().__init__()
        size, chs = image_size, [channels]
        while size % 2 == 0 and size > 4:
            size, chs = size // 2, chs + [2 * chs[-1]]
        self.latent, self.likelihood, self.hidden = latent, likelihood, (chs[-1], size, size)
        down, up = [nn.Conv2d(image_channels, channels, 3, padding=1), nn.SiLU()], []  # (B, ch, H, W)
        for c_in, c_out in zip(chs, chs[1:]):  # each level: (B, c_in, h, w) -> (B, c_out, h/2, w/2) and back
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU(),
                     nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU()]
            up = [nn.SiLU(), nn.ConvTranspose2d(c_out, c_in, 4, stride=2, padding=1),  # the mirror image, in front
                  nn.SiLU(), nn.Conv2d(c_in, c_in, 3, padding=1)] + up
        self.encoder = nn.Sequential(*down, nn.Flatten())  # (B, c·h·w) with c, h, w = self.hidden
        self.to_stats = nn.Linear(math.prod(self.hidden), 2 * latent)  # -> (B, 2·latent): μ and log σ²
        self.from_latent = nn.Linear(latent, math.prod(self.hidden))  # z (B, latent) -> (B, c·h·w)
        self.decoder = nn.Sequential(*up, nn.SiLU(), nn.Conv2d(channels, image_channels, 3, padding=1))
        if likelihood == "gaussian":  # log σ of p(x|z): one number for all pixels, learned or fixed
            self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)), requires_grad=learn_sigma)

    def encode(self, x):  # x: (B, C, H, W) in [-1, 1]
        return self.to_stats(self.encoder(x)).chunk(2, dim=1)  # μ, log σ²: (B, latent) each

    def decode(self, z):  # z: (B, latent)
        return self.decoder(self.from_latent(z).view(-1, *self.hidden))  # (B, C, H, W): logits or means

    def forward(self, x, eps):  # eps: (B, latent) drawn from N(0, I)
        mu, logvar = self.encode(x)
        # The reparameterisation trick (Sec. 2.4):  z = μ + σ ⊙ ε,  ε ~ N(0, I),  σ = exp(½ log σ²).
        # z is a draw from q(z|x) = N(μ, σ²), but the randomness sits in ε, outside the network: z is
        # now a differentiable function of μ and σ, so the gradient of log p(x|z) reaches the encoder.
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar


def build_model(cfg: Config, image_channels: int) -> VAE:
    return VAE(image_channels, cfg.image_size, cfg.latent, cfg.channels, cfg.likelihood, cfg.sigma, cfg.learn_sigma)


# 4. Objective: the ELBO, each term in closed form or from one sample of z ==========================
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) in nats per image, for q = N(μ, diag σ²): (B, latent) -> (B,)."""
    # Appendix B:  −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²), exact, so no sampling noise in this term
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per image for p(x_i|z) = Bernoulli(sigmoid(logits_i)): (B, C, H, W) -> (B,). The target is the
    grey level (x + 1)/2 ∈ [0, 1], as in pytorch/examples' VAE: exact for binary images, else a cross-entropy."""
    # log p(x|z) = Σ_i  x_i log p_i + (1 − x_i) log(1 − p_i)    (Appendix C.1)
    return -F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").sum((1, 2, 3))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor):
    """log p(x|z) per image for 8-bit pixels x ∈ {−1, −1 + 2/255, …, 1}: (B, C, H, W) -> (B,).
    Each pixel's probability is the mass of N(mean, σ²) on its bin [x − 1/255, x + 1/255], the two end
    bins stretching to ±∞ (Ho et al. 2020, Eq. 13). A probability, not a density: it is at most 1,
    so −log p(x|z) ≥ 0 and a learned σ cannot shrink without limit on constant (e.g. black) pixels."""
    inv_sigma = torch.exp(-log_sigma)
    upper = torch.where(x > 1 - 1e-3, 1e4, (x + 1 / 255 - mean) * inv_sigma)  # bin edges in units of σ;
    lower = torch.where(x < -1 + 1e-3, -1e4, (x - 1 / 255 - mean) * inv_sigma)  # 1e4 stands in for ±∞
    # P = Φ(upper) − Φ(lower), and  log P = log Φ(u) + log(1 − Φ(l)/Φ(u)). For a bin above the mean we
    # use the mirror image Φ(−lower) − Φ(−upper): floating point keeps Φ's far tail, but not 1 − tiny
    u, l = torch.where(x > mean, -lower, upper), torch.where(x > mean, -upper, lower)
    log_u, log_l = torch.special.log_ndtr(u), torch.special.log_ndtr(l)
    return (log_u + torch.log(-torch.expm1(log_l - log_u))).sum((1, 2, 3))


def vae_loss(model: VAE, x: torch.Tensor, beta: float = 1.0, generator=None):
    """The training loss, from one z per image (Eq. 10's estimator): the −ELBO averaged over the batch, with the
    KL weighted by β (Higgins et al. 2017; β = 1: the ELBO itself); and its terms −log p(x|z) and KL, (B,) each,
    in nats: summed over pixels and latents, not averaged, so that the ELBO is a log-probability of the image."""
    eps = torch.randn(x.shape[0], model.latent, device=x.device, generator=generator)  # ε ~ N(0, I)
    out, mu, logvar = model(x, eps)  # out: (B, C, H, W), mu and logvar: (B, latent)
    # reconstruction:  E_q(z|x)[log p(x|z)] ≈ log p(x|z),  z = μ + σ ⊙ ε   (one sample, as in the paper)
    reconstruction = bernoulli_log_likelihood(x, out.float()) if model.likelihood == "bernoulli" else \
        discretized_gaussian_log_likelihood(x, out.float(), model.log_sigma.float())
    # regulariser:  KL(q(z|x) ‖ N(0, I)), in closed form
    kl = kl_divergence(mu.float(), logvar.float())
    # −ELBO_β = −log p(x|z) + β · KL(q(z|x) ‖ p(z))
    return (-reconstruction + beta * kl).mean(), -reconstruction, kl


@torch.no_grad()
def held_out_elbo(model: VAE, cfg: Config, test: torch.Tensor, device) -> None:
    """The test −ELBO (β = 1, fp32, one z per image from a fixed seed) in nats per image and bits/dim, printed."""
    generator, sums = torch.Generator(device).manual_seed(cfg.seed), torch.zeros(2, dtype=torch.float64)
    for x in test.split(cfg.batch_size):
        _, nll, kl = vae_loss(model.eval(), x.to(device), 1.0, generator)
        sums += torch.stack([nll.sum(), kl.sum()]).cpu().double()  # float64 on the host (not on MPS)
    nll, kl = (sums / len(test)).tolist()
    # bits/dim = −ELBO / (C·H·W · ln 2): with the Gaussian decoder an upper bound on −log₂ p(x) per pixel
    # (per sub-pixel for RGB); with the Bernoulli on grey levels a cross-entropy only, comparable with nothing
    bits = (nll + kl) / (test[0].numel() * math.log(2))
    print(f"test −ELBO {nll + kl:.2f} nats/image (reconstruction {nll:.2f} + KL {kl:.2f}) = {bits:.4f} bits/dim "
          f"on {len(test)} test images, {cfg.likelihood} decoder")


# 5. Sampler: decode prior draws, reconstruct, interpolate ==========================================
@torch.no_grad()
def decode(model: VAE, cfg: Config, z: torch.Tensor, device) -> torch.Tensor:
    """The images we show for codes z (N, latent), on the host: the decoder's mean E[x|z] in [-1, 1].
    For z ~ N(0, I), new images: ancestral sampling (Sec. 2.1)."""
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        out = torch.cat([model.decode(z.to(device)).float().cpu() for z in z.split(cfg.batch_size)])
    return out.sigmoid() * 2 - 1 if model.likelihood == "bernoulli" else out.clamp(-1, 1)


@torch.no_grad()
def reconstruct(model: VAE, cfg: Config, images: torch.Tensor, device) -> torch.Tensor:
    """x → μ(x) → E[x|z = μ]: the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    return decode(model, cfg, torch.cat([model.encode(x.to(device))[0] for x in images.split(cfg.batch_size)]), device)


@torch.no_grad()
def interpolate(model: VAE, cfg: Config, images: torch.Tensor, device, steps: int = 8) -> torch.Tensor:
    """A row from each image a to the next, b: a, the decoded codes (1 − t) μ(a) + t μ(b) for t from 0 to 1 (at 0
    and 1: their reconstructions), b. Smooth rows show a latent space without holes between the training codes."""
    a, b, mu_a = images, images.roll(-1, 0), model.encode(images.to(device))[0]  # (P, C, H, W), (P, latent)
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]  # (1, steps, 1)
    middle = decode(model, cfg, ((1 - t) * mu_a[:, None] + t * mu_a.roll(-1, 0)[:, None]).flatten(0, 1), device)
    return torch.cat([a[:, None], middle.view(len(a), steps, *a.shape[1:]), b[:, None]], 1).flatten(0, 1)


# 6. Train: the ELBO step (Kingma & Welling's Algorithm 1), then the plumbing only it calls =========
def train(cfg: Config) -> None:
    """Algorithm 1 (AEVB) with Adam: repeat { x ~ data, ε ~ N(0, I); one gradient step on
    −ELBO = −log p(x|z) + β · KL(q(z|x) ‖ N(0, I)) at z = μ(x) + σ(x) ⊙ ε }; then the test −ELBO."""
    # --- plumbing: the device, the run folder, --resume, the data ---
    device = pick_device(cfg.device)
    cfg, out, state = open_run(cfg, ("model", "optimizer"))  # state: the checkpoint to resume, or None
    data, test = get_test_data(cfg, get_data(cfg)[0])  # (N, C, H, W) in [-1, 1]; the test split stays on the host
    data, cfg.image_size = data.to(device), data.shape[-1]  # resident on the device

    # --- core: the network and the optimiser ---
    torch.manual_seed(cfg.seed)  # the initial weights, then every batch and every ε
    model = build_model(cfg, data.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel for all weights
    # --resume: the weights, the optimiser, the step and the random number generators, as they were
    step = restore(state, model=model, optimizer=optimizer) if state else 0
    start_files(out, cfg, step)  # OUT/config.json, OUT/samples/
    loss_fn, bf16 = torch.compile(vae_loss) if cfg.compile else vae_loss, use_bf16(cfg, device)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(data)} images + {len(test)} "
          f"to test | {cfg.likelihood} decoder, β={cfg.beta} | {device} {'bf16' if bf16 else 'fp32'} | {out}")
    stop = catch_stop_signals()  # Ctrl-C and SIGTERM ask the loop to save and stop
    run = dict(out=out, start=time.time(), last=time.time(), step=step, saved=state and step, resumed=state and step)
    sums = torch.zeros(3, device=device)  # loss, reconstruction and KL, summed on the device between log lines

    while step < cfg.steps:
        # --- core: one step of Algorithm 1 ---
        model.train()
        x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            # −ELBO_β = −log p(x|z) + β · KL(q(z|x) ‖ p(z)),  z = μ + σ ⊙ ε  (one ε per image)
            loss, nll, kl = loss_fn(model, x, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        # --- plumbing: the log, grids from fixed z, checkpoints, a clean stop on Ctrl-C ---
        sums += torch.stack([loss, nll.mean(), kl.mean()]).detach()
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = dict(zip(("loss", "reconstruction", "kl"), (sums / (step - run["step"])).tolist()))
            sigma = dict(sigma=model.log_sigma.exp().item()) if cfg.likelihood == "gaussian" else {}
            log_line(run, step, cfg, **means, **sigma)
            sums.zero_()
        if step % cfg.sample_every == 0 or step == cfg.steps:  # the same z every time: the grids show progress
            z = torch.randn(64, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed))
            save_image(decode(model.eval(), cfg, z, device) * 0.5 + 0.5, f"{out}/samples/step_{step:07d}.png")
            save_image(interpolate(model, cfg, test[:8], device) * 0.5 + 0.5, f"{out}/interpolation.png", nrow=10)
        if "by" in stop or step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                            config=dataclasses.asdict(cfg), script=PROG), device)
        if "by" in stop:
            break
    if "by" not in stop:
        held_out_elbo(model, cfg, test, device)  # how well the model explains images it never saw
    finish(stop, step, out)


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


# 7. Main: train, or generate from a checkpoint (--sample, --reconstruct) ===========================
# >>> shared: vae_main
def main(cfg: Config) -> None:
    for name in [k for k in POSITIVE if getattr(cfg, k) <= 0]:  # a Gaussian's σ: 0 would divide by zero
        sys.exit(f"{PROG}: --{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.sample and not cfg.ckpt or cfg.reconstruct and not cfg.sample:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/ckpt.pt (written by training), --reconstruct needs --sample")
    sample_mode(cfg) if cfg.sample else train(cfg)


def sample_mode(cfg: Config) -> None:
    """--sample: --num-samples PNGs in OUT/generated/ (one file each, as FID tools read them) and a grid; with
    --reconstruct, in OUT/reconstructed/, of the first test images. OUT: --out, else the checkpoint's folder."""
    device, state = pick_device(cfg.device), load_checkpoint(cfg.ckpt, needs=("model", "config"))
    cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, getattr(Config, k)) for k in ARCH_FIELDS})
    # the encoder's first convolution (the first 4-d weight) reads the images: its input channels are theirs
    model = build_model(cfg, next(w for w in state["model"].values() if w.dim() == 4).shape[1]).eval().to(device)
    if {k: v.shape for k, v in state["model"].items()} != {k: v.shape for k, v in model.state_dict().items()}:
        sys.exit(f"{PROG}: {cfg.ckpt} holds other networks than {PROG}.py builds (e.g. vaegan's --arch v1)")
    model.load_state_dict(state["model"])  # (the previous version's checkpoints too: the same keys)
    out, n, start = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt)), max(cfg.num_samples, cfg.fid), time.time()
    if cfg.reconstruct:  # the test split as training reads it (the same --data-root): at most all of it
        test = get_test_data(cfg, get_data(cfg)[0])[1][:n]
        images, name = reconstruct(model, cfg, test, device), "reconstructed"
        grid = torch.cat([test[:32], images[:32]])  # 4 rows of test images above their reconstructions
    else:  # z ~ N(0, I), drawn on the host: the same images on any device
        images = decode(model, cfg, torch.randn(n, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed)),
                        device)
        name, grid = "generated", images[:64]
    seconds = time.time() - start  # the images are on the host: the device has finished, the clock is honest
    os.makedirs(os.path.join(out, name), exist_ok=True)
    for i, image in enumerate(images * 0.5 + 0.5):  # [-1, 1] -> [0, 1]: 000000.png, 000001.png, …
        save_image(image, os.path.join(out, name, f"{i:06d}.png"))
    save_image(grid * 0.5 + 0.5, os.path.join(out, f"{name}_grid.png"))
    print(f"{len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} img/s) -> {out}/{name}/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid])
# <<< shared: vae_main


if __name__ == "__main__":
    run_main(main)
