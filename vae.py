"""vae.py: a convolutional Variational Autoencoder in one file.

Kingma & Welling 2014, "Auto-Encoding Variational Bayes", https://arxiv.org/abs/1312.6114
(found at the same time by Rezende, Mohamed & Wierstra 2014, https://arxiv.org/abs/1401.4082)

A VAE is a latent-variable model: draw a code z ~ p(z) = N(0, I), decode it into an image x ~ p(x|z).
Its likelihood p(x) = ∫ p(x|z) p(z) dz cannot be computed, so an encoder q(z|x) guesses which codes
could have made x, and both nets are trained together on the evidence lower bound (ELBO, Eq. 3):
    log p(x)  ≥  E_q(z|x)[log p(x|z)]  −  KL(q(z|x) ‖ p(z))          (reconstruction − KL)
The first term asks the code to keep what the decoder needs to redraw x; the second asks every
image's codes to look like draws from the prior, so that decoding a fresh z ~ N(0, I) gives a new image.

Commands
  python vae.py                   # CIFAR-10, Bernoulli decoder, 40k steps (about the seed study's 100
                                  # epochs at batch 128); not yet measured here
  python vae.py --likelihood gaussian   # discretised Gaussian decoder, learned σ: −ELBO in nats of the
                                  # 8-bit image, comparable with other models' bits/dim
  python vae.py --sample --ckpt runs/vae-cifar10/ckpt.pt --num-samples 50000 --fid 50000
  python vae.py --dataset mnist --likelihood bernoulli --channels 16 --steps 8000 --precision bf16 ...
        # the CPU recipe: 11 min on 2 cores, test −ELBO 97.4 nats (pytorch/examples' MLP VAE: ≈ 104);
        # the exact command and its MNIST scores are in README.md
  python vae.py --sample --reconstruct --ckpt RUN/ckpt.pt    # reconstructions of test images, as PNGs

Sections
  1. Config     2. Data (+ the test split)     3. Model (encoder, decoder)     4. Objective (the ELBO)
  5. Sampler (prior samples, reconstructions, interpolations)     6. Train     7. Main

Where we depart from the paper (and why)
  - Convolutional encoder and decoder instead of the paper's one-hidden-layer MLPs, and Adam instead
    of Adagrad: what every VAE since uses. The model class, the objective and the estimator are the paper's.
  - Gaussian decoder: the paper's density is replaced by the same Gaussian's mass on each 8-bit pixel's
    bin (as Ho et al. 2020 do for their last step), so −ELBO is in nats of the actual 8-bit image,
    comparable with other models' bits/dim. A plain density on discrete pixels has no lower limit.
  - The default decoder is Bernoulli, on grey levels, as in pytorch/examples: on MNIST its prior samples
    scored far better than the Gaussian decoder's (README.md has the figures); the Gaussian gives
    sharper reconstructions and honest bits/dim, but its prior draws fall between the training codes.
  - Images shown are the decoder's mean E[x|z], not a draw from p(x|z): independent pixel noise would
    only add static (every VAE paper shows means). Likelihoods are always those of p(x|z) itself.
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vae": names runs and error messages


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
    latent: int = 128  # dimensions of the code z (the seed study's 128)
    channels: int = 32  # channels after the first convolution, doubled at every halving of the resolution
    likelihood: str = "bernoulli"  # decoder p(x|z): bernoulli (grey levels as probabilities) | gaussian (discretised, learned σ)
    sigma: float = 0.1  # σ of the Gaussian decoder on the [-1, 1] pixel scale (with --learn-sigma: its start)
    learn_sigma: bool = True  # learn σ by the ELBO (one σ for all pixels: a calibrated decoder), else keep it fixed
    beta: float = 1.0  # weight of the KL term in the training loss (1: the ELBO; the test −ELBO always uses 1)
    # --- optimisation ---
    steps: int = 40_000  # training steps (the seed study: 100 epochs of CIFAR-10 at batch 128 ≈ 39k)
    batch_size: int = 128  # images per step (the seed study: 128); also the sampling batch
    lr: float = 1e-3  # Adam learning rate (the seed study: 1e-3)
    # --- run ---
    out: str = ""  # run directory ("": runs/vae-<dataset>)
    device: str = "auto"  # auto | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the network for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (from the same fixed z), reconstructions, interpolations
    ckpt_every: int = 2000  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or to sample from
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs decoded from prior draws z ~ N(0, I) with --ckpt
    reconstruct: bool = False  # with --sample: reconstruct the first --num-samples test images instead
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate (or reconstruct) this many images and print their FID (needs fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; a path; see fid.py)


CHOICES = {"likelihood": ("bernoulli", "gaussian"), "device": ("auto", "cuda", "cpu", "mps"),
           "precision": ("auto", "fp32", "bf16")}
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "likelihood", "sigma",
               "learn_sigma")  # fixed by a checkpoint: taken from it


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
# 3. Model: a convolutional encoder q(z|x) and decoder p(x|z)
# =============================================================================================
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
        down = [nn.Conv2d(image_channels, channels, 3, padding=1), nn.SiLU()]  # (B, ch, H, W)
        for c_in, c_out in zip(chs, chs[1:]):  # each level: (B, c_in, h, w) -> (B, c_out, h/2, w/2)
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU(),
                     nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*down, nn.Flatten())  # (B, c·h·w) with c, h, w = self.hidden
        self.to_stats = nn.Linear(math.prod(self.hidden), 2 * latent)  # -> (B, 2·latent): μ and log σ²
        self.from_latent = nn.Linear(latent, math.prod(self.hidden))  # z (B, latent) -> (B, c·h·w)
        up = []
        for c_in, c_out in zip(chs[::-1], chs[-2::-1]):  # each level: (B, c_in, h, w) -> (B, c_out, 2h, 2w)
            up += [nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                   nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1)]
        self.decoder = nn.Sequential(*up, nn.SiLU(), nn.Conv2d(channels, image_channels, 3, padding=1))
        if likelihood == "gaussian":  # log σ of p(x|z): one number for all pixels, learned or fixed
            self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)), requires_grad=learn_sigma)

    def encode(self, x):  # x: (B, C, H, W) in [-1, 1]
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)  # (B, latent) each
        return mu, logvar

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


# =============================================================================================
# 4. Objective: the ELBO, each term in closed form or with one sample of z
# =============================================================================================
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) in nats per image, for q = N(μ, diag σ²): (B, latent) -> (B,)."""
    # Appendix B:  −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²), exact, so no sampling noise in this term
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per image for p(x_i|z) = Bernoulli(p_i), p = sigmoid(logits): (B, C, H, W) -> (B,).
    The grey level (x + 1)/2 ∈ [0, 1] is the target, as in pytorch/examples' VAE. It is an exact
    log-probability only for binary images; for grey levels it is a cross-entropy (never reaches 0)."""
    target = (x + 1) / 2
    # log p(x|z) = Σ_i  x_i log p_i + (1 − x_i) log(1 − p_i)    (Appendix C.1)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum((1, 2, 3))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per image for 8-bit pixels x ∈ {−1, −1 + 2/255, …, 1}: (B, C, H, W) -> (B,).
    Each pixel's probability is the mass of N(mean, σ²) on its bin [x − 1/255, x + 1/255], the two end
    bins stretching to ±∞ (Ho et al. 2020, Eq. 13). A probability, not a density: it is at most 1,
    so −log p(x|z) ≥ 0 and a learned σ cannot shrink without limit on constant (e.g. black) pixels."""
    inv_sigma = torch.exp(-log_sigma)
    upper = torch.where(x > 1 - 1e-3, 1e4, (x + 1 / 255 - mean) * inv_sigma)  # bin edges in units of σ;
    lower = torch.where(x < -1 + 1e-3, -1e4, (x - 1 / 255 - mean) * inv_sigma)  # 1e4 stands in for ±∞
    # P = Φ(upper) − Φ(lower), and  log P = log Φ(u) + log(1 − Φ(l)/Φ(u)). For a bin above the mean we
    # use the mirror image Φ(−lower) − Φ(−upper): floating point keeps Φ's far tail, but not 1 − tiny
    above = x > mean
    u, l = torch.where(above, -lower, upper), torch.where(above, -upper, lower)
    log_u, log_l = torch.special.log_ndtr(u), torch.special.log_ndtr(l)
    return (log_u + torch.log(-torch.expm1(log_l - log_u))).sum((1, 2, 3))


def log_likelihood(model: VAE, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log p(x|z) in nats per image, given the decoder's output for z: (B,)."""
    if model.likelihood == "bernoulli":
        return bernoulli_log_likelihood(x, out.float())
    return discretized_gaussian_log_likelihood(x, out.float(), model.log_sigma.float())


def elbo_terms(model: VAE, x: torch.Tensor, generator=None):
    """(log p(x|z), KL(q(z|x) ‖ p(z))) per image, in nats, from one z per image: Eq. 10's estimator.
    The ELBO is their difference; it is summed over pixels and latents, not averaged, so that it
    is a log-probability of the whole image, and a pixel and a latent dimension weigh what the math says."""
    eps = torch.randn(x.shape[0], model.latent, device=x.device, generator=generator)  # ε ~ N(0, I)
    out, mu, logvar = model(x, eps)  # out: (B, C, H, W), mu and logvar: (B, latent)
    # reconstruction:  E_q(z|x)[log p(x|z)] ≈ log p(x|z),  z = μ + σ ⊙ ε   (one sample, as in the paper)
    reconstruction = log_likelihood(model, x, out)
    # regulariser:  KL(q(z|x) ‖ N(0, I)), in closed form
    kl = kl_divergence(mu.float(), logvar.float())
    return reconstruction, kl


def vae_loss(model: VAE, x: torch.Tensor, beta: float = 1.0):
    """The training loss: the negative ELBO averaged over the batch, with the KL weighted by β
    (Higgins et al. 2017; β = 1 is the ELBO itself). Returns (loss, −log p(x|z), KL), the last two (B,)."""
    reconstruction, kl = elbo_terms(model, x)
    # −ELBO_β = −log p(x|z) + β · KL(q(z|x) ‖ p(z))
    loss = (-reconstruction + beta * kl).mean()
    return loss, -reconstruction.detach(), kl.detach()


@torch.no_grad()
def evaluate(model: VAE, images: torch.Tensor, device, batch_size: int, seed: int) -> dict:
    """The test −ELBO (β = 1, fp32, one z per image from a fixed seed), in nats per image and bits/dim."""
    generator, sums = torch.Generator(device).manual_seed(seed), torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        reconstruction, kl = elbo_terms(model.eval(), images[i:i + batch_size].to(device), generator)
        sums += torch.stack([-reconstruction.sum(), kl.sum()]).double().cpu()
    nll, kl = (sums / len(images)).tolist()
    dims = images[0].numel()  # C·H·W
    # bits/dim = −ELBO / (C·H·W · ln 2): an upper bound on −log₂ p(x) per pixel (per sub-pixel for RGB)
    return {"neg_elbo": nll + kl, "reconstruction": nll, "kl": kl, "bits_per_dim": (nll + kl) / (dims * math.log(2)),
            "images": len(images), "likelihood": model.likelihood}


# =============================================================================================
# 5. Sampler: decode prior draws, reconstruct, interpolate
# =============================================================================================
def decoder_mean(model: VAE, out: torch.Tensor) -> torch.Tensor:
    """The image we show for a decoder output: E[x|z] in [-1, 1] (sigmoid(logits) for Bernoulli)."""
    return torch.sigmoid(out.float()) * 2 - 1 if model.likelihood == "bernoulli" else out.float().clamp(-1, 1)


SAMPLER_FIELDS = ("reconstruct",)  # what describes an image set in fid.csv: prior samples or reconstructions


@torch.no_grad()
def generate(model, cfg: Config, n: int, shape, device, generator) -> torch.Tensor:
    """n new images: z ~ N(0, I), decoded (ancestral sampling, Sec. 2.1). (n, C, H, W) in [-1, 1], on the host."""
    z = torch.randn(n, model.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([decoder_mean(model, model.decode(z[i:i + cfg.batch_size])).cpu()
                          for i in range(0, n, cfg.batch_size)])


@torch.no_grad()
def reconstruct(model, cfg: Config, images: torch.Tensor, device) -> torch.Tensor:
    """x → μ(x) → E[x|z = μ]: the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([decoder_mean(model, model.decode(model.encode(images[i:i + cfg.batch_size].to(device))[0]))
                          .cpu() for i in range(0, len(images), cfg.batch_size)])


@torch.no_grad()
def interpolate(model, cfg: Config, a: torch.Tensor, b: torch.Tensor, device, steps: int = 8) -> torch.Tensor:
    """One row per pair: image a, the decoded codes (1 − t) μ(a) + t μ(b) for t from 0 to 1, image b.
    Smooth rows of digit-like images show a latent space without holes between the training codes."""
    mu_a, mu_b = model.encode(a.to(device))[0], model.encode(b.to(device))[0]  # (P, latent) each
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]  # (1, steps, 1)
    z = ((1 - t) * mu_a[:, None] + t * mu_b[:, None]).flatten(0, 1)  # (P·steps, latent)
    middle = decoder_mean(model, model.decode(z)).cpu().view(len(a), steps, *a.shape[1:])
    return torch.cat([a[:, None].cpu(), middle, b[:, None].cpu()], 1).flatten(0, 1)  # (P·(steps+2), C, H, W)


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
    if state:  # the network and the likelihood are fixed by the checkpoint
        cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls/convs
    data, test = get_test_data(cfg, get_data(cfg))  # (N, C, H, W) in [-1, 1]; test stays on the host
    data = data.to(device)
    cfg.image_size = data.shape[-1]
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- core: the network and the optimiser ---
    model = build_model(cfg, data.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"])
        print(f"resumed from {ckpt_path} at step {step}")
    train_model = torch.compile(model) if cfg.compile else model  # shares the weights; we save `model`
    decoder = "bernoulli" if cfg.likelihood == "bernoulli" else \
        f"gaussian, σ {'learned from' if cfg.learn_sigma else 'fixed at'} {cfg.sigma}"
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(data)} images "
          f"{tuple(data.shape[1:])}, {len(test)} test | {device} | {'bf16' if use_bf16(cfg, device) else 'fp32'} | "
          f"latent {cfg.latent}, {decoder} decoder, β={cfg.beta}")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": dataclasses.asdict(cfg), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0)})

    def sample_grid():  # the same z's every time: the grids show progress, not luck
        model.eval()
        generator = torch.Generator(device).manual_seed(cfg.seed)
        save_grid(generate(model, cfg, 64, data.shape[1:], device, generator),
                  os.path.join(run_dir, "samples", f"step_{step:07d}.png"))
        stack_progression(os.path.join(run_dir, "samples"), os.path.join(run_dir, "progression.png"))
        shown = test[:32]  # the same test images every time, never trained on
        save_grid(above_below(shown, reconstruct(model, cfg, shown, device)), os.path.join(run_dir, "reconstructions.png"))
        pairs = test[:2 * min(8, len(test) // 2)]  # up to 8 pairs of test images
        if len(pairs):
            save_grid(interpolate(model, cfg, pairs[0::2], pairs[1::2], device),
                      os.path.join(run_dir, "interpolation.png"), nrow=10)

    metrics = open_metrics(os.path.join(run_dir, "metrics.csv"), step,
                           ["step", "loss", "reconstruction", "kl", "sigma", "lr", "images_per_s", "elapsed_s"])
    writer = csv.writer(metrics)
    sums, start, last_time, last_step = torch.zeros(3, device=device), time.time(), time.time(), step
    while step < cfg.steps:
        # --- core: one training step ---
        model.train()
        x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            loss, nll, kl = vae_loss(train_model, x, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach(), nll.mean(), kl.mean()])  # on the device: no synchronisation until we log
        step += 1

        # --- plumbing: log, sample, checkpoint ---
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss, mean_nll, mean_kl = (sums / (step - last_step)).tolist()
            if not math.isfinite(mean_loss):
                sys.exit(f"{PROG}: the loss became {mean_loss} by step {step}; lower --lr and run again "
                         f"with --resume (it continues from the last checkpoint, written before this)")
            now = time.time()
            speed = (step - last_step) * cfg.batch_size / (now - last_time)
            sigma = model.log_sigma.exp().item() if cfg.likelihood == "gaussian" else float("nan")
            print(f"step {step:>7}/{cfg.steps} | loss {mean_loss:.4f} | recon {mean_nll:8.2f} | KL {mean_kl:6.2f} | "
                  + (f"σ {sigma:.4f} | " if cfg.likelihood == "gaussian" else "")
                  + f"{speed:7.1f} img/s | ETA {(cfg.steps - step) * cfg.batch_size / speed / 3600:5.2f} h", flush=True)
            writer.writerow([step, f"{mean_loss:.6f}", f"{mean_nll:.6f}", f"{mean_kl:.6f}", f"{sigma:.6f}",
                             f"{cfg.lr:.3e}", f"{speed:.1f}", f"{now - start:.1f}"])
            metrics.flush()
            sums.zero_()
            last_time, last_step = now, step
        if step % cfg.sample_every == 0 or step == cfg.steps:
            sample_grid()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
    metrics.close()
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; run in {run_dir}")

    # --- the test −ELBO: how well the model explains images it never saw, in nats and bits/dim ---
    result = {"step": step, **evaluate(model, test, device, cfg.batch_size, cfg.seed)}
    with open(os.path.join(run_dir, "test_elbo.json"), "w") as f:
        json.dump(result, f, indent=2)
    kind = ("Bernoulli on grey levels: a cross-entropy, not a probability of 8-bit images, as pytorch/examples"
            if cfg.likelihood == "bernoulli" else "discretised Gaussian: an upper bound on −log p of the 8-bit image")
    print(f"test −ELBO {result['neg_elbo']:.2f} nats/image (reconstruction {result['reconstruction']:.2f} + "
          f"KL {result['kl']:.2f}) = {result['bits_per_dim']:.4f} bits/dim on {len(test)} test images ({kind})")
    if cfg.fid:
        run_fid(cfg, generate(model, cfg, cfg.fid, data.shape[1:], device,
                              torch.Generator(device).manual_seed(cfg.seed + 1)), run_dir, step)


# =============================================================================================
# 7. Main: train, or generate from a checkpoint
# =============================================================================================
def load_for_sampling(cfg: Config):
    """The network of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt)
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["model"]["encoder.0.weight"].shape[1]
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
    for name in ("latent", "channels", "steps", "batch_size", "log_every", "sample_every", "ckpt_every",
                 "num_samples"):
        if getattr(cfg, name) < 1:
            sys.exit(f"{PROG}: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.sigma <= 0 or cfg.beta < 0 or cfg.lr <= 0 or cfg.fid < 0:
        sys.exit(f"{PROG}: need --sigma > 0, --beta >= 0, --lr > 0 and --fid >= 0")
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
