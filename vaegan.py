"""vaegan.py: the VAE-GAN hybrid (a VAE whose reconstruction error is measured by a GAN) in one file.

Larsen, Sønderby, Larochelle & Winther 2016, "Autoencoding beyond pixels using a learned similarity
metric", https://arxiv.org/abs/1512.09300 (their code: github.com/andersbll/autoencoding_beyond_pixels)

A VAE's decoder redraws each pixel, so it hedges: its images are blurry averages. The VAE-GAN measures
the reconstruction error in the features of a GAN discriminator's inner layer instead, and trains the
decoder (also the GAN's generator) to make its reconstructions x̃ and its decodings x_p of z_p ~ N(0, I)
pass as real. Three networks, three losses; each network minimises its own combination (w = --adv-weight):
    encoder        minimises  L_prior + L_llike
    decoder        minimises  γ · L_llike + w · (−log D(x̃) − log D(x_p))
    discriminator  minimises  −L_GAN = −log D(x) − log(1 − D(x̃)) − log(1 − D(x_p))
Algorithm 1 of the paper writes θ_Dec ← −∇(γ L_llike − L_GAN) and θ_Dis ← −∇ L_GAN: read literally, that
is the sign of L_GAN slipped (D would descend its own objective, and the decoder would help D). The rules
above are the game the paper describes and its code plays, and what this file implements.

Commands
  python vaegan.py                          # CIFAR-10, 40k steps of 128 (≈ 100 epochs): a GPU job, not yet measured
  python vaegan.py --sample --ckpt runs/vaegan-cifar10/ckpt.pt --num-samples 50000 \
      --fid 50000 --fid-weights pt_inception-2015-12-05-6726825d.pth   # Inception FID on the papers' ruler
  python vaegan.py --dataset mnist --d-dense 64 --feature-sigma 5 --steps 1800 --device cpu ...
        # a CPU recipe: docs/vaegan.md has the exact command, its time on 2 cores and its MNIST score
  python vaegan.py --sample --reconstruct --ckpt RUN/ckpt.pt   # reconstructions of test images, as PNGs

Sections
  1. Config     2. Data (+ the test split)     3. Model (encoder, decoder, discriminator)
  4. Objective (L_prior, L_llike, L_GAN, and which network each updates)     5. Sampler
  6. Train (Algorithm 1)     7. Main
  then, behind a fence, the plumbing a first reading skips: --sample, the flags, dataset files,
  the run (processes, resume, checkpoints, log), files and progress lines

Where the authors' code departs from the paper, and what we do
  - Fakes: both count reconstructions x̃ and decoded prior draws x_p as fakes. Algorithm 1's L_GAN
    weighs the real, x̃ and x_p terms 1 : 1 : 1; the code 0.5 : 0.25 : 0.25 in D's gradient. We follow the paper.
  - The decoder's adversarial term: the paper's is the saturating log(1 − D(·)), and so is the code's
    (D's gradient reversed, an ε inside the log). We use the non-saturating −log D(·) of dcgan.py:
    the same fixed point, but strong gradients early on, when D rejects every fake and log(1 − D) is flat.
  - Gating: the code (not the paper) skips D's update when its loss on reals or fakes falls below
    0.68 − 0.35, and the decoder's when it rises above 0.68 + 0.35. We do not gate: every step updates all
    three networks, as Algorithm 1 does; metrics.csv logs D(x), D(x̃), D(x_p) to watch the balance.
  - Gradient routing: L_GAN does not reach the encoder (the paper's "limiting error signals", the code's
    zero gradient scale on z) and L_llike does not reach D (paper and code agree). So here; tests check it.
    It is why a step takes three gradient passes (one per network) and not one backward(): the encoder and
    the decoder weigh L_llike differently (1 and γ) along the same decoder graph, and L_GAN must stop at z
    while L_llike goes through it; no single loss's gradient routes that.
  - The discriminator is the paper's kind (Sec. 4 and the code): convolutions with BatchNorm (none on the
    input, as in DCGAN), then a dense layer (theirs 512 units with BatchNorm; ours --d-dense units, 512 by
    default, without BatchNorm; the MNIST recipe uses 64), then the logit. Real images, x̃ and x_p go
    through it as three separate batches, as dcgan.py does with real and fake: BatchNorm then normalises
    each kind with its own statistics.
  - Feature layer: like the code (its 4th convolution, before BatchNorm), L_llike reads D's last
    convolution before its BatchNorm: Dis_l(x) depends on x alone, not on the rest of the batch.
  - Capacity: the encoder's Linear to μ, σ read 6272 features on MNIST (1.6M of its 1.7M weights, while D
    had 0.29M); a 1x1 convolution now narrows that map 4x first, and D's dense layer takes the weights:
    encoder 0.54M, decoder 0.94M, D 0.68M with the MNIST recipe's --d-dense 64 (3.49M with the default 512).
    `--arch v1` builds the earlier networks (no BatchNorm, no dense layer), which is also what checkpoints
    written before --arch hold; they keep loading for sampling and resuming.
  - σ of L_llike (--feature-sigma): Sec. 2.3 models Dis_l(x) as a Gaussian around Dis_l(x̃) with unit
    variance; the authors' code keeps σ as a parameter (1 by default), and so do we (default 1). σ sets
    the encoder's balance of L_prior against L_llike (and, with γ, the decoder's weight on L_llike), and
    features read before BatchNorm have no scale of their own (BatchNorm divides it out of D's loss).
    On MNIST at σ = 1 the encoder put ≈ 80 nats into z, so prior draws fell far from the codes the
    decoder learnt on; the MNIST recipe uses σ = 5 (measured in docs/vaegan.md).
  - Adam (2e-4, β₁ = 0.5, as dcgan.py) for all three nets, not RMSProp with a decaying rate. With Adam
    the decoder's step depends only on the ratio γ / --adv-weight (Adam is blind to a loss's scale);
    both flags stay, so that each reads as in the paper and in the student project "Generating
    Realistic Images using DDPM", whose comparison docs/compare.md reproduces.
  - Batches are drawn uniformly with replacement instead of in shuffled epochs, as in ddpm.py.
"""
import argparse
import csv
import dataclasses
import errno
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vaegan": names runs and error messages
READS = ("vaegan",)  # the scripts whose checkpoints this one can load


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
    latent: int = 128  # dimensions of the code z (the paper: 128 on faces)
    channels: int = 64  # width of the encoder and decoder: channels at full resolution, doubled at every halving
    d_channels: int = 64  # width of the discriminator, the same way
    d_dense: int = 512  # with arch larsen: units of D's dense layer before the logit (the paper's 512); 0: none, the logit from Dis_l
    arch: str = "larsen"  # the networks: larsen (a BatchNorm discriminator with a dense layer, as the paper's) | v1 (this file's networks before 2026-12-04: D without BatchNorm; older checkpoints read as v1)
    # --- objective ---
    gamma: float = 1e-3  # γ: weight of L_llike, the reconstruction error in D's features, in the decoder's loss (the paper's faces: 1e-6 with RMSProp)
    feature_sigma: float = 1.0  # σ of L_llike's Gaussian on Dis_l (paper: 1): it sets the encoder's balance of L_prior against L_llike
    adv_weight: float = 0.1  # weight w of the adversarial term in the decoder's loss (0.1, as in "Generating Realistic Images using DDPM")
    # --- optimisation ---
    steps: int = 40_000  # training steps, each one update of all three networks (40k x 128 ≈ 100 CIFAR-10 epochs)
    batch_size: int = 128  # real images per step (and as many reconstructions and prior draws); also the sampling batch
    lr: float = 2e-4  # Adam learning rate of all three networks (DCGAN's 2e-4)
    beta1: float = 0.5  # Adam β₁ (DCGAN's 0.5)
    # --- run ---
    out: str = ""  # run directory ("": runs/vaegan-<dataset>; --sample: the checkpoint's folder, or its vaegan-samples/ for another script's)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast only on GPUs and CPUs with AVX512-BF16/AMX)
    compile: bool = False  # torch.compile the networks for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (from the same fixed z) and reconstructions
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end, and on Ctrl-C)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or to sample from
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs decoded from prior draws z ~ N(0, I) with --ckpt
    reconstruct: bool = False  # with --sample: reconstruct the first --num-samples test images instead
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate (or reconstruct) this many images and print their FID against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; or a file, e.g. pytorch-fid's for paper numbers)


CHOICES = {"device": ("auto", "cuda", "cpu", "mps"), "precision": ("auto", "fp32", "bf16"), "arch": ("larsen", "v1")}
RANGES = {"image_size": ">=0", "latent": ">=1", "channels": ">=1", "d_channels": ">=1", "d_dense": ">=0", "gamma": ">=0", "feature_sigma": ">0",
          "adv_weight": ">=0", "steps": ">=1", "batch_size": ">=1", "lr": ">0", "beta1": "[0,1)", "log_every": ">=1",
          "sample_every": ">=1", "ckpt_every": ">=1", "num_samples": ">=1", "fid": ">=0"}
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "d_channels", "d_dense", "arch")  # fixed by a checkpoint: taken from it
# parse_args() (in the plumbing, after the fence) makes every field above a flag (batch_size: --batch-size),
# with the comment beside it as its --help text and its default shown; CHOICES and RANGES hold the values.
BEFORE = {"arch": "v1"}  # what a checkpoint written before a field existed means by it


# =============================================================================================
# 2. Data
# =============================================================================================
# >>> shared: data
def get_data(cfg: Config):
    """The whole training set as one float tensor (N, C, H, W) in [-1, 1], and its labels (N,) if it has
    them (None if not). Small image datasets fit in memory (CIFAR-10 is 0.6 GB as float32), so we skip
    the DataLoader: a batch is one indexing operation, on whatever device the tensor lives."""
    # uint8 pixels (N, C, H, W) and integer labels (or None), read by the helpers in the plumbing part
    if cfg.dataset in TORCHVISION_FILES:  # cifar10, mnist, fashion-mnist: downloaded by torchvision
        images, labels = read_torchvision(cfg.dataset, cfg.data_root)
    elif os.path.isdir(cfg.dataset):  # a folder of images (or one subfolder per class)
        images, labels = read_folder(cfg.dataset, cfg.image_size)
    elif cfg.dataset.endswith(".npy") and os.path.isfile(cfg.dataset):  # (N, H, W[, C]) pixels
        images, labels = read_npy(cfg.dataset, getattr(cfg, "labels", ""))
    else:
        sys.exit(f"{PROG}: --dataset {cfg.dataset!r} is not cifar10, mnist, "
                 f"fashion-mnist, an existing folder of images or an existing .npy file")
    x = images.float() / 127.5 - 1  # uint8 [0, 255] -> float [-1, 1]   (N, C, H, W)
    if cfg.image_size and cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1).contiguous(), labels
# <<< shared: data

# >>> shared: test_data
def get_test_data(cfg: Config, data: torch.Tensor) -> tuple:
    """(training images, test images), both (N, C, H, W) in [-1, 1], given get_data's images.

    Held-out scores (vae.py's test −ELBO, the test reconstructions) need images never trained on:
    torchvision's own test split (10,000 images for MNIST, Fashion-MNIST and CIFAR-10); for a folder
    or a .npy file, the last 10%."""
    if cfg.dataset not in TORCHVISION_FILES:
        held_out = max(1, len(data) // 10)
        return data[:-held_out], data[-held_out:]
    import torchvision
    cls, files, sub = TORCHVISION_FILES[cfg.dataset]
    try:  # torchvision's download (done by get_data) fetched both splits
        ds = getattr(torchvision.datasets, cls)(cfg.data_root, train=False, download=False)
    except RuntimeError:
        sys.exit(f"{PROG}: no {cfg.dataset} test split in {os.path.join(cfg.data_root, sub)}; put "
                 f"{files.replace('train-', 't10k-')} there (torchvision downloads it with the training set)")
    images = torch.as_tensor(np.asarray(ds.data))  # uint8, (N, H, W) or (N, H, W, C)
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    x = images.float() / 127.5 - 1  # the same map to [-1, 1] as get_data
    if x.shape[-1] != data.shape[-1]:
        x = F.interpolate(x, size=data.shape[-2:], mode="bilinear", antialias=True)
    return data, x.clamp(-1, 1).contiguous()
# <<< shared: test_data


# =============================================================================================
# 3. Model: encoder q(z|x), decoder p(x|z) (= the GAN's generator), discriminator
# =============================================================================================
# --- core: the three networks ---
def layer_plan(image_size: int):
    """(side, halvings): the image is halved `halvings` times, down to side×side (28 → 7, 32 → 4, 16 → 4)."""
    side, halvings = image_size, 0
    while side % 2 == 0 and side // 2 >= 4:
        side, halvings = side // 2, halvings + 1
    if halvings == 0:
        sys.exit(f"{PROG}: image size {image_size} is not an even size of at least 8 px; "
                 f"use --image-size 16, 28, 32 or 64")
    return side, halvings


def down_path(image_channels: int, width: int, halvings: int, batchnorm: bool = False) -> list:
    """Strided 4x4 convs + LeakyReLU(0.2), halving the size, doubling the width: (B, C, S, S) -> (B, w_last, side, side).
    batchnorm: BatchNorm after every convolution but the first (DCGAN's discriminator: none on the input)."""
    widths = [width * 2 ** i for i in range(halvings)]
    layers = [nn.Conv2d(image_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, S/2, S/2)
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1, bias=not batchnorm), *([nn.BatchNorm2d(b)] if batchnorm else []),
                   nn.LeakyReLU(0.2)]  # (B, a, s, s) -> (B, b, s/2, s/2)
    return layers


class Encoder(nn.Module):
    """q(z|x) = N(μ(x), diag σ²(x)): image (B, C, S, S) -> μ, log σ² (B, latent) each. With arch larsen, a 1x1
    convolution first narrows the last map 4x, so the Linear to μ, σ holds 4x fewer weights (28 px: 0.40M, not
    1.61M), which v1 spent on an encoder 6x the size of its discriminator."""

    def __init__(self, image_channels: int, image_size: int, width: int, latent: int, arch: str = "larsen"):
        super().__init__()
        side, halvings = layer_plan(image_size)
        w_last = width * 2 ** (halvings - 1)
        w_out = max(w_last // 4, 1) if arch == "larsen" else w_last
        narrow = [nn.Conv2d(w_last, w_out, 1), nn.LeakyReLU(0.2)] if arch == "larsen" else []
        self.net = nn.Sequential(*down_path(image_channels, width, halvings), *narrow, nn.Flatten())  # (B, w_out·side²)
        self.to_stats = nn.Linear(w_out * side * side, 2 * latent)  # (B, 2·latent)

    def forward(self, x):
        return self.to_stats(self.net(x)).chunk(2, dim=1)  # μ, log σ²: (B, latent) each


class Decoder(nn.Module):
    """p(x|z) and the generator: z (B, latent) -> (B, C, S, S) in [-1, 1]. DCGAN's G: BatchNorm, ReLU, tanh out."""

    def __init__(self, image_channels: int, image_size: int, width: int, latent: int):
        super().__init__()
        side, halvings = layer_plan(image_size)
        widths = [width * 2 ** i for i in reversed(range(halvings))]  # 28 px, width 64: [128, 64]
        layers = [nn.ConvTranspose2d(latent, widths[0], side, 1, 0, bias=False),  # z as 1x1 -> (B, w0, side, side)
                  nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False),  # (B, a, s, s) -> (B, b, 2s, 2s)
                       nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], image_channels, 4, 2, 1), nn.Tanh()]  # -> (B, C, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # z: (B, latent)
        return self.net(z[:, :, None, None])  # (B, C, S, S)


class Discriminator(nn.Module):
    """Dis(x): image (B, C, S, S) -> logit (B,) and Dis_l(x) (B, w_last, side, side), the last convolution's output.
    arch larsen (as the paper's D and its code's): BatchNorm after every convolution but the first, Dis_l read
    before its BatchNorm (where the authors read it), then a dense layer of `dense` units (0: none) and the logit.
    BatchNorm makes an image's outputs depend on its batch: real, x̃ and x_p go through D as separate batches.
    arch v1 (checkpoints before 2026-12-04): no BatchNorm, and the logit straight from Dis_l."""

    def __init__(self, image_channels: int, image_size: int, width: int, arch: str = "larsen", dense: int = 512):
        super().__init__()
        side, halvings = layer_plan(image_size)
        w_last = width * 2 ** (halvings - 1)
        self.body = nn.Sequential(*down_path(image_channels, width, halvings, batchnorm=arch == "larsen"),
                                  nn.Conv2d(w_last, w_last, 3, 1, 1))  # Dis_l: (B, w_last, side, side)
        if arch == "larsen" and dense:
            self.head = nn.Sequential(nn.BatchNorm2d(w_last), nn.LeakyReLU(0.2), nn.Flatten(),  # (B, w_last·side²)
                                      nn.Linear(w_last * side * side, dense), nn.LeakyReLU(0.2),  # (B, dense)
                                      nn.Linear(dense, 1))  # (B, 1)
        else:  # the logit straight from Dis_l: (B, 1, 1, 1), a linear layer (larsen: after its BatchNorm)
            self.head = nn.Sequential(*([nn.BatchNorm2d(w_last)] if arch == "larsen" else []),
                                      nn.LeakyReLU(0.2), nn.Conv2d(w_last, 1, side))

    def forward(self, x):
        features = self.body(x)
        return self.head(features).flatten(), features  # (B,) logits; D(x) = σ(logit) = P(x is real)


class VAEGAN(nn.Module):
    def __init__(self, image_channels=3, image_size=32, latent=128, channels=64, d_channels=64, arch="larsen",
                 d_dense=512):
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(image_channels, image_size, channels, latent, arch)
        self.decoder = Decoder(image_channels, image_size, channels, latent)
        self.discriminator = Discriminator(image_channels, image_size, d_channels, arch, d_dense)


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. Sec. 4): convolutions from N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_model(cfg: Config, image_channels: int) -> VAEGAN:
    return VAEGAN(image_channels, cfg.image_size, cfg.latent, cfg.channels, cfg.d_channels, cfg.arch,
                  cfg.d_dense).apply(init_weights)


# =============================================================================================
# 4. Objective: three losses (Larsen et al. Sec. 2 and Algorithm 1), and who learns from which
# =============================================================================================
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) per image, in nats: (B, latent) -> (B,)."""
    # Kingma & Welling 2014, Appendix B:  −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)


def feature_loss(features_real: torch.Tensor, features_recon: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """L_llike per image, (B, ...) -> (B,). Sec. 2.3: Dis_l(x) is Gaussian around Dis_l(x̃), with variance σ²
    (the paper: σ = 1; the authors' code keeps σ as a parameter, --feature-sigma here)."""
    # L_llike = −log N(Dis_l(x) | Dis_l(x̃), σ² I) = ‖Dis_l(x) − Dis_l(x̃)‖² / (2σ²) + const, summed over features
    return (features_real - features_recon).square().flatten(1).sum(1) / (2 * sigma ** 2)


def vaegan_losses(model: VAEGAN, x: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor, sigma: float = 1.0) -> dict:
    """One forward pass of Algorithm 1 on a batch x (B, C, H, W), with ε and z_p (B, latent) from N(0, I), and
    σ of L_llike. Returns the four batch-mean losses, and the three mean probabilities D(·) for metrics.csv."""
    B = len(x)
    mu, logvar = model.encoder(x)  # (B, latent) each
    z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation: z ~ q(z|x), differentiable in μ and σ
    # x̃ = Dec(z) and x_p = Dec(z_p) in one batch: one pass, and BatchNorm sees both kinds of codes
    x_recon, x_prior = model.decoder(torch.cat([z, z_prior])).split(B)  # (B, C, H, W) each
    # the discriminator on real, reconstructed and generated images as three batches, as dcgan.py does for
    # real and fake: its BatchNorm normalises each kind with that kind's own statistics, as in the paper's code
    logits_real, features_real = model.discriminator(x)  # (B,), (B, w, s, s)
    logits_recon, features_recon = model.discriminator(x_recon)
    logits_prior, _ = model.discriminator(x_prior)
    logits_real, logits_recon, logits_prior = logits_real.float(), logits_recon.float(), logits_prior.float()
    bce = F.binary_cross_entropy_with_logits  # BCE(ℓ, 1) = −log σ(ℓ) = −log D;  BCE(ℓ, 0) = −log(1 − D)
    ones, zeros = torch.ones_like(logits_real), torch.zeros_like(logits_real)
    # L_prior = KL(q(z|x) ‖ p(z)),  p(z) = N(0, I)   (the VAE's regulariser, kept as it is)
    prior = kl_divergence(mu.float(), logvar.float()).mean()
    # L_llike = ‖Dis_l(x) − Dis_l(x̃)‖² / (2σ²): the reconstruction error, in the discriminator's features
    llike = feature_loss(features_real.float(), features_recon.float(), sigma).mean()
    # Algorithm 1, as a loss to minimise:  −L_GAN = −log Dis(x) − log(1 − Dis(x̃)) − log(1 − Dis(x_p))
    gan_discriminator = bce(logits_real, ones) + bce(logits_recon, zeros) + bce(logits_prior, zeros)
    # the decoder's side, non-saturating (see header):  −log Dis(x̃) − log Dis(x_p)
    gan_decoder = bce(logits_recon, ones) + bce(logits_prior, ones)
    probabilities = torch.sigmoid(torch.stack([logits_real, logits_recon, logits_prior]).detach()).mean(1)  # D(x), D(x̃), D(x_p)
    return {"prior": prior, "llike": llike, "gan_decoder": gan_decoder, "gan_discriminator": gan_discriminator,
            "probabilities": probabilities}


def set_gradients(model: VAEGAN, losses: dict, gamma: float, adv_weight: float) -> None:
    """The update rules (header): each network's .grad is the gradient of its own loss and nothing else.
    autograd.grad(loss, params) differentiates for `params` only: L_GAN depends on the encoder (through z)
    and L_llike on the discriminator (through Dis_l), but those gradients are never asked for."""
    networks = (model.encoder, model.decoder, model.discriminator)
    # the encoder minimises L_prior + L_llike   (Algorithm 1: θ_Enc ← −∇_θEnc (L_prior + L_llike))
    encoder_loss = losses["prior"] + losses["llike"]
    # the decoder minimises γ · L_llike + w · (−log D(x̃) − log D(x_p)): reconstruct in D's features, and
    # fool D (Algorithm 1 writes −∇(γ L_llike − L_GAN), the sign slip of the header; ours is non-saturating)
    decoder_loss = gamma * losses["llike"] + adv_weight * losses["gan_decoder"]
    # the discriminator minimises −L_GAN = −log D(x) − log(1 − D(x̃)) − log(1 − D(x_p)), i.e. ascends L_GAN
    discriminator_loss = losses["gan_discriminator"]
    for net, loss in zip(networks, (encoder_loss, decoder_loss, discriminator_loss)):
        params = list(net.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True)):
            p.grad = g


# =============================================================================================
# 5. Sampler: decode prior draws, reconstruct
# =============================================================================================
SAMPLER_FIELDS = ("reconstruct",)  # what describes an image set in fid.csv: prior samples or reconstructions


@torch.no_grad()
def in_batches(fn, inputs: torch.Tensor, cfg: Config, label: str) -> torch.Tensor:
    """fn applied to inputs in batches of --batch-size, with a progress line; the outputs on the host."""
    progress, outputs = Progress(label, len(inputs)), []
    for i in range(0, len(inputs), cfg.batch_size):
        outputs.append(fn(inputs[i:i + cfg.batch_size]).float().cpu())
        progress.update(i + len(outputs[-1]))
    return torch.cat(outputs)


@torch.no_grad()
def generate(model, cfg: Config, n: int, shape, device, generator, label: str = "sampling") -> torch.Tensor:
    """n images Dec(z), z ~ N(0, I): (n, C, H, W) in [-1, 1], on the host. Eval mode: an image depends on its z only."""
    model.eval()  # (the training loop sets train() again at every step)
    z = torch.randn(n, model.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return in_batches(model.decoder, z, cfg, label)


@torch.no_grad()
def reconstruct(model, cfg: Config, images: torch.Tensor, device, label: str = "reconstructing") -> torch.Tensor:
    """x → μ(x) → Dec(μ): the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    model.eval()  # μ(x) and running BatchNorm statistics: a deterministic image of each input
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return in_batches(lambda x: model.decoder(model.encoder(x.to(device))[0]), images, cfg, label)


# =============================================================================================
# 6. Train: Algorithm 1 (the plumbing it calls, class Run, is after the fence)
# =============================================================================================
COLUMNS = ("prior", "llike", "gan_decoder", "gan_discriminator")  # the losses in metrics.csv, then D(x), D(x̃), D(x_p)


def train(cfg: Config) -> None:
    """Algorithm 1: repeat { x ~ data; z ~ q(z|x), x̃ = Dec(z); z_p ~ N(0, I), x_p = Dec(z_p); the losses;
    each network one step on its own loss (header) }, all three updated from the same forward pass."""
    with Run(cfg, needs=("model", "optimizer")) as run:
        cfg, device = run.cfg, run.device
        if run.world > 1:
            sys.exit(f"{PROG}: trains in one process; start it with python, not torchrun")
        if run.state and "arch" not in run.state["config"]:  # a checkpoint older than --arch: its networks are v1
            cfg.arch = BEFORE["arch"]
        data, test = get_test_data(cfg, get_data(cfg)[0])  # (N, C, H, W) in [-1, 1]; test stays on the host
        data = data.to(device)  # resident on the device
        cfg.image_size = data.shape[-1]
        layer_plan(cfg.image_size)  # a size the networks cannot handle: one line, before anything is written
        run.start(images=len(data), test_images=len(test))

        # --- core: the three networks, and Adam (it keeps its moments per weight: one Adam over all three
        #     networks is three Adams, each driven by its own network's loss) ---
        model = build_model(cfg, data.shape[1]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
        step = run.restore(model=model, optimizer=optimizer)
        net = run.wrap(model)  # --compile: compiled; the same weights
        run.describe(model.encoder, model.decoder, model.discriminator,
                     note=f"{len(test)} test images | latent {cfg.latent}, γ={cfg.gamma}, w={cfg.adv_weight}, "
                          f"σ={cfg.feature_sigma}, D: {cfg.arch}")
        while step < cfg.steps:
            # --- core: one step of Algorithm 1: all losses from one forward pass, then all three updates ---
            model.train()
            x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
            eps = torch.randn(cfg.batch_size, cfg.latent, device=device)  # ε for z = μ + σ ε
            z_prior = torch.randn(cfg.batch_size, cfg.latent, device=device)  # z_p ~ N(0, I)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
                losses = vaegan_losses(net, x, eps, z_prior, cfg.feature_sigma)
            set_gradients(model, losses, cfg.gamma, cfg.adv_weight)  # each network: its own loss's gradient
            optimizer.step()
            step += 1

            # --- plumbing (class Run, after the fence): the log, grids from fixed z, checkpoints, Ctrl-C ---
            d_real, d_recon, d_prior = losses["probabilities"]  # D(x), D(x̃), D(x_p): is the game on?
            run.log(step, **{c: losses[c].detach() for c in COLUMNS}, d_real=d_real, d_recon=d_recon, d_prior=d_prior)
            if run.due(step, cfg.sample_every):
                run.save_grid(step, lambda: training_grids(model, cfg, test, run.dir, device, run.fixed_noise()))
            if run.stopping(step) or run.due(step, cfg.ckpt_every):
                run.save(step)  # after Ctrl-C or SIGTERM, this also ends the run (how to continue: --resume)
        if cfg.fid:
            run_fid(cfg, generate(model, cfg, cfg.fid, data.shape[1:], device, run.fixed_noise(1), "--fid"),
                    run.dir, step)


# =============================================================================================
# 7. Main: train, or generate from a checkpoint (sample_mode and the other commands: just after the fence)
# =============================================================================================
# >>> shared: vae_main
def main(cfg: Config) -> None:
    check_ranges(cfg)
    if cfg.sample and not cfg.ckpt:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/ckpt.pt (a checkpoint written by training)")
    if cfg.reconstruct and not cfg.sample:
        sys.exit(f"{PROG}: --reconstruct works with --sample --ckpt RUN/ckpt.pt")
    if cfg.sample:
        sample_mode(cfg)
    else:
        train(cfg)
# <<< shared: vae_main


# =============================================================================================
# Plumbing (a first reading stops at main(), above). First what main() runs besides training: --sample
# (PNGs, a grid, the speed, FID) and the other commands that write files around the sampler; then, shared
# by every script, the flags, reading datasets from disk, the run (processes, resume, log, checkpoints,
# Ctrl-C), files, progress
# =============================================================================================
# >>> shared: above_below
def above_below(inputs: torch.Tensor, outputs: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Interleave rows: 8 inputs, then their 8 outputs, then the next 8 inputs ... (for save_grid)."""
    per_row = min(per_row, len(inputs))
    rows = len(inputs) // per_row
    pairs = torch.stack([inputs[:rows * per_row].view(rows, per_row, *inputs.shape[1:]),
                         outputs[:rows * per_row].view(rows, per_row, *inputs.shape[1:])], 1)
    return pairs.flatten(0, 2)  # (rows·2·per_row, C, H, W)
# <<< shared: above_below


def training_grids(model, cfg: Config, test: torch.Tensor, run_dir: str, device, generator) -> torch.Tensor:
    """reconstructions.png of the same test images every time (never trained on), and the 64 prior samples
    of samples/step_N.png (returned: Run.save_grid writes them)."""
    shown = test[:32]
    save_grid(above_below(shown, reconstruct(model, cfg, shown, device)), os.path.join(run_dir, "reconstructions.png"))
    return generate(model, cfg, 64, test.shape[1:], device, generator, label="sample grid")


def load_for_sampling(cfg: Config):
    """The networks of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt, needs=("model", "config", "step"))
    cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, BEFORE.get(k, getattr(Config, k))) for k in ARCH_FIELDS})
    channels = state["model"]["encoder.net.0.weight"].shape[1]  # the encoder's first convolution reads the image
    model = build_model(cfg, channels)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state


# >>> shared: vae_sample_mode
def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the speed (and FID with --fid). The images
    are prior samples, or with --reconstruct the reconstructions of the first N test images."""
    device = pick_device(cfg.device)
    model, cfg, shape, state = load_for_sampling(cfg)
    model.to(device)
    run_dir = cfg.out or sample_dir(cfg, state)
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    if cfg.reconstruct:
        _, test = get_test_data(cfg, get_data(cfg)[0])
        if len(test) < n:
            sys.exit(f"{PROG}: --num-samples/--fid {n}: only {len(test)} test images to reconstruct")
        images, name = reconstruct(model, cfg, test[:n], device), "reconstructed"
        grid = above_below(test[:min(n, 64)], images[:64])
    else:
        images, name = generate(model, cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed)), "generated"
        grid = images[:64]
    seconds = time.time() - start  # generate() and reconstruct() end by copying to the host: the clock is honest
    save_pngs(images, os.path.join(run_dir, name))
    save_grid(grid, os.path.join(run_dir, f"{name}_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          f"reconstruct={cfg.reconstruct}) -> {run_dir}/{name}/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, state["step"])
# <<< shared: vae_sample_mode


# >>> shared: argparse
class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we print one line
        sys.exit(f"{PROG}: {message} (see --help)")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(argv=None) -> Config:
    """Every Config field becomes a flag; its comment in the class above is the --help text."""
    helps = dict(re.findall(r"^\s+(\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    parser = OneLineErrorParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else \
            {"type": finite_float if f.type is float else f.type, "choices": CHOICES.get(f.name)}
        shown = helps.get(f.name, "").replace("%", "%%") + f" (default: {f.default!r})"
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=shown, **kind)
    return Config(**vars(parser.parse_args(argv)))


def check_ranges(cfg: Config) -> None:
    """Every number in RANGES lies in its range, before anything runs; else one line naming the flag."""
    tests = {">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"), ">=1": (lambda v: v >= 1, ">= 1"),
             "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"), "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             ">=-1": (lambda v: v >= -1, ">= 0 (or -1 for none)")}
    for name, rule in RANGES.items():
        value, (ok, words) = getattr(cfg, name), tests[rule]
        if not (math.isfinite(value) and ok(value)):
            sys.exit(f"{PROG}: --{name.replace('_', '-')} must be {words}, got {value}")


def run_main(main) -> None:
    """main(parse_args()), with what a user's machine can throw turned into one line, not a traceback."""
    try:
        main(parse_args())
    except OSError as e:  # disk full, permission denied, read-only folder, too many open files, ...
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        sys.exit(f"{PROG}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}"
                 + (" (free some space or choose another --out; the last checkpoint is intact)" if full else ""))
    except KeyboardInterrupt:
        sys.exit(f"{PROG}: interrupted")
# <<< shared: argparse


# >>> shared: data_files
TORCHVISION_FILES = {  # what to put where when torchvision cannot download (offline machines)
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)", ""),
    "mnist": ("MNIST", "train-images-idx3-ubyte and train-labels-idx1-ubyte (.gz is fine)", "MNIST/raw/"),
    "fashion-mnist": ("FashionMNIST", "train-images-idx3-ubyte and train-labels-idx1-ubyte (.gz is fine)",
                      "FashionMNIST/raw/"),
}


def read_torchvision(name: str, root: str):
    """A torchvision dataset's training split: uint8 images (N, C, H, W) and labels (N,). The download
    is tried only when the files are not there; offline, one line says which files to put where."""
    import torchvision
    cls, files, sub = TORCHVISION_FILES[name]
    try:
        ds = getattr(torchvision.datasets, cls)(root, train=True, download=False)
    except RuntimeError:
        try:
            ds = getattr(torchvision.datasets, cls)(root, train=True, download=True)
        except Exception as e:  # offline: say exactly what to put where
            sys.exit(f"{PROG}: cannot download {name} ({type(e).__name__}); "
                     f"put {files} in {os.path.join(root, sub)} and run again")
    return as_nchw(torch.as_tensor(np.asarray(ds.data)), name), torch.as_tensor(np.asarray(ds.targets))


def read_npy(path: str, labels_path: str = ""):
    """A .npy stack of images as uint8 (N, C, H, W) (see pixels_to_uint8 for the values it takes), and
    --labels FILE.npy if given (else None)."""
    try:
        array = np.load(path, allow_pickle=False)  # (N, H, W), (N, H, W, C) or (N, C, H, W)
    except (ValueError, OSError) as e:
        sys.exit(f"{PROG}: cannot read {path} as a numpy array: {first_line(e)}")
    if array.dtype.kind in "iufb" and array.ndim not in (3, 4):  # numbers, but not a stack of images:
        images = torch.empty(array.shape, dtype=torch.uint8)  # as_nchw names the shape, pixels unread
    else:
        images = pixels_to_uint8(array, path)
    images = as_nchw(images, path)
    return images, read_labels(labels_path, len(images)) if labels_path else None


def as_nchw(images: torch.Tensor, name: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W) with C = 1 or 3; else one line naming the shape."""
    if images.dim() == 3:
        images = images[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) < 2 or min(images.shape[2:]) < 1:
        sys.exit(f"{PROG}: {name} must hold at least 2 grey or RGB images, (N, H, W), (N, H, W, C) or "
                 f"(N, C, H, W); got shape {tuple(images.shape)}")
    return images


def pixels_to_uint8(array: np.ndarray, name: str) -> torch.Tensor:
    """Images as uint8 [0, 255]. Integers (any dtype) are pixels in [0, 255]; floats are read as [0, 1],
    or as [-1, 1] if any value is negative. (fid.py reads .npy files by the same rule.)"""
    if array.dtype.kind in "iu":
        if array.size and not 0 <= array.min() <= array.max() <= 255:
            sys.exit(f"{PROG}: {name}: integer pixels must be in [0, 255], got [{array.min()}, {array.max()}]")
        return torch.as_tensor(array.astype(np.uint8))
    if array.dtype.kind not in "fb":
        sys.exit(f"{PROG}: {name}: cannot read {array.dtype} values as pixels (use uint8, or floats in [0, 1])")
    x = torch.as_tensor(array.astype(np.float32))
    low, high = (x.min().item(), x.max().item()) if x.numel() else (0, 0)
    if not (math.isfinite(low + high) and (0 <= low and high <= 1 or -1 <= low < 0 and high <= 1)):
        sys.exit(f"{PROG}: {name}: float pixels must be in [0, 1] or [-1, 1], got [{low:.3g}, {high:.3g}] "
                 "(save pixel values 0..255 as uint8)")
    return ((x + 1) / 2 if low < 0 else x).mul(255).round().to(torch.uint8)


def read_folder(folder: str, size: int):
    """The images of a folder as uint8 (N, 1, H, W) if all are grey, else (N, 3, H, W), resized to size×size
    (0: the first image's width). A folder with no images but subfolders of them, one per class
    (torchvision's ImageFolder layout), gives their images and the labels 0, 1, ... in sorted order."""
    from PIL import Image
    image = lambda p: p.lower().endswith((".png", ".jpg", ".jpeg", ".bmp"))  # noqa: E731
    paths, labels = sorted(os.path.join(folder, p) for p in os.listdir(folder) if image(p)), None
    if not paths:  # one subfolder per class?
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        found = [(os.path.join(folder, c, p), k) for k, c in enumerate(classes)
                 for p in sorted(os.listdir(os.path.join(folder, c))) if image(p)]
        paths, labels = [p for p, _ in found], torch.tensor([k for _, k in found])
    if not paths:
        sys.exit(f"{PROG}: no .png/.jpg/.bmp images in folder {folder} (nor in subfolders of it, one per class)")
    pictures = []
    for path in paths:  # one file open at a time
        try:
            with Image.open(path) as im:
                pictures.append(im.convert("L" if im.mode in ("L", "1") else "RGB"))
        except OSError as e:
            sys.exit(f"{PROG}: cannot read image {path}: {e}")
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"  # a folder of grey images stays grey
    size = size or pictures[0].size[0]
    return as_nchw(torch.as_tensor(np.stack([np.asarray(p.convert(mode).resize((size, size), Image.BICUBIC))
                                             for p in pictures])), folder), labels


def read_labels(path: str, n: int) -> torch.Tensor:
    """--labels FILE.npy: integer labels (N,), or one-hot rows (N, K) as the 16x16 Sprites set ships them."""
    try:
        y = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        sys.exit(f"{PROG}: cannot read --labels {path}: {first_line(e)}")
    y = y.argmax(1) if y.ndim == 2 else y
    if y.shape != (n,) or y.dtype.kind not in "iuf" or y.min() < 0 or (y != np.round(y)).any():
        sys.exit(f"{PROG}: --labels {path} must hold {n} labels 0, 1, ... (shape ({n},)) or {n} one-hot rows, "
                 f"got shape {y.shape} of {y.dtype}")
    return torch.as_tensor(y.astype(np.int64))
# <<< shared: data_files


# >>> shared: run
class Run:
    """Everything around a training loop that is not the algorithm: processes and device, the run directory,
    resuming, the log (stdout and metrics.csv), checkpoints, and a clean stop on Ctrl-C or SIGTERM, which saves
    a checkpoint at the current step. Only process 0 (torchrun's first, or the only one) writes files."""

    def __init__(self, cfg, needs: tuple = ()):
        # torchrun starts one process per GPU and sets RANK (which one), WORLD_SIZE (how many) and
        # LOCAL_RANK (which GPU of this machine); under plain python there is one: rank 0 of 1
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.rows = slice(self.rank, None, self.world)  # this process's rows of each batch: rank, rank + W, ...
        self.device = pick_device(cfg.device)
        if cfg.batch_size % self.world:  # --batch-size is the global batch: the run is the same on 1 or 8 GPUs
            sys.exit(f"{PROG}: --batch-size {cfg.batch_size} must be divisible by the number of processes ({self.world})")
        self.dir = cfg.out or f"runs/{PROG}-{os.path.basename(cfg.dataset.rstrip('/')).removesuffix('.npy')}"
        self.ckpt_path = cfg.ckpt or os.path.join(self.dir, "ckpt.pt")
        if not cfg.resume and os.path.exists(self.ckpt_path):  # never overwrite a trained model by accident
            sys.exit(f"{PROG}: {self.ckpt_path} exists; pass --resume to continue that run or --out NEW_DIR to start anew")
        self.state = load_checkpoint(self.ckpt_path) if cfg.resume else None
        missing = [k for k in (*needs, "rng_cpu") if self.state and k not in self.state]
        if missing:  # e.g. written by an older version: it can be sampled, not resumed
            sys.exit(f"{PROG}: {self.ckpt_path} lacks {', '.join(missing)} and cannot be resumed; use --out NEW_DIR "
                     "to start anew (--sample still reads it)")
        if self.state:  # what the networks are is fixed by the checkpoint (a field it predates: the default)
            cfg = dataclasses.replace(cfg, **{k: self.state["config"].get(k, getattr(type(cfg), k)) for k in ARCH_FIELDS})
        self.cfg, self.step0 = cfg, self.state["step"] if self.state else 0
        self.signal, self.metrics, self.saved, self.sums, self.count = None, None, self.step0 or None, None, 0
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed + self.rank)  # each process its own dropout masks
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls/convs

    def __enter__(self):  # Ctrl-C (SIGINT) and SIGTERM only raise a flag: the loop saves, then stops
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def on_signal(self, number, frame):
        if self.signal:  # a second Ctrl-C stops at once (the checkpoint on disk is intact)
            sys.exit(f"{PROG}: stopped at once by a second {self.signal}; the last checkpoint is {self.ckpt_path}")
        self.signal = signal.Signals(number).name

    def __exit__(self, *error):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        if self.metrics:
            self.metrics.close()
        if self.world > 1 and torch.distributed.is_initialized():
            if error[0] is None:  # a clean end: wait until every process is done (process 0 writes the last files),
                torch.distributed.barrier()  # so that none tears the group down while another still uses it
            torch.distributed.destroy_process_group()

    def start(self, **facts) -> None:
        """config.json and samples/; on resume, grids from after the checkpoint (a killed run's) are removed."""
        if self.rank == 0:
            os.makedirs(os.path.join(self.dir, "samples"), exist_ok=True)
            for name in os.listdir(os.path.join(self.dir, "samples")):
                if re.fullmatch(r"step_\d+\.png", name) and int(name[5:-4]) > self.step0:
                    os.remove(os.path.join(self.dir, "samples", name))
            with open(os.path.join(self.dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(self.cfg) | {"processes": self.world} | facts, f, indent=2)
        self.start_time = self.last_time = time.time()

    def restore(self, **objects) -> int:
        """Remember what a checkpoint holds (networks, optimisers, schedulers, generators, by name); on resume,
        load them and the random state, and take a new --lr if one is given. Returns the step to continue from."""
        self.objects, self.last_step = objects, self.step0
        if not self.state:
            return 0
        for name, thing in objects.items():
            getattr(thing, "set_state" if isinstance(thing, torch.Generator) else "load_state_dict")(self.state[name])
        if self.rank == 0:  # process 0 continues its dropout masks too (the others start fresh ones)
            torch.set_rng_state(self.state["rng_cpu"])
            if self.device.type == "cuda" and self.state.get("rng_cuda", torch.empty(0)).numel():
                torch.cuda.set_rng_state(self.state["rng_cuda"])
        self.sums, self.count = self.state.get("log_sums") or (None, 0)  # a log row cut short by a stop
        for thing in objects.values():  # --lr as given now (the same value changes nothing)
            for group in getattr(thing, "param_groups", []):
                group["lr"] = self.cfg.lr
        for s in (s for s in objects.values() if isinstance(s, torch.optim.lr_scheduler.LambdaLR)):
            s.base_lrs = [self.cfg.lr] * len(s.base_lrs)
            for group, factor in zip(s.optimizer.param_groups, s.lr_lambdas):
                group["lr"] = self.cfg.lr * factor(s.last_epoch)
        self.print(f"resumed from {self.ckpt_path} at step {self.step0} (learning rate {self.cfg.lr:g}, "
                   f"was {self.state['config']['lr']:g})")
        return self.step0

    def wrap(self, model):
        """The network as the loop calls it: DDP under torchrun (it averages the gradients in backward()),
        compiled with --compile. Both share `model`'s weights, which is what checkpoints save."""
        net = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        return torch.compile(net) if self.cfg.compile else net

    def describe(self, *models, note: str = "") -> None:
        millions = " + ".join(f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for m in models)
        self.print(f"{millions} parameters | {os.path.basename(self.cfg.dataset)} {self.cfg.image_size}px | {self.device} | "
                   f"{'bf16' if use_bf16(self.cfg, self.device) else 'fp32'} | {note} | batch {self.cfg.batch_size}"
                   + (f" = {self.world} processes × {self.cfg.batch_size // self.world}" if self.world > 1 else ""))

    def print(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def due(self, step: int, every: int) -> bool:  # for what only process 0 does: grids, checkpoints
        return self.rank == 0 and (step % every == 0 or step == self.cfg.steps)

    def fixed_noise(self, offset: int = 0) -> torch.Generator:  # the same noise every time: grids show progress
        return torch.Generator(self.device).manual_seed(self.cfg.seed + offset)

    def diverged(self, step: int, what: str):
        kept = (f"{self.ckpt_path} holds the last good one (step {self.saved}); lower --lr and continue with "
                "--resume --lr NEW_LR") if self.saved else "no checkpoint was written; lower --lr and start again"
        sys.exit(f"{PROG}: training diverged by step {step} ({what}); {kept}")

    def log(self, step: int, **values) -> None:
        """Add this step's values to running sums (tensors stay on the device: no synchronisation); every
        --log-every steps print their means with the speed, write a row of metrics.csv, and check them."""
        tensors = torch.stack([v.float() for v in values.values() if torch.is_tensor(v)])
        self.sums, self.count = (tensors if self.sums is None else self.sums + tensors), self.count + 1
        if step % self.cfg.log_every and step != self.cfg.steps:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.sums)  # the sum over every process, in every process
        means = iter((self.sums / self.count / self.world).tolist())
        row = {k: next(means) if torch.is_tensor(v) else v for k, v in values.items()}
        if not all(math.isfinite(v) for k, v in row.items() if torch.is_tensor(values[k])):
            self.diverged(step, ", ".join(f"{k} {v}" for k, v in row.items()))
        now = time.time()
        speed = (step - self.last_step) * self.cfg.batch_size / (now - self.last_time)
        self.print(f"step {step:>7}/{self.cfg.steps} | " + " | ".join(f"{k} {v:#.4g}" for k, v in row.items())
                   + f" | {speed:7.1f} img/s | ETA {(self.cfg.steps - step) * self.cfg.batch_size / speed / 3600:5.2f} h")
        if self.rank == 0:
            self.metrics = self.metrics or open_metrics(os.path.join(self.dir, "metrics.csv"), self.step0,
                                                        ["step", *row, "images_per_s", "elapsed_s"])
            csv.writer(self.metrics).writerow([step, *(f"{v:.6g}" for v in row.values()), f"{speed:.1f}",
                                               f"{now - self.start_time:.1f}"])
            self.metrics.flush()
        self.sums, self.count, self.last_time, self.last_step = None, 0, now, step

    def stopping(self, step: int) -> bool:
        """Has Ctrl-C or SIGTERM asked us to stop? Under torchrun the processes agree on it at log steps."""
        if self.world == 1:
            return self.signal is not None
        if step % self.cfg.log_every and step != self.cfg.steps:
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signal = self.signal or ("SIGTERM" if flag.item() else None)
        return self.signal is not None

    def save(self, step: int, path: str = "", **extra) -> None:
        """Checkpoint what restore() named, the step, the config and the random state, if every weight is
        finite (a diverged run keeps its last good checkpoint). After a stop signal, this ends the run."""
        if self.rank == 0:
            weights = [w for m in self.objects.values() if isinstance(m, nn.Module) for w in m.state_dict().values()]
            if not torch.stack([w.float().isfinite().all() for w in weights]).all():  # one synchronisation
                self.diverged(step, "NaN or infinite weights")
            save_checkpoint(path or self.ckpt_path, extra | {
                k: v.get_state() if isinstance(v, torch.Generator) else v.state_dict() for k, v in self.objects.items()
            } | {"step": step, "config": dataclasses.asdict(self.cfg), "script": PROG, "log_sums": (self.sums, self.count),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.empty(0)})
            self.saved = self.saved if path else step
        if self.signal and not path:
            sys.exit(f"{PROG}: stopped by {self.signal} at step {step}, saved to {self.ckpt_path}; continue with "
                     "the same command and --resume")
        if step == self.cfg.steps and not path:
            self.print(f"done: {step} steps in {(time.time() - self.start_time) / 60:.1f} min; run in {self.dir}")

    def untimed(self, work):
        """work() (a grid, a quality check), off the training clock: img/s and the ETA count training steps only."""
        start = time.time()
        result = work()
        self.last_time += time.time() - start
        return result

    def save_grid(self, step: int, make_images) -> None:
        """samples/step_N.png from make_images(), and progression.png, off the training clock."""
        save_grid(self.untimed(make_images), os.path.join(self.dir, "samples", f"step_{step:07d}.png"))
        stack_progression(os.path.join(self.dir, "samples"), os.path.join(self.dir, "progression.png"))
# <<< shared: run


# >>> shared: plumbing
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"{PROG}: --device {name} is not available here; use --device cpu or auto")
    return torch.device(name)


def use_bf16(cfg, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, then rename: a kill (or a full disk) mid-write never leaves a broken ckpt.pt."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        sys.exit(f"{PROG}: cannot write {path} ({first_line(e)}; {free:.0f} MiB free on that disk): "
                 f"the previous checkpoint is intact; free some space and continue with --resume")


def load_checkpoint(path: str, needs: tuple = ("config", "step")) -> dict:
    """A checkpoint of a script in READS, with the keys `needs`; else one line saying what the file is."""
    if not os.path.isfile(path):
        sys.exit(f"{PROG}: checkpoint {path} does not exist; train first, or pass --ckpt RUN/ckpt.pt")
    if os.path.getsize(path) == 0:
        sys.exit(f"{PROG}: checkpoint {path} is empty (0 bytes): a copy or a download cut short?")
    try:  # weights_only: a checkpoint from a stranger cannot run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"{PROG}: cannot read checkpoint {path}: {type(e).__name__}: {first_line(e)}")
    writer = state.get("script", guess_writer(state)) if isinstance(state, dict) else None
    if writer not in READS or not all(k in state for k in needs):
        what = f"was written by {writer}.py" if writer else f"is {describe_object(state)}"
        sys.exit(f"{PROG}: {path} {what}, not a checkpoint of {' or '.join(s + '.py' for s in READS)}"
                 + (f"; use {writer}.py with it" if writer else ""))
    return state


def guess_writer(state: dict):
    """Which script wrote a checkpoint that predates the "script" entry, from the entries it has."""
    keys = set(state)
    for script, entries in (("ddpm", {"ema", "model"}), ("dcgan", {"generator", "discriminator"}),
                            ("vaegan", {"model", "optimizers"}), ("vae", {"model", "optimizer"})):
        if entries <= keys and "config" in keys:
            return script  # (ddim.py writes the same entries as ddpm.py)
    return None


def describe_object(thing) -> str:
    if isinstance(thing, dict):
        return "a bare state_dict (weights only)" if thing and all(map(torch.is_tensor, thing.values())) \
            else f"a dict with keys {', '.join(sorted(map(str, thing))[:5]) or 'none'}"
    return f"a {type(thing).__name__}"


def open_metrics(path: str, step: int, header: list):
    """metrics.csv, open for appending. On resume, rows logged after the checkpoint's step are dropped
    (they will be logged again); the file is rewritten to a temporary file and renamed, so a kill at
    any moment leaves either the old file or the new one, never a shorter one."""
    rows = []
    if step and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    os.replace(path + ".tmp", path)
    return open(path, "a", newline="")


def save_grid(x: torch.Tensor, path: str, nrow: int = 8) -> None:
    import torchvision
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image(x.float().cpu() * 0.5 + 0.5, path, nrow=nrow)  # [-1, 1] -> [0, 1]


def save_pngs(x: torch.Tensor, folder: str, labels=None) -> None:
    """One PNG per image (000000.png, ..., or 000000_class3.png with labels), the format FID tools read."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # drop this script's earlier images there, or an FID tool would count them
        if re.fullmatch(r"\d{6}(_class\d+)?\.png", old):
            os.remove(os.path.join(folder, old))
    pixels = ((x.float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i, p in enumerate(pixels):  # (H, W, C) uint8
        name = f"{i:06d}.png" if labels is None else f"{i:06d}_class{int(labels[i])}.png"
        Image.fromarray(p[:, :, 0] if p.shape[2] == 1 else p).save(os.path.join(folder, name))


def sample_dir(cfg, state: dict) -> str:
    """Where --sample writes: the checkpoint's folder if this script wrote it, else a subfolder named after
    this script (and --out anywhere), so that sampling another script's run never replaces its files."""
    folder = os.path.dirname(os.path.abspath(cfg.ckpt))
    return folder if state.get("script", guess_writer(state)) == PROG else os.path.join(folder, f"{PROG}-samples")


def stack_progression(folder: str, out_path: str) -> None:
    """Stack the first row of every samples/step_N.png into one image: samples over training."""
    from PIL import Image
    grids = []
    for name in sorted(f for f in os.listdir(folder) if re.fullmatch(r"step_\d+\.png", f)):
        try:  # a grid cut short by a kill is skipped, not fatal
            with Image.open(os.path.join(folder, name)) as grid:
                grids.append(grid.convert("RGB"))
        except OSError:
            pass
    if not grids:
        return
    height = (grids[0].width - 2) // 8 + 2  # save_grid: 8 tiles a row with 2-pixel padding
    canvas = Image.new("RGB", (grids[0].width, height * len(grids)))
    for i, grid in enumerate(grids):
        canvas.paste(grid.crop((0, 0, grid.width, height)), (0, i * height))
    canvas.save(out_path)


def run_fid(cfg, images: torch.Tensor, run_dir: str, step: int) -> float:
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


if __name__ == "__main__":
    run_main(main)
