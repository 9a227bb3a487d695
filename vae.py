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
  python vae.py                   # CIFAR-10, Bernoulli decoder, 40k steps (about the 100 epochs at batch
                                  # 128 of the student project "Generating Realistic Images using DDPM");
                                  # a GPU job, not yet measured
  python vae.py --likelihood gaussian   # discretised Gaussian decoder, learned σ: −ELBO in nats of the
                                  # 8-bit image, comparable with other models' bits/dim
  python vae.py --sample --ckpt runs/vae-cifar10/ckpt.pt --num-samples 50000 \
      --fid 50000 --fid-weights pt_inception-2015-12-05-6726825d.pth   # Inception FID on the papers' ruler
  python vae.py --dataset mnist --likelihood bernoulli --channels 16 --steps 8000 --device cpu ...
        # a CPU recipe: test −ELBO 97.4 nats (pytorch/examples' MLP VAE: ≈ 104); docs/vae.md has the
        # exact command, its time on 2 cores and its MNIST score
  python vae.py --sample --reconstruct --ckpt RUN/ckpt.pt    # reconstructions of test images, as PNGs

Sections
  1. Config     2. Data (+ the test split)     3. Model (encoder, decoder)     4. Objective (the ELBO)
  5. Sampler (prior samples, reconstructions, interpolations)     6. Train (the ELBO step)     7. Main
  then, behind a fence, the plumbing a first reading skips: --sample, the flags, dataset files,
  the run (processes, resume, checkpoints, log), files and progress lines

Where we depart from the paper (and why)
  - Convolutional encoder and decoder instead of the paper's one-hidden-layer MLPs, and Adam instead
    of Adagrad: what every VAE since uses. The model class, the objective and the estimator are the paper's.
  - Gaussian decoder: the paper's density is replaced by the same Gaussian's mass on each 8-bit pixel's
    bin (as Ho et al. 2020 do for their last step), so −ELBO is in nats of the actual 8-bit image,
    comparable with other models' bits/dim. A plain density on discrete pixels has no lower limit.
  - The default decoder is Bernoulli, on grey levels, as in pytorch/examples: on MNIST its prior samples
    scored far better than the Gaussian decoder's (docs/vae.md has the figures); the Gaussian gives
    sharper reconstructions and honest bits/dim, but its prior draws fall between the training codes.
  - Images shown are the decoder's mean E[x|z], not a draw from p(x|z): independent pixel noise would
    only add static (every VAE paper shows means). Likelihoods are always those of p(x|z) itself.
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "vae": names runs and error messages
READS = ("vae",)  # the scripts whose checkpoints this one can load


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
    latent: int = 128  # dimensions of the code z (128, as in "Generating Realistic Images using DDPM")
    channels: int = 32  # channels after the first convolution, doubled at every halving of the resolution
    likelihood: str = "bernoulli"  # decoder p(x|z): bernoulli (grey levels as probabilities) | gaussian (discretised, learned σ)
    sigma: float = 0.1  # σ of the Gaussian decoder on the [-1, 1] pixel scale (with --learn-sigma: its start)
    learn_sigma: bool = True  # learn σ by the ELBO (one σ for all pixels: a calibrated decoder), else keep it fixed
    beta: float = 1.0  # weight of the KL term in the training loss (1: the ELBO; the test −ELBO always uses 1)
    # --- optimisation ---
    steps: int = 40_000  # training steps (100 CIFAR-10 epochs at batch 128 ≈ 39k, as "Generating Realistic Images using DDPM" trained)
    batch_size: int = 128  # images per step (128, as in "Generating Realistic Images using DDPM"); also the sampling batch
    lr: float = 1e-3  # Adam learning rate (1e-3, as in "Generating Realistic Images using DDPM")
    # --- run ---
    out: str = ""  # run directory ("": runs/vae-<dataset>; --sample: the checkpoint's folder, or its vae-samples/ for another script's)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast only on GPUs and CPUs with AVX512-BF16/AMX)
    compile: bool = False  # torch.compile the network for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (from the same fixed z), reconstructions, interpolations
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end, and on Ctrl-C)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or to sample from
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs decoded from prior draws z ~ N(0, I) with --ckpt
    reconstruct: bool = False  # with --sample: reconstruct the first --num-samples test images instead
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate (or reconstruct) this many images and print their FID against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; or a file, e.g. pytorch-fid's for paper numbers)


CHOICES = {"likelihood": ("bernoulli", "gaussian"), "device": ("auto", "cuda", "cpu", "mps"),
           "precision": ("auto", "fp32", "bf16")}
RANGES = {"image_size": ">=0", "latent": ">=1", "channels": ">=1", "sigma": ">0", "beta": ">=0", "steps": ">=1",
          "batch_size": ">=1", "lr": ">0", "log_every": ">=1", "sample_every": ">=1", "ckpt_every": ">=1",
          "num_samples": ">=1", "fid": ">=0"}
ARCH_FIELDS = ("dataset", "image_size", "latent", "channels", "likelihood", "sigma",
               "learn_sigma")  # fixed by a checkpoint: taken from it
# parse_args() (in the plumbing, after the fence) makes every field above a flag (batch_size: --batch-size),
# with the comment beside it as its --help text and its default shown; CHOICES and RANGES hold the values.


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
    progress = Progress("test −ELBO", len(images))
    for i in range(0, len(images), batch_size):
        reconstruction, kl = elbo_terms(model.eval(), images[i:i + batch_size].to(device), generator)
        sums += torch.stack([-reconstruction.sum(), kl.sum()]).cpu().double()  # float64 on the host (not on MPS)
        progress.update(min(i + batch_size, len(images)))
    nll, kl = (sums / len(images)).tolist()
    dims = images[0].numel()  # C·H·W
    # bits/dim = −ELBO / (C·H·W · ln 2): with --likelihood gaussian an upper bound on −log₂ p(x) per pixel
    # (per sub-pixel for RGB); with bernoulli on grey levels a cross-entropy only, comparable with nothing
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
def in_batches(fn, inputs: torch.Tensor, cfg: Config, label: str) -> torch.Tensor:
    """fn applied to inputs in batches of --batch-size, with a progress line; the outputs on the host."""
    progress, outputs = Progress(label, len(inputs)), []
    for i in range(0, len(inputs), cfg.batch_size):
        outputs.append(fn(inputs[i:i + cfg.batch_size]).float().cpu())
        progress.update(i + len(outputs[-1]))
    return torch.cat(outputs)


@torch.no_grad()
def generate(model, cfg: Config, n: int, shape, device, generator, label: str = "sampling") -> torch.Tensor:
    """n new images: z ~ N(0, I), decoded (ancestral sampling, Sec. 2.1). (n, C, H, W) in [-1, 1], on the host."""
    z = torch.randn(n, model.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return in_batches(lambda z: decoder_mean(model, model.decode(z)), z, cfg, label)


@torch.no_grad()
def reconstruct(model, cfg: Config, images: torch.Tensor, device, label: str = "reconstructing") -> torch.Tensor:
    """x → μ(x) → E[x|z = μ]: the decoder's image of each image's most likely code. (N, C, H, W), on the host."""
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return in_batches(lambda x: decoder_mean(model, model.decode(model.encode(x.to(device))[0])), images, cfg,
                          label)


@torch.no_grad()
def interpolate(model, cfg: Config, a: torch.Tensor, b: torch.Tensor, device, steps: int = 8) -> torch.Tensor:
    """One row per pair: image a, the decoded codes (1 − t) μ(a) + t μ(b) for t from 0 to 1, image b.
    Smooth rows of digit-like images show a latent space without holes between the training codes."""
    mu_a, mu_b = model.encode(a.to(device))[0], model.encode(b.to(device))[0]  # (P, latent) each
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]  # (1, steps, 1)
    z = ((1 - t) * mu_a[:, None] + t * mu_b[:, None]).flatten(0, 1)  # (P·steps, latent)
    middle = decoder_mean(model, model.decode(z)).cpu().view(len(a), steps, *a.shape[1:])
    return torch.cat([a[:, None].cpu(), middle, b[:, None].cpu()], 1).flatten(0, 1)  # (P·(steps+2), C, H, W)


# =============================================================================================
# 6. Train: the ELBO step (Kingma & Welling's Algorithm 1); its plumbing, class Run, is after the fence
# =============================================================================================
def train(cfg: Config) -> None:
    """Algorithm 1 (AEVB) with Adam: repeat { x ~ data, ε ~ N(0, I); one gradient step on
    −ELBO = −log p(x|z) + β · KL(q(z|x) ‖ N(0, I)) at z = μ(x) + σ(x) ⊙ ε }; then the test −ELBO."""
    with Run(cfg, needs=("model", "optimizer")) as run:
        cfg, device = run.cfg, run.device
        if run.world > 1:
            sys.exit(f"{PROG}: trains in one process; start it with python, not torchrun")
        data, test = get_test_data(cfg, get_data(cfg)[0])  # (N, C, H, W) in [-1, 1]; test stays on the host
        data = data.to(device)  # resident on the device
        cfg.image_size = data.shape[-1]
        run.start(images=len(data), test_images=len(test))

        # --- core: the network and the optimiser ---
        model = build_model(cfg, data.shape[1]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel for all weights
        step = run.restore(model=model, optimizer=optimizer)
        net = run.wrap(model)  # --compile: compiled; the same weights
        decoder = "bernoulli" if cfg.likelihood == "bernoulli" else \
            f"gaussian, σ {'learned from' if cfg.learn_sigma else 'fixed at'} {cfg.sigma}"
        run.describe(model, note=f"{len(test)} test images | latent {cfg.latent}, {decoder} decoder, β={cfg.beta}")
        while step < cfg.steps:
            # --- core: one step of Algorithm 1 ---
            model.train()
            x = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
                # −ELBO_β = −log p(x|z) + β · KL(q(z|x) ‖ p(z)),  z = μ + σ ⊙ ε  (one ε per image)
                loss, nll, kl = vae_loss(net, x, cfg.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            # --- plumbing (class Run, after the fence): the log, grids from fixed z, checkpoints, Ctrl-C ---
            sigma = {"sigma": model.log_sigma.detach().exp()} if cfg.likelihood == "gaussian" else {}
            run.log(step, loss=loss.detach(), reconstruction=nll.mean(), kl=kl.mean(), **sigma, lr=cfg.lr)
            if run.due(step, cfg.sample_every):
                run.save_grid(step, lambda: training_grids(model, cfg, test, run.dir, device, run.fixed_noise()))
            if run.stopping(step) or run.due(step, cfg.ckpt_every):
                run.save(step)  # after Ctrl-C or SIGTERM, this also ends the run (how to continue: --resume)
        held_out_elbo(model, cfg, test, run.dir, device, step)  # evaluate() on the test set; test_elbo.json
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
    """reconstructions.png and interpolation.png of the same test images every time (never trained on), and
    the 64 prior samples of samples/step_N.png (returned: Run.save_grid writes them)."""
    model.eval()
    shown = test[:32]
    save_grid(above_below(shown, reconstruct(model, cfg, shown, device)), os.path.join(run_dir, "reconstructions.png"))
    pairs = test[:2 * min(8, len(test) // 2)]  # up to 8 pairs of test images
    if len(pairs):
        save_grid(interpolate(model, cfg, pairs[0::2], pairs[1::2], device), os.path.join(run_dir, "interpolation.png"),
                  nrow=10)
    return generate(model, cfg, 64, test.shape[1:], device, generator, label="sample grid")


def held_out_elbo(model, cfg: Config, test: torch.Tensor, run_dir: str, device, step: int) -> None:
    """The test −ELBO: how well the model explains images it never saw, in nats and bits/dim (test_elbo.json)."""
    result = {"step": step, **evaluate(model, test, device, cfg.batch_size, cfg.seed)}
    with open(os.path.join(run_dir, "test_elbo.json"), "w") as f:
        json.dump(result, f, indent=2)
    kind = ("Bernoulli on grey levels: a cross-entropy, not a probability of 8-bit images, as pytorch/examples"
            if cfg.likelihood == "bernoulli" else "discretised Gaussian: an upper bound on −log p of the 8-bit image")
    print(f"test −ELBO {result['neg_elbo']:.2f} nats/image (reconstruction {result['reconstruction']:.2f} + "
          f"KL {result['kl']:.2f}) = {result['bits_per_dim']:.4f} bits/dim on {len(test)} test images ({kind})")


def load_for_sampling(cfg: Config):
    """The network of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt, needs=("model", "config", "step"))
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["model"]["encoder.0.weight"].shape[1]  # the encoder's first convolution reads the image
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
