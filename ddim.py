"""ddim.py: Denoising Diffusion Implicit Models: a DDPM sampled in a few deterministic steps.

Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502
on a DDPM (Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239) trained exactly as in ddpm.py

DDPM's loss only ever asks about q(x_t | x_0), one step t at a time: it never says how x_{t−1}
follows x_t. So DDIM keeps the trained network and changes only the sampler: a family of reverse
processes with the same q(x_t | x_0), one for each noise level η. η = 1 is DDPM-like; η = 0 adds
no noise at all, so the sampler is a fixed map x_T → x_0 (a discretised ODE) that can skip most
steps, run backwards (x_0 → x_T: inversion) and be walked along (interpolation between two x_T).
Everything else (U-Net, schedules, data, training, checkpoints) is copied from ddpm.py between
`# >>> shared:` markers and kept identical by a test: `diff ddpm.py ddim.py` is the sampler and
what only DDIM can do. It trains on its own with ddpm.py's flags, and samples ddpm.py's checkpoints.

Commands
  python ddim.py --sample --ckpt runs/ddpm-cifar10/ckpt.pt --sample-steps 50 --eta 0   # any ddpm.py
        checkpoint; S = 50 network calls per image instead of T = 1000: ≈ 20× faster than ddpm.py
  python ddim.py --sample --ckpt runs/ddpm-cifar10/ckpt.pt --sample-steps 100 --skip quadratic \
        --num-samples 50000 --fid 50000   # paper, Table 1 (CIFAR-10, η = 0): FID 4.16 (S = 100), 4.67 (S = 50)
  python ddim.py --invert --ckpt RUN/ckpt.pt        # invert.png: images, their latents x_T, reconstructions
  python ddim.py --interpolate --ckpt RUN/ckpt.pt   # interpolate.png: slerp between two x_T, decoded with η = 0
  python ddim.py --dataset mnist ...                # trains exactly as ddpm.py does (same flags, same recipe,
                                                    # and torchrun --nproc_per_node=N ddim.py for N GPUs)
  python benchmarks/ddim_vs_ddpm.py --ckpt RUN/ckpt.pt   # DDPM vs DDIM: time and quality (table in README.md)
--steps counts training steps, as in every script, so DDIM's number of sampling steps S is
--sample-steps (the DDIM code's --timesteps): `--sample-steps 50`, never `--steps 50`, to sample.

Sections
  1. Config     2. Data     3. Model (U-Net)     4. Objective (schedules, q(x_t|x_0), L_simple)
  5. Sampler (DDIM, Eq. 12; inversion; interpolation)     6. Train     7. Main

Where we depart from the paper and its code (and why)
  - The uniform τ is ⌊i·T/S⌋: the DDIM code's range(0, T, T // S) whenever S divides T, and still
    exactly S steps when it does not (range would give more than S).
  - The quadratic τ is the DDIM code's ⌊(i·√(0.8·T)/(S−1))²⌋, but the repeated steps it makes near
    t = 0 when S ≳ √T (0, 0, 1, 2, 5, … for S = 50, T = 1000) are moved up to the previous step + 1.
  - Inversion calls ε_θ at the step it goes to, as common inversion code does: the network has no
    input for the clean level it starts from.
  - --clip-x0 (off by default, as in the DDIM code) recomputes ε from the clipped x̂_0, as
    guided-diffusion's DDIM sampler does, so that each step stays consistent with the x̂_0 it uses.
  - Training is ddpm.py's, departures included (see its header).
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
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "ddim": names runs and error messages


# =============================================================================================
# 1. Config
# =============================================================================================
@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy file
    data_root: str = "data"  # where torchvision datasets are (or will be downloaded)
    image_size: int = 0  # 0: the dataset's own size; otherwise images are resized to this
    # --- diffusion ---
    schedule: str = "linear"  # noise schedule: linear (Ho et al.) | cosine (Nichol & Dhariwal)
    timesteps: int = 1000  # T, the number of diffusion steps (the seed study used 300)
    sample_steps: int = 50  # S, network calls per image: DDIM visits S of the T steps (the sub-sequence τ)
    eta: float = 0.0  # η in [0, 1]: 0 deterministic (DDIM), 1 DDPM-like noise (σ_t² = β̃_t when S = T)
    skip: str = "uniform"  # how τ picks S of the T steps: uniform (every T/S-th) | quadratic (dense near the data)
    clip_x0: bool = False  # clip the predicted x_0 to [-1, 1] while sampling (off, as in the DDIM code)
    # --- model (0 or "": the size for this image size, see UNET_SIZES) ---
    channels: int = 0  # base channel count of the U-Net (paper: 128)
    channel_mult: str = ""  # channel multiplier per resolution level (paper: 1,2,2,2)
    num_res_blocks: int = 2  # residual blocks per level on the way down (paper: 2)
    attn_res: str = ""  # resolutions with self-attention ("": half the image size; "none")
    dropout: float = 0.1  # dropout inside residual blocks (paper: 0.1 on CIFAR-10)
    # --- optimisation ---
    steps: int = 800_000  # training steps (paper: 800k on CIFAR-10)
    batch_size: int = 128  # images per step, over all GPUs under torchrun (paper: 128); also the sampling batch
    lr: float = 2e-4  # Adam learning rate (paper: 2e-4)
    warmup: int = 5000  # steps of linear learning-rate warm-up (paper: 5000)
    lr_decay: str = "none"  # learning-rate decay: none (paper: constant) | cosine (to 0 by --steps; short runs)
    grad_clip: float = 1.0  # clip the gradient norm to this (paper: 1.0)
    ema_decay: float = 0.9999  # decay of the exponential moving average of the weights
    # --- run ---
    out: str = ""  # run directory ("": runs/ddim-<dataset>)
    device: str = "auto"  # auto | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the network for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 10_000  # steps between sample grids (drawn from the same fixed noise)
    ckpt_every: int = 5000  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint (of ddpm.py or ddim.py) to resume from, sample from, invert or interpolate with
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs from --ckpt's EMA weights
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate this many images and print their FID (needs fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; a path; see fid.py)
    invert: bool = False  # write invert.png: 8 training images, their latents x_T (η = 0) and reconstructions
    interpolate: bool = False  # write interpolate.png: slerp between pairs of x_T, decoded with η = 0


CHOICES = {"schedule": ("linear", "cosine"), "lr_decay": ("none", "cosine"), "skip": ("uniform", "quadratic"),
           "device": ("auto", "cuda", "cpu", "mps"), "precision": ("auto", "fp32", "bf16")}
ARCH_FIELDS = ("dataset", "image_size", "schedule", "timesteps", "channels", "channel_mult",
               "num_res_blocks", "attn_res", "dropout")  # fixed by a checkpoint: taken from it


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
# 3. Model: the DDPM U-Net (Ho et al., Appendix B; same layers as their TensorFlow code)
# =============================================================================================
# >>> shared: unet
UNET_SIZES = {  # image size -> (channels, channel_mult); other sizes use the CIFAR-10 network
    32: (128, "1,2,2,2"),  # CIFAR-10, the paper's network: 35.7M parameters
    28: (64, "1,2,2"),  # MNIST / Fashion-MNIST: 28 -> 14 -> 7, 6.5M parameters
    16: (64, "1,2,2"),  # 16x16 sprites: 16 -> 8 -> 4, 6.5M parameters
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the step t (as in the Transformer): (B,) -> (B, dim).
    emb[i] = sin(t · 10000^(−i/(d/2−1))) for i < d/2, then the cosines."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def zero(layer: nn.Module) -> nn.Module:
    """Start a layer at zero output, as the paper's code does for the last layer of each branch:
    every residual block then begins as the identity and the network begins by predicting ε = 0."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(ch: int) -> nn.GroupNorm:
    # The paper's 32 groups; narrow layers keep ≥ 4 channels a group. One channel a group would be
    # instance norm, which erases each map's mean: small nets then miss the image's brightness.
    return nn.GroupNorm(math.gcd(ch, min(32, ch // 4)), ch)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, add the time embedding, GroupNorm → SiLU → dropout → conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)  # time enters every block as a per-channel bias
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):  # x: (B, in_ch, H, W), temb: (B, temb_dim)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h  # (B, out_ch, H, W)


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions: softmax(q kᵀ / √C) v, plus skip."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1), zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):  # x: (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # 3 × (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), scaled by 1/√C
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Block(nn.Module):
    """One step of the U-Net: a ResBlock, followed by self-attention at the chosen resolutions."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_dim, dropout)
        self.attn = Attention(out_ch) if attention else nn.Identity()

    def forward(self, x, temb):
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    """ε_θ(x_t, t): predicts the noise in x_t. Down path, middle, up path with skip connections."""

    def __init__(self, image_channels=3, image_size=32, channels=0, channel_mult="", num_res_blocks=2,
                 attn_res="", dropout=0.1):
        super().__init__()
        default_ch, default_mult = UNET_SIZES.get(image_size, UNET_SIZES[32])
        ch = channels or default_ch
        mult = [int(m) for m in (channel_mult or default_mult).split(",")]
        attn = [] if attn_res == "none" else [int(r) for r in attn_res.split(",")] if attn_res else [image_size // 2]
        if image_size % 2 ** (len(mult) - 1):
            sys.exit(f"{PROG}: image size {image_size} cannot be halved "
                     f"{len(mult) - 1} times; use fewer entries in --channel-mult")
        self.ch = ch
        # t -> sinusoidal embedding (ch) -> MLP -> (4·ch), fed to every residual block
        self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.conv_in = nn.Conv2d(image_channels, ch, 3, padding=1)
        self.down, skip_chs, res, now = nn.ModuleList(), [ch], image_size, ch
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(now, ch * m, 4 * ch, dropout, res in attn))
                now = ch * m
                skip_chs.append(now)
            if level < len(mult) - 1:  # halve the resolution with a strided convolution
                self.down.append(nn.Conv2d(now, now, 3, stride=2, padding=1))
                skip_chs.append(now)
                res //= 2
        self.mid = nn.ModuleList([Block(now, now, 4 * ch, dropout, True), Block(now, now, 4 * ch, dropout, False)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):  # one block more than down: it takes the downsampler's skip
                self.up.append(Block(now + skip_chs.pop(), ch * m, 4 * ch, dropout, res in attn))
                now = ch * m
            if level > 0:  # double the resolution: nearest-neighbour upsampling, then a convolution
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(now, now, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(group_norm(now), nn.SiLU(), zero(nn.Conv2d(now, image_channels, 3, padding=1)))

    def forward(self, x, t):  # x: (B, C, H, W), t: (B,) integer steps 0..T-1
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4·ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]  # every output of the down path is kept for the up path
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, Block) else layer(h)  # Block or downsampler
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb)  # (B, ch·mult[-1], H/2^(L−1), W/2^(L−1))
        for layer in self.up:  # Block: concatenate the matching skip on channels; else upsampler
            h = layer(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(layer, Block) else layer(h)
        return self.out(h)  # (B, C, H, W): the predicted noise ε
# <<< shared: unet


def build_model(cfg: Config, image_channels: int) -> UNet:
    return UNet(image_channels, cfg.image_size, cfg.channels, cfg.channel_mult, cfg.num_res_blocks,
                cfg.attn_res, cfg.dropout)


# =============================================================================================
# 4. Objective: noise schedules, the forward process q(x_t | x_0), and L_simple
# =============================================================================================
# >>> shared: diffusion
def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape [T] (index i holds β_{i+1}: steps are 0-based in code)."""
    if schedule == "linear":
        # Ho et al.: β rises linearly from 1e-4 to 0.02 over T = 1000 steps; for other T the
        # endpoints scale by 1000/T so that ᾱ_T, the signal left at the end, stays ≈ 4e-5
        # (below T = 51 the last β's would pass 1, so they are capped at 0.999 as in cosine).
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    if schedule == "cosine":
        # Nichol & Dhariwal Eq. 17:  ᾱ(t) = f(t)/f(0),  f(t) = cos²(((t/T + s)/(1 + s)) · π/2),  s = 0.008
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        # β_t = 1 − ᾱ(t)/ᾱ(t−1), capped at 0.999 to avoid the singularity at t = T
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}: use linear or cosine")


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in one shot, for a whole batch (t: (B,) 0-based steps)."""
    a = alpha_bar[t].float()[:, None, None, None]  # (B, 1, 1, 1)
    # Eq. 4:  x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε,   ε ~ N(0, I)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def diffusion_loss(eps_model, x0: torch.Tensor, alpha_bar: torch.Tensor, generator=None,
                   rows=slice(None)) -> torch.Tensor:
    """L_simple (Eq. 14): E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖², t uniform.

    t and ε are drawn for the whole batch x0, then only its `rows` go through the network: under
    torchrun, every process draws the same numbers and takes its own share (all rows without it)."""
    t = torch.randint(0, len(alpha_bar), (len(x0),), device=x0.device, generator=generator)  # (B,)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)  # (B, C, H, W)
    x0, t, eps = x0[rows], t[rows], eps[rows]  # this process's share: (B / processes, ...)
    return F.mse_loss(eps_model(q_sample(x0, t, eps, alpha_bar), t), eps)
# <<< shared: diffusion


# =============================================================================================
# 5. Sampler: DDIM's generalised reverse process (Song et al., Eq. 12), inversion, interpolation
# =============================================================================================
# (Equation numbers in this section are Song et al.'s; above them, Ho et al.'s.)
# L_simple above trains ε_θ on q(x_t | x_0) alone. Any reverse process with those same marginals
# can use it: DDIM's family (Eq. 12) has them for every σ, and for every sub-sequence τ of the
# steps, so it can jump from τ_i straight to τ_{i−1}: S network calls instead of T.
#
# Steps are 0-based in code, as in ddpm.py: code step t is the paper's step t + 1, and
# alpha_bar[t] holds ᾱ_{t+1}. The paper's ᾱ_0 = 1 (clean data, the level below the first step)
# has no index: t_prev = −1 stands for it.
def timestep_sequence(T: int, S: int, skip: str = "uniform") -> list:
    """τ: the S steps (0-based, strictly increasing, in 0..T−1) at which the sampler calls ε_θ.

    uniform:   τ_i = ⌊i·T/S⌋, i = 0..S−1, i.e. 0, T/S, 2T/S, …: the DDIM code's range(0, T, T // S)
               when S divides T (and exactly S steps when it does not).
    quadratic: τ_i = ⌊(i·√(0.8·T)/(S−1))²⌋, the DDIM code's choice for CIFAR-10: dense near the data,
               where detail is decided, sparse in the noise. For S ≳ √T the first values repeat
               (0, 0, 1, 2, 5, … for T = 1000, S = 50); each is raised to at least τ_{i−1} + 1, so the
               steps are distinct (for S = T both give every step)."""
    if not 1 <= S <= T:
        raise ValueError(f"need 1 <= S <= T, got S = {S}, T = {T}")
    if skip == "uniform":
        return [i * T // S for i in range(S)]
    if skip == "quadratic":
        tau = [int(v) for v in np.linspace(0, math.sqrt(0.8 * T), S) ** 2]
        for i in range(1, S):
            tau[i] = max(tau[i], tau[i - 1] + 1)  # stays <= T − 1 (tests check every S <= T)
        return tau
    raise ValueError(f"unknown skip {skip!r}: use uniform or quadratic")


@torch.no_grad()
def sample(eps_model, shape, betas, steps=50, eta=0.0, skip="uniform", generator=None, x_T=None,
           clip_x0=False, device="cpu", on_step=None) -> torch.Tensor:
    """Generate images with DDIM's reverse process in S = `steps` network calls:
    x_{τ_S} → x_{τ_{S−1}} → … → x_{τ_1} → x_0, each step by Eq. 12.

    eps_model(x_t, t) -> ε for t a LongTensor [B] of 0-based steps, as in ddpm.py; x_T: starting
    noise (drawn from `generator` if None); eta: 0 = deterministic, 1 = DDPM-like; skip: how τ is
    chosen (see timestep_sequence); on_step(t, x_t, x0_pred), if given, is called at every step."""
    alpha_bar = torch.cumprod(1 - betas, 0).tolist()  # float64 arithmetic below, on Python floats
    tau = timestep_sequence(len(betas), steps, skip)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    for t, t_prev in zip(reversed(tau), reversed([-1] + tau[:-1])):
        ab_t, ab_prev = alpha_bar[t], (alpha_bar[t_prev] if t_prev >= 0 else 1.0)  # ᾱ before step 1 is 1
        eps = eps_model(x, torch.full((shape[0],), t, device=device, dtype=torch.long)).float()
        # Eq. 9, the "predicted x_0":  x̂_0 = (x_t − √(1−ᾱ_t) · ε_θ) / √ᾱ_t
        x0_pred = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if clip_x0:  # then the ε that points from x̂_0 to x_t:  ε = (x_t − √ᾱ_t · x̂_0) / √(1−ᾱ_t)
            x0_pred = x0_pred.clamp(-1, 1)
            eps = (x - math.sqrt(ab_t) * x0_pred) / math.sqrt(1 - ab_t)
        if on_step is not None:
            on_step(t, x, x0_pred)
        # Eq. 16:  σ_t = η · √((1−ᾱ_{t−1}) / (1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_{t−1})   (ᾱ_{t−1}: at t_prev).
        # With S = T and η = 1, σ_t² = β̃_t: DDPM's posterior step. At the last step σ = 0.
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # Eq. 12:  x_{t−1} = √ᾱ_{t−1} · x̂_0  +  √(1−ᾱ_{t−1}−σ_t²) · ε_θ  +  σ_t · z
        # (go to the noise level of t_prev along the direction ε_θ that points back at x_t, plus fresh noise)
        x = math.sqrt(ab_prev) * x0_pred + math.sqrt(max(0.0, 1 - ab_prev - sigma ** 2)) * eps  # max: rounding
        if sigma > 0:  # no random numbers are drawn at η = 0: the map x_T → x_0 is fixed
            x = x + sigma * torch.randn(x.shape, generator=generator, device=device)
    return x


@torch.no_grad()
def invert(eps_model, x0, betas, steps=50, skip="uniform", device="cpu") -> torch.Tensor:
    """x_0 → x_T: run the deterministic (η = 0) process the other way, up the τ that sample() comes down.

    With σ = 0, Eq. 12 is an Euler step of an ODE (Sec. 4.3, Eq. 13), and an ODE can be integrated
    both ways: sample(…, eta=0, x_T=invert(…)) gives back x_0, up to the discretisation error."""
    alpha_bar = torch.cumprod(1 - betas, 0).tolist()
    tau = timestep_sequence(len(betas), steps, skip)
    x = x0.to(device)
    for t_prev, t in zip([-1] + tau[:-1], tau):  # from the level of t_prev up to that of t
        ab_prev, ab_t = (alpha_bar[t_prev] if t_prev >= 0 else 1.0), alpha_bar[t]
        # ε_θ at step t on x_{t_prev}: the network has no input for the clean level t_prev = −1, and
        # the step back down from t calls ε_θ at t as well (on x_t, which is close to x_{t_prev})
        eps = eps_model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float()
        x0_pred = (x - math.sqrt(1 - ab_prev) * eps) / math.sqrt(ab_prev)  # Eq. 9 at the level we are at
        # Eq. 12 with σ = 0, upwards:  x_t = √ᾱ_t · x̂_0 + √(1−ᾱ_t) · ε_θ
        x = math.sqrt(ab_t) * x0_pred + math.sqrt(1 - ab_t) * eps
    return x


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two latents, as in Sec. 5.3 (Shoemake 1985):
    x = sin((1−α)θ)/sin θ · x0 + sin(αθ)/sin θ · x1,  θ = arccos(⟨x0, x1⟩ / (‖x0‖ ‖x1‖)).
    Noise from N(0, I) in d dimensions lies near the sphere of radius √d, and two draws are nearly
    orthogonal: the straight line between them dips to ‖x‖ ≈ √(d/2) at its middle, a latent the
    model never saw, while the arc stays on the sphere."""
    theta = torch.arccos((x0 * x1).sum() / (x0.norm() * x1.norm())).item()
    return (math.sin((1 - alpha) * theta) * x0 + math.sin(alpha * theta) * x1) / math.sin(theta)


SAMPLER_FIELDS = ("sample_steps", "eta", "skip", "clip_x0")  # what describes a sample in fid.csv


def check_sample_steps(cfg: Config) -> None:
    if cfg.sample_steps > cfg.timesteps:
        sys.exit(f"{PROG}: --sample-steps {cfg.sample_steps} is more than the model's "
                 f"T = {cfg.timesteps} diffusion steps; use at most {cfg.timesteps}")


def generate(model, cfg: Config, n: int, shape, device, generator) -> torch.Tensor:
    """n images from DDIM's reverse process, in batches of --batch-size: (n, C, H, W) in [-1, 1]."""
    check_sample_steps(cfg)
    betas = make_betas(cfg.schedule, cfg.timesteps)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        return torch.cat([sample(model, (min(cfg.batch_size, n - i), *shape), betas, cfg.sample_steps, cfg.eta,
                                 cfg.skip, generator, clip_x0=cfg.clip_x0, device=device)
                          for i in range(0, n, cfg.batch_size)])


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


# >>> shared: train
def train(cfg: Config) -> None:
    # --- plumbing: processes. torchrun starts one per GPU and sets RANK (which one), WORLD_SIZE (how
    # many) and LOCAL_RANK (which GPU of this machine); under plain python there is one: rank 0 of 1 ---
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    if cfg.batch_size % world:  # --batch-size is the global batch: the run is the same on 1 or 8 GPUs
        sys.exit(f"{PROG}: --batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # --- plumbing: run directory, checkpoint to resume, data ---
    run_dir = cfg.out or f"runs/{PROG}-{os.path.basename(cfg.dataset.rstrip('/')).removesuffix('.npy')}"
    ckpt_path = cfg.ckpt or os.path.join(run_dir, "ckpt.pt")
    if not cfg.resume and os.path.exists(ckpt_path):  # never overwrite a trained model by accident
        sys.exit(f"{PROG}: {ckpt_path} exists; pass --resume to continue that run or --out NEW_DIR to start anew")
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    needed = {"model", "ema", "optimizer", "warmup", "step", "config", "rng_batches", "rng_cpu"}
    if state and not needed <= state.keys():  # e.g. written by an older version: it can be sampled, not resumed
        sys.exit(f"{PROG}: {ckpt_path} lacks {', '.join(sorted(needed - state.keys()))} and cannot be resumed; "
                 "use --out NEW_DIR to start anew")
    if state:  # the network and the diffusion are fixed by the checkpoint
        cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
    batches = torch.Generator(device).manual_seed(cfg.seed)  # the same in every process: draws the batches
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls/convs
    data = get_data(cfg).to(device)  # (N, C, H, W) in [-1, 1], resident on the device
    cfg.image_size = data.shape[-1]
    if rank == 0:  # only process 0 writes files and prints
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg) | {"processes": world, "batch_per_process": cfg.batch_size // world},
                      f, indent=2)  # batch_size is the global batch

    # --- core: the network, its EMA copy, the optimiser, the noise schedule ---
    model = build_model(cfg, data.shape[1]).to(device)
    # torchrun: DDP gives every process process 0's weights, and averages the gradients in backward()
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # sampling uses these averaged weights
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel for all weights
    def lr_factor(s: int) -> float:  # step s (0-based) trains with learning rate lr · lr_factor(s)
        # linear warm-up (paper):  min(1, (s + 1) / warmup)
        warm = min(1.0, (s + 1) / max(1, cfg.warmup))
        if cfg.lr_decay == "none":
            return warm
        # --lr-decay cosine:  × ½(1 + cos(π s / steps)), ≈ 0 by the last step, so a short run ends at rest
        return warm * (0.5 + 0.5 * math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)  # ("warmup": its name in checkpoints)
    alpha_bar = torch.cumprod(1 - make_betas(cfg.schedule, cfg.timesteps), 0).to(device)  # ᾱ_t, float64
    step = 0
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["warmup"])
        step = state["step"]
        batches.set_state(state["rng_batches"])  # the batches, t and ε an unbroken run would have drawn
        if rank == 0:  # and its dropout masks (other processes continue with fresh ones)
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"])
            print(f"resumed from {ckpt_path} at step {step}")
    train_model = torch.compile(train_model) if cfg.compile else train_model  # shares the weights; we save `model`
    if rank == 0:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(data)} images "
              f"{tuple(data.shape[1:])} | {device} | {'bf16' if use_bf16(cfg, device) else 'fp32'} | "
              f"{cfg.schedule} schedule, T={cfg.timesteps} | batch {cfg.batch_size}"
              + (f" = {world} processes × {cfg.batch_size // world}" if world > 1 else ""))

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "warmup": warmup.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
            "rng_batches": batches.get_state(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.empty(0)})

    def sample_grid():  # the same x_T and z's every time: the grids show progress, not luck
        generator = torch.Generator(device).manual_seed(cfg.seed)
        save_grid(generate(ema, cfg, 64, data.shape[1:], device, generator),
                  os.path.join(run_dir, "samples", f"step_{step:07d}.png"))
        stack_progression(os.path.join(run_dir, "samples"), os.path.join(run_dir, "progression.png"))

    if rank == 0:
        metrics = open_metrics(os.path.join(run_dir, "metrics.csv"), step,
                               ["step", "loss", "lr", "images_per_s", "elapsed_s"])
        writer = csv.writer(metrics)
    rows = slice(rank, None, world)  # this process's share of each batch: rows rank, rank + W, … (W = world)
    loss_sum, start, last_time, last_step = torch.zeros((), device=device), time.time(), time.time(), step
    while step < cfg.steps:
        # --- core: one training step ---
        # Every process draws the same batch of B images, flips, t and ε (from `batches`) and trains on its
        # own rows: W processes take exactly the step that one process takes on the whole batch.
        model.train()
        x0 = data[torch.randint(0, len(data), (cfg.batch_size,), device=device, generator=batches)]  # (B, C, H, W)
        if cfg.dataset == "cifar10":  # random horizontal flips, on CIFAR-10 only (as in the paper)
            flip = torch.rand(cfg.batch_size, 1, 1, 1, device=device, generator=batches) < 0.5
            x0 = torch.where(flip, x0.flip(3), x0)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
            loss = diffusion_loss(train_model, x0, alpha_bar, batches, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun, DDP averages the gradients over the processes here
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        warmup.step()
        # EMA:  θ_ema ← d · θ_ema + (1 − d) · θ,  d = min(decay, (1 + step)/(10 + step)): the warm-up
        # keeps early averages from clinging to the random init (0.9999⁵⁰⁰⁰ = 0.6 would still be init)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one fused call
        loss_sum += loss.detach()  # stays on the device: no host-device synchronisation until we log
        step += 1

        # --- plumbing: log, sample, checkpoint ---
        if step % cfg.log_every == 0 or step == cfg.steps:
            if world > 1:
                torch.distributed.all_reduce(loss_sum)  # the sum of every process's loss, in every process
            mean_loss = loss_sum.item() / (step - last_step) / world
            if not math.isfinite(mean_loss):
                sys.exit(f"{PROG}: the loss became {mean_loss} by step {step}; lower --lr and run again "
                         f"with --resume (it continues from the last checkpoint, written before this)")
            now = time.time()
            speed = (step - last_step) * cfg.batch_size / (now - last_time)
            if rank == 0:
                print(f"step {step:>7}/{cfg.steps} | loss {mean_loss:.4f} | {speed:7.1f} img/s | "
                      f"ETA {(cfg.steps - step) * cfg.batch_size / speed / 3600:5.2f} h", flush=True)
                writer.writerow([step, f"{mean_loss:.6f}", f"{warmup.get_last_lr()[0]:.3e}", f"{speed:.1f}",
                                 f"{now - start:.1f}"])
                metrics.flush()
            loss_sum.zero_()
            last_time, last_step = now, step
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            sample_grid()
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            checkpoint()
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        metrics.close()
        print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min; run in {run_dir}")
        if cfg.fid:
            run_fid(cfg, generate(ema, cfg, cfg.fid, data.shape[1:], device,
                                  torch.Generator(device).manual_seed(cfg.seed + 1)), run_dir, step)
# <<< shared: train


# =============================================================================================
# 7. Main: train, or generate, invert or interpolate with a checkpoint
# =============================================================================================
# >>> shared: sample_mode
def load_for_sampling(cfg: Config):
    """The EMA network of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt)
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["ema"]["conv_in.weight"].shape[1]
    model = build_model(cfg, channels)
    model.load_state_dict(state["ema"])
    return model.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state["step"]


def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the sampling speed (and FID with --fid)."""
    device = pick_device(cfg.device)
    model, cfg, shape, step = load_for_sampling(cfg)
    run_dir = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt))
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    images = generate(model.to(device), cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed)).cpu()
    seconds = time.time() - start  # .cpu() waited for the device to finish: the clock is honest
    save_pngs(images, os.path.join(run_dir, "generated"))
    save_grid(images[:64], os.path.join(run_dir, "generated_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          + " ".join(f"{k}={getattr(cfg, k)}" for k in SAMPLER_FIELDS) + f") -> {run_dir}/generated/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, step)
# <<< shared: sample_mode


def invert_mode(cfg: Config) -> None:
    """--invert: the first 8 training images → their latents x_T (η = 0 ODE, forwards) → back to images."""
    device = pick_device(cfg.device)
    model, cfg, shape, _ = load_for_sampling(cfg)
    check_sample_steps(cfg)
    run_dir = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt))
    os.makedirs(run_dir, exist_ok=True)
    x0 = get_data(cfg)[:8].to(device)  # (8, C, H, W): the first training images
    betas, model = make_betas(cfg.schedule, cfg.timesteps), model.to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        x_T = invert(model, x0, betas, cfg.sample_steps, cfg.skip, device=device)  # (8, C, H, W)
        x_rec = sample(model, x0.shape, betas, cfg.sample_steps, 0.0, cfg.skip, x_T=x_T, clip_x0=cfg.clip_x0,
                       device=device)
    save_grid(torch.cat([x0, x_T, x_rec]), os.path.join(run_dir, "invert.png"), nrow=len(x0))
    print(f"wrote {run_dir}/invert.png: images (top), latents x_T (middle, clipped to [-1, 1] for display), "
          f"reconstructions (bottom); S = {cfg.sample_steps}, {cfg.skip} τ")
    print(f"reconstruction error: mean squared {F.mse_loss(x_rec.float(), x0).item():.5f}, "
          f"max {(x_rec.float() - x0).abs().max().item():.4f} (images in [-1, 1]; for scale, two different "
          f"images differ by {F.mse_loss(x0, x0.roll(1, 0)).item():.4f}) | latents: mean "
          f"{x_T.mean().item():.3f}, std {x_T.std().item():.3f} (N(0, I): 0, 1)")


def interpolate_mode(cfg: Config) -> None:
    """--interpolate: 4 rows, each decoding 10 latents along the slerp arc between two x_T, with η = 0."""
    device = pick_device(cfg.device)
    model, cfg, shape, _ = load_for_sampling(cfg)
    check_sample_steps(cfg)
    run_dir = cfg.out or os.path.dirname(os.path.abspath(cfg.ckpt))
    os.makedirs(run_dir, exist_ok=True)
    ends = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(cfg.seed))  # 4 pairs of x_T
    x_T = torch.stack([slerp(ends[0, row], ends[1, row], alpha) for row in range(4)
                       for alpha in torch.linspace(0, 1, 10).tolist()])  # (40, C, H, W)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        images = sample(model.to(device), x_T.shape, make_betas(cfg.schedule, cfg.timesteps), cfg.sample_steps,
                        0.0, cfg.skip, x_T=x_T, clip_x0=cfg.clip_x0, device=device)
    save_grid(images, os.path.join(run_dir, "interpolate.png"), nrow=10)
    print(f"wrote {run_dir}/interpolate.png: each row decodes slerp(x_T⁽⁰⁾, x_T⁽¹⁾, α) for α = 0, 1/9, …, 1 "
          f"with η = 0 (S = {cfg.sample_steps}, {cfg.skip} τ)")


def main(cfg: Config) -> None:
    for name in ("timesteps", "steps", "batch_size", "log_every", "sample_every", "ckpt_every", "num_samples",
                 "sample_steps"):
        if getattr(cfg, name) < 1:
            sys.exit(f"{PROG}: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1 or not 0 <= cfg.dropout < 1 or cfg.lr <= 0 or cfg.fid < 0:
        sys.exit(f"{PROG}: need 0 <= --ema-decay < 1, 0 <= --dropout < 1, --lr > 0 and --fid >= 0")
    if not 0 <= cfg.eta <= 1:
        sys.exit(f"{PROG}: --eta must be between 0 (deterministic) and 1 (DDPM-like), got {cfg.eta}")
    mode = next((f"--{name}" for name in ("invert", "interpolate", "sample") if getattr(cfg, name)), "")
    if mode and not cfg.ckpt:
        sys.exit(f"{PROG}: {mode} needs --ckpt RUN/ckpt.pt (a checkpoint written by ddpm.py or ddim.py)")
    if cfg.invert:
        invert_mode(cfg)
    elif cfg.interpolate:
        interpolate_mode(cfg)
    elif cfg.sample:
        sample_mode(cfg)
    else:
        check_sample_steps(cfg)  # training draws its sample grids with DDIM: catch a bad S before it starts
        train(cfg)


if __name__ == "__main__":
    main(parse_args())
