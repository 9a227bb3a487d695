"""vaegan.py: the VAE-GAN hybrid (a VAE whose reconstruction error is measured by a GAN) in one file.

Larsen, Sønderby, Larochelle & Winther 2016, "Autoencoding beyond pixels using a learned similarity
metric", https://arxiv.org/abs/1512.09300 (their code: github.com/andersbll/autoencoding_beyond_pixels)

A VAE's decoder redraws each pixel, so it hedges: its images are blurry averages. The VAE-GAN measures
the reconstruction error in the features of a GAN discriminator's inner layer instead, and trains the
decoder (also the GAN's generator) to make its reconstructions and its decodings of z ~ N(0, I) pass as real.
Three networks, three losses, and each network is updated by its own combination (Algorithm 1):
    encoder        ← L_prior + L_llike            (a VAE, with the pixel term replaced by L_llike)
    decoder        ← γ · L_llike − L_GAN          (reconstruct in feature space, and fool the discriminator)
    discriminator  ← L_GAN                        (tell real from reconstructed and generated images)

Commands
  python vaegan.py                          # CIFAR-10, 40k steps of 128 (≈ 100 epochs), GPU; not yet measured
  python vaegan.py --sample --ckpt runs/vaegan-cifar10/ckpt.pt --num-samples 50000 --fid 50000
  python vaegan.py --dataset mnist --steps 2600 --precision bf16 --device cpu ...
        # the CPU recipe: 14 min on 2 cores, prior samples at MNIST-FID 122 (vae.py's: 174); README.md
  python vaegan.py --sample --reconstruct --ckpt RUN/ckpt.pt   # reconstructions of test images, as PNGs

Sections
  1. Config     2. Data (+ the test split)     3. Model (encoder, decoder, discriminator)
  4. Objective (L_prior, L_llike, L_GAN, and which network each updates)     5. Sampler     6. Train     7. Main

Where the authors' code departs from the paper, and what we do
  - Fakes: both count reconstructions x̃ and decoded prior draws x_p as fakes. Algorithm 1's L_GAN
    weighs the real, x̃ and x_p terms 1 : 1 : 1; the code 0.5 : 0.25 : 0.25 in D's gradient. We follow the paper.
  - The decoder's adversarial term: the paper's −L_GAN is the saturating log(1 − D(·)), and so is the
    code's (D's gradient reversed, an ε inside the log). We use the non-saturating −log D(·) of dcgan.py:
    the same fixed point, but strong gradients early on, when D rejects every fake and log(1 − D) is flat.
  - Gating: the code (not the paper) skips D's update when its loss on reals or fakes falls below
    0.68 − 0.35, and the decoder's when it rises above 0.68 + 0.35. We do not gate: every step updates all
    three networks, as Algorithm 1 does; metrics.csv logs D(x), D(x̃), D(x_p) to watch the balance (on
    MNIST, D sat near chance from step ~400 on and the samples improved anyway: README.md).
  - Gradient routing: L_GAN does not reach the encoder (the paper's "limiting error signals", the code's
    zero gradient scale on z) and L_llike does not reach D (paper and code agree). So here; tests check it.
  - Feature layer: the code reads the 4th convolution (before BatchNorm) of a BatchNorm D on 64 px faces.
    Our D has no BatchNorm (an image's features then depend on that image alone, not on its batch);
    L_llike reads its last convolution, before the activation.
  - Adam (2e-4, β₁ = 0.5, as dcgan.py) for all three nets, not RMSProp with a decaying rate. With Adam
    the decoder's step depends only on the ratio γ / --adv-weight (Adam is blind to a loss's scale);
    both flags stay, so that each reads as in the paper and the seed study.
  - Batches are drawn uniformly with replacement instead of in shuffled epochs, as in ddpm.py.
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vaegan": names runs and error messages


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
    # --- objective ---
    gamma: float = 1e-3  # γ: weight of L_llike (feature-space reconstruction) in the decoder's loss (README: why 1e-3)
    adv_weight: float = 0.1  # weight of the adversarial term in the decoder's loss (the seed study: 0.1)
    # --- optimisation ---
    steps: int = 40_000  # training steps, each one update of all three networks (40k x 128 ≈ 100 CIFAR-10 epochs)
    batch_size: int = 128  # real images per step (and as many reconstructions and prior draws); also the sampling batch
    lr: float = 2e-4  # Adam learning rate of all three networks (DCGAN's 2e-4)
    beta1: float = 0.5  # Adam β₁ (DCGAN's 0.5)
    # --- run ---
    out: str = ""  # run directory ("": runs/vaegan-<dataset>)
    device: str = "auto"  # auto | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the networks for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (from the same fixed z) and reconstructions
    ckpt_every: int = 2000  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or to sample from
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs decoded from prior draws z ~ N(0, I) with --ckpt
    reconstruct: bool = False  # with --sample: reconstruct the first --num-samples test images instead
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate (or reconstruct) this many images and print their FID (needs fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; a path; see fid.py)


CHOICES = {"device": ("auto", "cuda", "cpu", "mps"), "precision": ("auto", "fp32", "bf16")}
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "d_channels")  # fixed by a checkpoint: taken from it


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


def down_path(image_channels: int, width: int, halvings: int) -> list:
    """Strided 4x4 convs + LeakyReLU(0.2), halving the size, doubling the width: (B, C, S, S) -> (B, w_last, side, side)"""
    widths = [width * 2 ** i for i in range(halvings)]
    layers = [nn.Conv2d(image_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, S/2, S/2)
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, a, s, s) -> (B, b, s/2, s/2)
    return layers


class Encoder(nn.Module):
    """q(z|x) = N(μ(x), diag σ²(x)): image (B, C, S, S) -> μ, log σ² (B, latent) each."""

    def __init__(self, image_channels: int, image_size: int, width: int, latent: int):
        super().__init__()
        side, halvings = layer_plan(image_size)
        self.net = nn.Sequential(*down_path(image_channels, width, halvings), nn.Flatten())  # (B, w_last·side²)
        self.to_stats = nn.Linear(width * 2 ** (halvings - 1) * side * side, 2 * latent)  # (B, 2·latent)

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
    """Dis(x): image (B, C, S, S) -> logit (B,) and Dis_l(x) (B, w_last, side, side), the last convolution's output."""

    def __init__(self, image_channels: int, image_size: int, width: int):
        super().__init__()
        side, halvings = layer_plan(image_size)
        w_last = width * 2 ** (halvings - 1)
        self.body = nn.Sequential(*down_path(image_channels, width, halvings),
                                  nn.Conv2d(w_last, w_last, 3, 1, 1))  # Dis_l: (B, w_last, side, side)
        self.head = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(w_last, 1, side))  # (B, 1, 1, 1): a linear layer

    def forward(self, x):
        features = self.body(x)
        return self.head(features).flatten(), features  # (B,) logits; D(x) = σ(logit) = P(x is real)


class VAEGAN(nn.Module):
    def __init__(self, image_channels=3, image_size=32, latent=128, channels=64, d_channels=64):
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(image_channels, image_size, channels, latent)
        self.decoder = Decoder(image_channels, image_size, channels, latent)
        self.discriminator = Discriminator(image_channels, image_size, d_channels)


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. Sec. 4): convolutions from N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_model(cfg: Config, image_channels: int) -> VAEGAN:
    return VAEGAN(image_channels, cfg.image_size, cfg.latent, cfg.channels, cfg.d_channels).apply(init_weights)


# =============================================================================================
# 4. Objective: three losses (Larsen et al. Sec. 2 and Algorithm 1), and who learns from which
# =============================================================================================
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) per image, in nats: (B, latent) -> (B,)."""
    # Kingma & Welling 2014, Appendix B:  −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²)
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)


def feature_loss(features_real: torch.Tensor, features_recon: torch.Tensor) -> torch.Tensor:
    """L_llike per image, (B, ...) -> (B,). Sec. 2.3: Dis_l(x) is Gaussian around Dis_l(x̃), with unit variance."""
    # L_llike = −log N(Dis_l(x) | Dis_l(x̃), I) = ½ ‖Dis_l(x) − Dis_l(x̃)‖² + const, summed over features
    return 0.5 * (features_real - features_recon).square().flatten(1).sum(1)


def vaegan_losses(model: VAEGAN, x: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor) -> dict:
    """One forward pass of Algorithm 1 on a batch x (B, C, H, W), with ε and z_p (B, latent) from N(0, I).
    Returns the four batch-mean losses, and the three mean probabilities D(·) for metrics.csv."""
    B = len(x)
    mu, logvar = model.encoder(x)  # (B, latent) each
    z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation: z ~ q(z|x), differentiable in μ and σ
    # x̃ = Dec(z) and x_p = Dec(z_p) in one batch: one pass, and BatchNorm sees both kinds of codes
    x_recon, x_prior = model.decoder(torch.cat([z, z_prior])).split(B)  # (B, C, H, W) each
    # the discriminator on real, reconstructed and generated images in one batch (no BatchNorm: no mixing)
    logits, features = model.discriminator(torch.cat([x, x_recon, x_prior]))  # (3B,), (3B, w, s, s)
    logits_real, logits_recon, logits_prior = logits.float().split(B)  # (B,) each
    features_real, features_recon, _ = features.float().split(B)
    bce = F.binary_cross_entropy_with_logits  # BCE(ℓ, 1) = −log σ(ℓ) = −log D;  BCE(ℓ, 0) = −log(1 − D)
    ones, zeros = torch.ones_like(logits_real), torch.zeros_like(logits_real)
    # L_prior = KL(q(z|x) ‖ p(z)),  p(z) = N(0, I)   (the VAE's regulariser, kept as it is)
    prior = kl_divergence(mu.float(), logvar.float()).mean()
    # L_llike = ½ ‖Dis_l(x) − Dis_l(x̃)‖²: the reconstruction error, in the discriminator's features
    llike = feature_loss(features_real, features_recon).mean()
    # Algorithm 1, as a loss to minimise:  −L_GAN = −log Dis(x) − log(1 − Dis(x̃)) − log(1 − Dis(x_p))
    gan_discriminator = bce(logits_real, ones) + bce(logits_recon, zeros) + bce(logits_prior, zeros)
    # the decoder's side, non-saturating (see header):  −log Dis(x̃) − log Dis(x_p)
    gan_decoder = bce(logits_recon, ones) + bce(logits_prior, ones)
    probabilities = torch.sigmoid(logits.detach().float()).view(3, B).mean(1)  # D(x), D(x̃), D(x_p)
    return {"prior": prior, "llike": llike, "gan_decoder": gan_decoder, "gan_discriminator": gan_discriminator,
            "probabilities": probabilities}


def set_gradients(model: VAEGAN, losses: dict, gamma: float, adv_weight: float) -> None:
    """Algorithm 1's update rules: each network's .grad is the gradient of its own loss and nothing else.
    autograd.grad(loss, params) differentiates for `params` only: L_GAN depends on the encoder (through z)
    and L_llike on the discriminator (through Dis_l), but those gradients are never asked for."""
    networks = (model.encoder, model.decoder, model.discriminator)
    # θ_Enc ← −∇_θEnc (L_prior + L_llike)
    encoder_loss = losses["prior"] + losses["llike"]
    # θ_Dec ← −∇_θDec (γ · L_llike − L_GAN),  with our weighted, non-saturating adversarial term
    decoder_loss = gamma * losses["llike"] + adv_weight * losses["gan_decoder"]
    # θ_Dis ← −∇_θDis L_GAN   (as a loss: −L_GAN)
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
def generate(model, cfg: Config, n: int, shape, device, generator) -> torch.Tensor:
    """n images Dec(z), z ~ N(0, I): (n, C, H, W) in [-1, 1], on the host. Eval mode: an image depends on its z only."""
    model.eval()  # (the training loop sets train() again at every step)
    z = torch.randn(n, model.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([model.decoder(z[i:i + cfg.batch_size]).float().cpu() for i in range(0, n, cfg.batch_size)])


@torch.no_grad()
def reconstruct(model, cfg: Config, images: torch.Tensor, device) -> torch.Tensor:
    """x → μ(x) → Dec(μ): the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    model.eval()  # μ(x) and running BatchNorm statistics: a deterministic image of each input
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([model.decoder(model.encoder(images[i:i + cfg.batch_size].to(device))[0]).float().cpu()
                          for i in range(0, len(images), cfg.batch_size)])


# >>> shared: above_below
def above_below(inputs: torch.Tensor, outputs: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Interleave rows: 8 inputs, then their 8 outputs, then the next 8 inputs ... (for save_grid)."""
    per_row = min(per_row, len(inputs))
    rows = len(inputs) // per_row
    pairs = torch.stack([inputs[:rows * per_row].view(rows, per_row, *inputs.shape[1:]),
                         outputs[:rows * per_row].view(rows, per_row, *inputs.shape[1:])], 1)
    return pairs.flatten(0, 2)  # (rows·2·per_row, C, H, W)
# <<< shared: above_below


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
    ckpt_path = cfg.ckpt or os.path.join(run_dir, "ckpt.pt")
    if not cfg.resume and os.path.exists(ckpt_path):  # never overwrite a trained model by accident
        sys.exit(f"{PROG}: {ckpt_path} exists; pass --resume to continue that run or --out NEW_DIR to start anew")
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    if state:  # the networks are fixed by the checkpoint
        cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls/convs
    data, test = get_test_data(cfg, get_data(cfg))  # (N, C, H, W) in [-1, 1]; test stays on the host
    data = data.to(device)
    cfg.image_size = data.shape[-1]
    layer_plan(cfg.image_size)  # a size the networks cannot handle: one line, before anything is written
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- core: the networks and one optimiser each (their losses differ, so do their Adam statistics) ---
    model = build_model(cfg, data.shape[1]).to(device)
    optimizers = {name: torch.optim.Adam(getattr(model, name).parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
                  for name in ("encoder", "decoder", "discriminator")}
    step = 0
    if state:
        model.load_state_dict(state["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        step = state["step"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"])
        print(f"resumed from {ckpt_path} at step {step}")
    train_model = torch.compile(model) if cfg.compile else model  # shares the weights; we save `model`
    millions = [sum(p.numel() for p in getattr(model, n).parameters()) / 1e6 for n in optimizers]
    print(f"encoder {millions[0]:.2f}M + decoder {millions[1]:.2f}M + discriminator {millions[2]:.2f}M parameters | "
          f"{len(data)} images {tuple(data.shape[1:])}, {len(test)} test | {device} | "
          f"{'bf16' if use_bf16(cfg, device) else 'fp32'} | latent {cfg.latent}, γ={cfg.gamma}, adv {cfg.adv_weight}")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "step": step, "config": dataclasses.asdict(cfg), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0)})

    def sample_grid():  # the same z's and test images every time: the grids show progress, not luck
        generator = torch.Generator(device).manual_seed(cfg.seed)
        save_grid(generate(model, cfg, 64, data.shape[1:], device, generator),
                  os.path.join(run_dir, "samples", f"step_{step:07d}.png"))
        stack_progression(os.path.join(run_dir, "samples"), os.path.join(run_dir, "progression.png"))
        shown = test[:32]  # never trained on
        save_grid(above_below(shown, reconstruct(model, cfg, shown, device)),
                  os.path.join(run_dir, "reconstructions.png"))

    columns = ["prior", "llike", "gan_decoder", "gan_discriminator", "d_real", "d_recon", "d_prior"]
    metrics = open_metrics(os.path.join(run_dir, "metrics.csv"), step, ["step", *columns, "images_per_s", "elapsed_s"])
    writer = csv.writer(metrics)
    sums, start, last_time, last_step = torch.zeros(7, device=device), time.time(), time.time(), step
    while step < cfg.steps:
        # --- core: one step of Algorithm 1: all losses from one forward pass, then all three updates ---
        model.train()
        x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W)
        eps = torch.randn(cfg.batch_size, cfg.latent, device=device)  # ε for z = μ + σ ε
        z_prior = torch.randn(cfg.batch_size, cfg.latent, device=device)  # z_p ~ N(0, I)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            losses = vaegan_losses(train_model, x, eps, z_prior)
        set_gradients(model, losses, cfg.gamma, cfg.adv_weight)
        for optimizer in optimizers.values():
            optimizer.step()
        sums += torch.cat([torch.stack([losses[c].detach() for c in columns[:4]]), losses["probabilities"]])
        step += 1

        # --- plumbing: log, sample, checkpoint ---
        if step % cfg.log_every == 0 or step == cfg.steps:
            means = (sums / (step - last_step)).tolist()
            if not all(map(math.isfinite, means)):
                sys.exit(f"{PROG}: a loss became {means} by step {step}; lower --lr and run again "
                         f"with --resume (it continues from the last checkpoint, written before this)")
            now = time.time()
            speed = (step - last_step) * cfg.batch_size / (now - last_time)
            print(f"step {step:>7}/{cfg.steps} | KL {means[0]:6.2f} | llike {means[1]:9.2f} | G {means[2]:.3f} | "
                  f"D {means[3]:.3f} | D(x) {means[4]:.2f} D(x̃) {means[5]:.2f} D(x_p) {means[6]:.2f} | "
                  f"{speed:6.1f} img/s | ETA {(cfg.steps - step) * cfg.batch_size / speed / 3600:5.2f} h", flush=True)
            writer.writerow([step, *(f"{m:.6f}" for m in means), f"{speed:.1f}", f"{now - start:.1f}"])
            metrics.flush()
            sums.zero_()
            last_time, last_step = now, step
        if step % cfg.sample_every == 0 or step == cfg.steps:
            sample_grid()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
    metrics.close()
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; run in {run_dir}")
    if cfg.fid:
        run_fid(cfg, generate(model, cfg, cfg.fid, data.shape[1:], device,
                              torch.Generator(device).manual_seed(cfg.seed + 1)), run_dir, step)


# =============================================================================================
# 7. Main: train, or generate from a checkpoint
# =============================================================================================
def load_for_sampling(cfg: Config):
    """The networks of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt)
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["model"]["encoder.net.0.weight"].shape[1]  # the encoder's first convolution reads the image
    model = build_model(cfg, channels)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state["step"]


def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the speed (and FID with --fid). The images
    are prior samples, or with --reconstruct the reconstructions of the first N test images."""
    device = pick_device(cfg.device)
    model, cfg, shape, step = load_for_sampling(cfg)
    model.to(device)
    run_dir = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt))
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    if cfg.reconstruct:
        _, test = get_test_data(cfg, get_data(cfg))
        if len(test) < n:
            sys.exit(f"{PROG}: --num-samples/--fid {n}: only {len(test)} test images to reconstruct")
        images, name = reconstruct(model, cfg, test[:n], device), "reconstructed"
        save_grid(above_below(test[:min(n, 64)], images[:64]), os.path.join(run_dir, f"{name}_grid.png"))
    else:
        images, name = generate(model, cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed)), "generated"
        save_grid(images[:64], os.path.join(run_dir, f"{name}_grid.png"))
    seconds = time.time() - start  # generate() and reconstruct() end by copying to the host: the clock is honest
    save_pngs(images, os.path.join(run_dir, name))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          f"reconstruct={cfg.reconstruct}) -> {run_dir}/{name}/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, step)


def main(cfg: Config) -> None:
    for name in ("latent", "channels", "d_channels", "steps", "batch_size", "log_every", "sample_every",
                 "ckpt_every", "num_samples"):
        if getattr(cfg, name) < 1:
            sys.exit(f"{PROG}: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.gamma < 0 or cfg.adv_weight < 0 or cfg.lr <= 0 or not 0 <= cfg.beta1 < 1 or cfg.fid < 0:
        sys.exit(f"{PROG}: need --gamma >= 0, --adv-weight >= 0, --lr > 0, 0 <= --beta1 < 1 and --fid >= 0")
    if cfg.sample and not cfg.ckpt:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/ckpt.pt (a checkpoint written by training)")
    if cfg.reconstruct and not cfg.sample:
        sys.exit(f"{PROG}: --reconstruct works with --sample --ckpt RUN/ckpt.pt")
    if cfg.sample:
        sample_mode(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main(parse_args())
