"""vaegan.py: the VAE-GAN (a VAE whose reconstruction error is measured by a GAN) in one file.

Larsen, Sønderby, Larochelle & Winther 2016, "Autoencoding beyond pixels using a learned similarity
metric", https://arxiv.org/abs/1512.09300 (their code: github.com/andersbll/autoencoding_beyond_pixels)

A VAE's decoder redraws each pixel, so it hedges: its images are blurry averages. The VAE-GAN measures
the reconstruction error in the features Dis_l of a GAN discriminator's inner layer instead, and trains
the decoder (also the GAN's generator) to make its reconstructions x̃ = Dec(Enc(x)) and its decodings
x_p = Dec(z_p), z_p ~ N(0, I), pass as real. Each network minimises its own loss (γ, w: flags):
    encoder        L_prior + L_llike     L_prior = KL(q(z|x) ‖ N(0, I)),  L_llike = ‖Dis_l(x) − Dis_l(x̃)‖²/2σ²
    decoder        γ · L_llike + w · (−log D(x̃) − log D(x_p))
    discriminator  −L_GAN = −log D(x) − log(1 − D(x̃)) − log(1 − D(x_p))
L_GAN never reaches the encoder, L_llike never reaches D. (Algorithm 1 as printed slips the sign of L_GAN
in the decoder's and D's updates; the rules above are the game the paper describes and its code plays.)

    python vaegan.py --recipe mnist   # MNIST on 2 CPU cores (without a recipe: CIFAR-10, a GPU job)
    python vaegan.py --sample --ckpt runs/vaegan-mnist/ckpt.pt   # 64 prior samples (--reconstruct: test images)
Sections: 1. Config  2. Data (+ the test split)  3. Model (encoder, decoder, discriminator)
          4. Objective (the three losses, and which network each reaches)  5. Sampler  6. Train  7. Main

Where we depart from the paper and its code (why, and the measurements: docs/vaegan.md)
  - The decoder's adversarial term is non-saturating, as in dcgan.py; the terms of L_GAN weigh 1 : 1 : 1, as in
    Algorithm 1 (the code: 0.5 : 0.25 : 0.25); no update is skipped (the code gates them); Adam, not RMSProp.
  - Dis_l of x and x̃ from ONE batch (model/aegan.py): D's BatchNorm precedes Dis_l, so only then do they compare
    alike. D's logits from three batches, as DCGAN trains D: one joined batch let D win (MNIST-FID 358, docs/).
  - σ of L_llike is a flag (--feature-sigma; the paper's: 1): features read before BatchNorm have no set scale.
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
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.utils import save_image

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vaegan": names runs and error messages
READS = ("vaegan",)  # the scripts whose checkpoints this one reads


# 1. Config: every field is a flag (batch_size: --batch-size), its comment the --help text ==========
@dataclasses.dataclass
class Config:
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy of images
    data_root: str = "data"  # where torchvision keeps its datasets (downloaded there if missing)
    image_size: int = 0  # resize the images to this (0: the dataset's own size)
    latent: int = 128  # dimensions of the code z (the paper: 128 on faces)
    channels: int = 64  # width of the encoder and decoder at full resolution, doubled at every halving
    d_channels: int = 64  # width of the discriminator, the same way
    d_dense: int = 512  # units of D's dense layer before the logit (the paper's 512); 0: the logit straight from Dis_l
    gamma: float = 1e-3  # γ: weight of L_llike against the adversarial term in the decoder's loss
    feature_sigma: float = 1.0  # σ of L_llike's Gaussian on Dis_l, > 0 (the paper: 1): the encoder's L_prior : L_llike
    adv_weight: float = 0.1  # w: weight of the adversarial term in the decoder's loss
    steps: int = 40_000  # training steps, each one update of all three networks (≈ 100 CIFAR-10 epochs)
    batch_size: int = 128  # real images per step (and as many x̃ and x_p); also the sampling batch
    lr: float = 2e-4  # Adam's learning rate, for all three networks (DCGAN's 2e-4)
    beta1: float = 0.5  # Adam's β₁ (DCGAN's 0.5)
    recipe: str = ""  # a measured setting from RECIPES, e.g. mnist (flags given as well win)
    out: str = ""  # run folder ("": runs/vaegan-<recipe or dataset>; --sample: the checkpoint's folder)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast on CPUs with AVX512-BF16 or AMX)
    compile: bool = False  # torch.compile the losses (the networks' forward pass) for training
    seed: int = 0  # random seed
    log_every: int = 100  # steps between log lines (and rows of metrics.csv)
    sample_every: int = 2000  # steps between sample grids (from the same z) and reconstructions of test images
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
    resume: bool = False  # continue training from --ckpt (default: the run folder's ckpt.pt)
    ckpt: str = ""  # the checkpoint to resume or sample
    sample: bool = False  # do not train: write --num-samples PNGs decoded from prior draws z ~ N(0, I)
    reconstruct: bool = False  # with --sample: the reconstructions of the first --num-samples test images instead
    num_samples: int = 64  # images that --sample writes
    fid: int = 0  # with --sample: the FID of this many images against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; pytorch-fid's file for paper numbers)


# What parse_args allows besides finite numbers >= 0: the choices of a text, flags >= 1, flags <= 1
CHOICES = {"device": ["auto", "cuda", "cpu", "mps"], "precision": ["auto", "fp32", "bf16"]}
COUNTS = ("latent", "channels", "d_channels", "steps", "batch_size", "log_every", "sample_every", "ckpt_every",
          "num_samples")
FRACTIONS, POSITIVE = ("beta1",), ("feature_sigma",)  # POSITIVE: flags > 0, which main() checks
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "d_channels", "d_dense")  # what a checkpoint fixes

# Measured recipes: --recipe NAME sets these flags (times, scores and how they were found: docs/vaegan.md).
# Without a recipe, the defaults are the CIFAR-10 setting (γ and w as in docs/compare.md's student project).
RECIPES = {"mnist": dict(dataset="mnist", d_dense=64, feature_sigma=5.0, steps=1800, precision="bf16", device="cpu",
                         log_every=100, sample_every=300, ckpt_every=300)}  # compare.py's cpu-mnist


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


# 3. Model: encoder q(z|x), decoder p(x|z) (= the GAN's generator), discriminator, DCGAN-style ======
def layer_plan(image_size: int, width: int):
    """(side, widths): the networks halve the image down to side × side (28 → 7, 32 → 4), doubling the width."""
    side, widths = image_size, []
    while side % 2 == 0 and side // 2 >= 4:
        side, widths = side // 2, widths + [width * 2 ** len(widths)]  # [width, 2·width, ...], one per halving
    if not widths:
        sys.exit(f"{PROG}: image size {image_size} is not even, or under 8 px; use --image-size 16, 28 or 32")
    return side, widths


def down_path(image_channels: int, widths: list, batchnorm: bool = False) -> list:
    """Strided 4x4 convolutions + LeakyReLU(0.2), one per width, each halving the image. batchnorm: BatchNorm
    after each but the first (DCGAN's discriminator: none on the input)."""
    layers = [nn.Conv2d(image_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, widths[0], S/2, S/2)
    for a, b in zip(widths, widths[1:]):  # (B, a, s, s) -> (B, b, s/2, s/2)
        layers += [nn.Conv2d(a, b, 4, 2, 1, bias=not batchnorm), *[nn.BatchNorm2d(b)] * batchnorm, nn.LeakyReLU(0.2)]
    return layers


def encoder(image_channels: int, side: int, widths: list, latent: int) -> nn.Sequential:
    """q(z|x) = N(μ(x), diag σ²(x)): image (B, C, S, S) -> (B, 2·latent), μ and log σ² side by side. A 1x1 convolution
    first narrows the last map 4x: else the Linear to μ, σ would hold nearly all the weights (28 px: 1.6M of 1.7M)."""
    narrow = max(widths[-1] // 4, 1)
    return nn.Sequential(OrderedDict(  # named parts: the checkpoint's keys are encoder.net.0.weight, ...
        net=nn.Sequential(*down_path(image_channels, widths), nn.Conv2d(widths[-1], narrow, 1), nn.LeakyReLU(0.2),
                          nn.Flatten()),  # (B, narrow · side²)
        to_stats=nn.Linear(narrow * side * side, 2 * latent)))


def decoder(image_channels: int, side: int, widths: list, latent: int) -> nn.Sequential:
    """p(x|z) and the GAN's generator: z (B, latent) -> (B, C, S, S) in [-1, 1]. DCGAN's G: BatchNorm, ReLU, tanh."""
    layers = [nn.ConvTranspose2d(latent, widths[0], side, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    for a, b in zip(widths, widths[1:]):  # (B, a, s, s) -> (B, b, 2s, 2s)
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(OrderedDict(as_image=nn.Unflatten(1, (latent, 1, 1)),  # z as a 1x1 image
                                     net=nn.Sequential(*layers, nn.ConvTranspose2d(widths[-1], image_channels, 4, 2, 1),
                                                       nn.Tanh())))


def discriminator(image_channels: int, side: int, widths: list, dense: int) -> nn.Sequential:
    """Dis(x): image (B, C, S, S) -> logit, D(x) = σ(logit) = P(x is real); the paper's (and its code's) kind of D,
    convolutions with BatchNorm (none on the input). body(x) = Dis_l(x) (B, w, side, side): the last convolution's
    output, read before its BatchNorm as the code reads its layer. head: `dense` units (0: none), then the logit."""
    w = widths[-1]
    return nn.Sequential(OrderedDict(
        body=nn.Sequential(*down_path(image_channels, widths, batchnorm=True), nn.Conv2d(w, w, 3, 1, 1)),
        head=nn.Sequential(nn.BatchNorm2d(w), nn.LeakyReLU(0.2), *(  # Dis_l -> (B, dense) -> (B, 1)
            [nn.Flatten(), nn.Linear(w * side * side, dense), nn.LeakyReLU(0.2), nn.Linear(dense, 1)] if dense
            else [nn.Conv2d(w, 1, side)]))))  # no dense layer: a linear map of Dis_l (after BatchNorm): (B, 1, 1, 1)


def build_model(cfg: Config, image_channels: int) -> nn.ModuleDict:
    """model.encoder, model.decoder, model.discriminator, with DCGAN's initialisation (Radford et al. Sec. 4):
    convolutions from N(0, 0.02), BatchNorm scales from N(1, 0.02)."""
    (side, widths), d_widths = layer_plan(cfg.image_size, cfg.channels), layer_plan(cfg.image_size, cfg.d_channels)[1]
    model = nn.ModuleDict(dict(encoder=encoder(image_channels, side, widths, cfg.latent),
                               decoder=decoder(image_channels, side, widths[::-1], cfg.latent),  # 128, 64
                               discriminator=discriminator(image_channels, side, d_widths, cfg.d_dense)))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm2d) else 0.0, 0.02)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.bias)
    return model


# 4. Objective: the three losses (Sec. 2 and Algorithm 1), and which network each one updates ========
def feature_loss(features_real: torch.Tensor, features_recon: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """L_llike per image, (B, ...) -> (B,). Sec. 2.3: Dis_l(x) is Gaussian around Dis_l(x̃), with variance σ²."""
    # L_llike = −log N(Dis_l(x) | Dis_l(x̃), σ² I) = ‖Dis_l(x) − Dis_l(x̃)‖² / (2σ²) + const, summed over features
    return (features_real - features_recon).square().flatten(1).sum(1) / (2 * sigma ** 2)


def vaegan_losses(model, x: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor, sigma: float = 1.0) -> dict:
    """One forward pass of Algorithm 1 on real images x (B, C, H, W), with ε and z_p (B, latent) from N(0, I),
    and σ of L_llike: the four batch-mean losses, then the mean D(x), D(x̃), D(x_p) (for the log)."""
    B = len(x)
    mu, logvar = model.encoder(x).float().chunk(2, dim=1)  # (B, latent) each
    z = mu + torch.exp(0.5 * logvar) * eps  # z ~ q(z|x), reparameterised: differentiable in μ and σ
    x_recon, x_prior = model.decoder(torch.cat([z, z_prior])).split(B)  # x̃ = Dec(z), x_p = Dec(z_p), one pass
    # D's BatchNorm normalises with its batch's statistics: Dis_l of x and x̃ as ONE batch (the authors' code),
    # else a channel-wise offset of x̃ from x would vanish from Dis_l(x) − Dis_l(x̃) ...
    features_real, features_recon = model.discriminator.body(torch.cat([x, x_recon])).float().split(B)
    # ... but D's logits from one batch of each kind, as DCGAN trains D (header: why): x and x̃ pass D twice
    real, recon, prior = (model.discriminator(v).float().flatten() for v in (x, x_recon, x_prior))  # logits
    d_real, d_recon, d_prior = torch.stack([real, recon, prior]).detach().sigmoid().mean(1)  # D = σ(ℓ), for the log
    # with D = σ(ℓ):  −log D = softplus(−ℓ)  and  −log(1 − D) = softplus(ℓ)   (softplus(a) = log(1 + eᵃ))
    return {  # L_prior = KL(q(z|x) ‖ N(0, I)), the VAE's regulariser:  −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)
        "prior": -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1).mean(),
        # L_llike = ‖Dis_l(x) − Dis_l(x̃)‖² / (2σ²): the reconstruction error, in the discriminator's features
        "llike": feature_loss(features_real, features_recon, sigma).mean(),
        # the decoder's side, non-saturating (header):  −log D(x̃) − log D(x_p)
        "gan_decoder": F.softplus(-recon).mean() + F.softplus(-prior).mean(),
        # Algorithm 1, as a loss to minimise:  −L_GAN = −log D(x) − log(1 − D(x̃)) − log(1 − D(x_p))
        "gan_discriminator": F.softplus(-real).mean() + F.softplus(recon).mean() + F.softplus(prior).mean(),
        "d_real": d_real, "d_recon": d_recon, "d_prior": d_prior}


def set_gradients(model, losses: dict, gamma: float, adv_weight: float) -> None:
    """The update rules (header): each network's .grad is the gradient of its own loss and nothing else.
    autograd.grad(loss, params) differentiates for `params` only: L_GAN reaches the encoder (through z) and
    L_llike D (through Dis_l), but those gradients are never asked for. (One backward() could not do it:
    along the same graph the encoder weighs L_llike by 1 and the decoder by γ.)"""
    # encoder: L_prior + L_llike;  decoder: γ · L_llike + w · (−log D(x̃) − log D(x_p));  discriminator: −L_GAN
    own = {"encoder": losses["prior"] + losses["llike"], "discriminator": losses["gan_discriminator"],
           "decoder": gamma * losses["llike"] + adv_weight * losses["gan_decoder"]}
    for name, loss in own.items():
        params = list(model[name].parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True)):
            p.grad = g


# 5. Sampler: decode prior draws, reconstruct ======================================================
@torch.no_grad()
def decode(model, cfg: Config, z: torch.Tensor, device) -> torch.Tensor:
    """Dec(z) for codes z (N, latent), on the host: (N, C, H, W) in [-1, 1]. For z ~ N(0, I): new images. In eval
    mode, BatchNorm uses its running statistics: each image depends on its own z alone."""
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([model.decoder(z.to(device)).float().cpu() for z in z.split(cfg.batch_size)])


@torch.no_grad()
def reconstruct(model, cfg: Config, images: torch.Tensor, device) -> torch.Tensor:
    """x → μ(x) → Dec(μ): the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    mu = torch.cat([model.encoder(x.to(device)).chunk(2, dim=1)[0] for x in images.split(cfg.batch_size)])
    return decode(model, cfg, mu, device)


# 6. Train: Algorithm 1, then the plumbing only it calls ============================================
def train(cfg: Config) -> None:
    """Algorithm 1: repeat { x ~ data; z ~ q(z|x), x̃ = Dec(z); z_p ~ N(0, I), x_p = Dec(z_p); the losses; each
    network one step on its own loss (header) }, all three from the same forward pass."""
    # --- plumbing: the device, the run folder, --resume, the data ---
    device = pick_device(cfg.device)
    cfg, out, state = open_run(cfg, ("model", "optimizer"))  # state: the checkpoint to resume, or None
    data, test = get_test_data(cfg, get_data(cfg)[0])  # (N, C, H, W) in [-1, 1]; the test split stays on the host
    data, cfg.image_size = data.to(device), data.shape[-1]  # resident on the device

    # --- core: the networks, and Adam (moments per weight: one Adam over three networks is three Adams) ---
    torch.manual_seed(cfg.seed)  # the initial weights, then every batch, ε and z_p
    model = build_model(cfg, data.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
    # --resume: the weights, the optimiser, the step and the random number generators, as they were
    step = restore(state, model=model, optimizer=optimizer) if state else 0
    start_files(out, cfg, step)  # OUT/config.json, OUT/samples/
    losses_fn, bf16 = torch.compile(vaegan_losses) if cfg.compile else vaegan_losses, use_bf16(cfg, device)
    print(" + ".join(f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for m in model.values()) + " parameters"
          f" | {len(data)} images + {len(test)} to test | {device} {'bf16' if bf16 else 'fp32'} | {out}")
    stop = catch_stop_signals()  # Ctrl-C and SIGTERM ask the loop to save and stop
    run = dict(out=out, start=time.time(), last=time.time(), step=step, saved=state and step, resumed=state and step)
    sums = 0  # the losses and D's outputs, summed on the device between log lines

    while step < cfg.steps:
        # --- core: one step of Algorithm 1: all losses from one forward pass, then all three updates ---
        model.train()
        x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
        eps, z_prior = torch.randn(2, cfg.batch_size, cfg.latent, device=device)  # ε for z = μ + σ ε; z_p ~ N(0, I)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            losses = losses_fn(model, x, eps, z_prior, cfg.feature_sigma)
        set_gradients(model, losses, cfg.gamma, cfg.adv_weight)  # each network: its own loss's gradient
        optimizer.step()
        step += 1

        # --- plumbing: the log, grids from fixed z, checkpoints, a clean stop on Ctrl-C ---
        sums = sums + torch.stack(list(losses.values())).detach()
        if step % cfg.log_every == 0 or step == cfg.steps:  # the losses, and D(x), D(x̃), D(x_p): is the game on?
            log_line(run, step, cfg, **dict(zip(losses, (sums / (step - run["step"])).tolist())))
            sums = 0
        if step % cfg.sample_every == 0 or step == cfg.steps:  # the same z every time: the grids show progress
            z = torch.randn(64, cfg.latent, generator=torch.Generator().manual_seed(cfg.seed))
            save_image(decode(model.eval(), cfg, z, device) * 0.5 + 0.5, f"{out}/samples/step_{step:07d}.png")
            save_image(torch.cat([test[:32], reconstruct(model, cfg, test[:32], device)]) * 0.5 + 0.5,
                       f"{out}/reconstructions.png")  # 4 rows of test images, then their 4 rows of reconstructions
        if "by" in stop or step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                            config=dataclasses.asdict(cfg), script=PROG), device)
        if "by" in stop:
            break
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
