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
        checkpoint; S = 50 network calls per image instead of T = 1000 (on an H200: 14× the images/s, docs/ddpm.md)
  python ddim.py --sample --ckpt runs/ddpm-cifar10/ckpt.pt --sample-steps 100 --skip quadratic --no-clip-x0 \
        --num-samples 50000 --fid 50000 --fid-weights pt_inception-2015-12-05-6726825d.pth
        # the DDIM paper's Table 1 setting (CIFAR-10, η = 0), on the ruler of its FIDs
  python ddim.py --sample --ckpt runs/ddpm-mnist/ckpt.pt --sample-steps 20 --eta 1 --skip trailing
        # the CPU recipes' sampler: 1/5 of DDPM's calls for 1.32-2.1x its MNIST-FID on our CPU-trained
        # models (1.04x on a GPU-trained one); trained with --timesteps 1000, --sample-steps 50 made
        # 1/20 of the calls for 1.02x (docs/ddim.md)
  python ddim.py --invert --ckpt RUN/ckpt.pt        # invert.png: images, their latents x_T, reconstructions
  python ddim.py --interpolate --ckpt RUN/ckpt.pt   # interpolate.png: slerp between two x_T, decoded with η = 0
  python ddim.py --dataset mnist ...                # trains exactly as ddpm.py does (same flags; torchrun too)
  python benchmarks/ddim_vs_ddpm.py --ckpt RUN/ckpt.pt   # DDPM vs DDIM: time and quality (docs/ddim.md)
DDIM's number of sampling steps S is --sample-steps (the DDIM code's --timesteps): --steps counts
training steps, as in every script.

Sections
  1. Config     2. Data     3. Model (U-Net)     4. Objective (schedules, q(x_t|x_0), L_simple)
  5. Sampler (DDIM, Eq. 12; inversion; interpolation)     6. Train     7. Main
  then, behind a fence, the plumbing a first reading skips: --sample, --visualize, --invert and
  --interpolate, the flags, dataset files, the run (processes, resume, checkpoints, log), files

Where we depart from the paper and its code (and why)
  - The uniform τ is ⌊i·T/S⌋: the DDIM code's range(0, T, T // S) whenever S divides T, and still
    exactly S steps when it does not (range would give more than S).
  - The quadratic τ is the DDIM code's ⌊(i·√(0.8·T)/(S−1))²⌋, but the repeated steps it makes near
    t = 0 when S ≳ √T (0, 0, 1, 2, 5, … for S = 50, T = 1000) are moved up to the previous step + 1.
  - Inversion calls ε_θ at the step it goes to, as common inversion code does: the network has no
    input for the clean level it starts from.
  - x̂_0 is clipped to [-1, 1] by default (the DDIM code does not: --no-clip-x0), and ε recomputed from
    the clipped x̂_0, as guided-diffusion's DDIM sampler does, so each step agrees with the x̂_0 it uses.
    The trailing τ needs it: its first step is t = T−1, where the cosine schedule's √ᾱ ≈ 5e-4 at T = 100
    (5e-5 at T = 1000), so x̂_0 = (x_t − √(1−ᾱ)·ε_θ)/√ᾱ multiplies the network's error by ~2000
    (unclipped, at T = 100: MNIST-FID ~700).
    With the uniform τ, clipping scored the same at S = 10 and 20 and better at S = 50 (docs/ddim.md).
  - The uniform τ stays the default: at η = 0 it beat the clipped trailing τ at S = 10, 20 and 50.
  - Training is ddpm.py's, departures included (see its header).
"""
import argparse
import copy
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "ddim": names runs and error messages
READS = ("ddpm", "ddim")  # the scripts whose checkpoints this one can load (the same format)


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
    timesteps: int = 1000  # T, the number of diffusion steps (300 in the student project "Generating Realistic Images using DDPM": docs/compare.md)
    sample_steps: int = 50  # S, network calls per image: DDIM visits S of the T steps (the sub-sequence τ)
    eta: float = 0.0  # η in [0, 1]: 0 deterministic (DDIM), 1 DDPM-like noise (σ_t² = β̃_t when S = T)
    skip: str = "uniform"  # how τ picks S of the T steps: uniform (every T/S-th, from 0) | trailing (from T−1) | quadratic
    clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] while sampling (on, as ddpm.py; the DDIM code: off)
    # --- model (0 or "": the size for this image size, see UNET_SIZES) ---
    channels: int = 0  # base channel count of the U-Net (0: 128 at 32 px, as in the paper; 64 at 28 and 16 px)
    channel_mult: str = ""  # channel multiplier per resolution level, e.g. 1,2,2,2 ("": the paper's at 32 px; 1,2,2 below)
    num_res_blocks: int = 2  # residual blocks per level on the way down (paper: 2)
    attn_res: str = ""  # resolutions with self-attention, e.g. 16 or 14,7 ("": half the image size; "none")
    dropout: float = 0.1  # dropout inside residual blocks (paper: 0.1 on CIFAR-10)
    # --- class-conditional model, classifier-free guidance (Ho & Salimans 2022) ---
    class_cond: bool = False  # condition ε_θ on the class label (the dataset's, or --labels): "draw me a 7"
    num_classes: int = 0  # with --class-cond: how many classes (0: max label + 1)
    labels: str = ""  # with a .npy --dataset: a .npy of integer labels (N,) or one-hot rows (N, K)
    p_uncond: float = 0.1  # with --class-cond: probability of training on the null label ∅ instead (paper: 0.1-0.2)
    guidance: float = 0.5  # w for a class-conditional model: ε̃ = (1 + w)·ε_θ(x, y) − w·ε_θ(x, ∅); 0: none (why 0.5: docs/ddpm.md)
    label: int = -1  # with --sample or --visualize on a class-conditional model: only this class (-1: every class in turn)
    # --- optimisation ---
    steps: int = 800_000  # training steps (paper: 800k on CIFAR-10)
    batch_size: int = 128  # images per step, over all GPUs under torchrun (paper: 128); also the sampling batch
    lr: float = 2e-4  # Adam learning rate (paper: 2e-4)
    warmup: int = 5000  # steps of linear learning-rate warm-up (paper: 5000)
    lr_decay: str = "none"  # learning-rate decay: none (paper: constant) | cosine (to 0 by --steps; short runs)
    grad_clip: float = 1.0  # clip the gradient norm to this (paper: 1.0)
    ema_decay: float = 0.9999  # decay of the exponential moving average of the weights (paper: 0.9999)
    # --- run ---
    out: str = ""  # run directory ("": runs/ddim-<dataset>; --sample: the checkpoint's folder, or its ddim-samples/ for another script's)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast only on GPUs and CPUs with AVX512-BF16/AMX)
    compile: bool = False  # torch.compile the network for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 10_000  # steps between sample grids (drawn from the same fixed noise)
    ckpt_every: int = 5000  # steps between checkpoints (one is also written at the end, and on Ctrl-C)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint (of ddpm.py or ddim.py) to resume from, sample from, visualise, invert or interpolate
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs from --ckpt's EMA weights
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate this many images and print their FID against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; or a file, e.g. pytorch-fid's for paper numbers)
    visualize: bool = False  # write forward.png and reverse.png: the two processes, step by step
    invert: bool = False  # write invert.png: 8 training images, their latents x_T (η = 0) and reconstructions
    interpolate: bool = False  # write interpolate.png: slerp between pairs of x_T, decoded with η = 0


CHOICES = {"schedule": ("linear", "cosine"), "lr_decay": ("none", "cosine"), "skip": ("uniform", "trailing", "quadratic"),
           "device": ("auto", "cuda", "cpu", "mps"), "precision": ("auto", "fp32", "bf16")}
RANGES = {"image_size": ">=0", "timesteps": ">=1", "channels": ">=0", "num_res_blocks": ">=1", "dropout": "[0,1)",
          "num_classes": ">=0", "p_uncond": "[0,1)", "guidance": ">=0", "label": ">=-1",
          "steps": ">=1", "batch_size": ">=1", "lr": ">0", "warmup": ">=0", "grad_clip": ">0", "ema_decay": "[0,1)",
          "log_every": ">=1", "sample_every": ">=1", "ckpt_every": ">=1", "num_samples": ">=1", "fid": ">=0",
          "sample_steps": ">=1", "eta": "[0,1]"}
ARCH_FIELDS = ("dataset", "image_size", "schedule", "timesteps", "channels", "channel_mult",
               "num_res_blocks", "attn_res", "dropout", "class_cond", "num_classes")  # fixed by a checkpoint: taken from it
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


# =============================================================================================
# 3. Model: the DDPM U-Net (Ho et al., Appendix B; same layers as their TensorFlow code)
# =============================================================================================
# >>> shared: unet
UNET_SIZES = {  # image size -> (channels, channel_mult); other sizes use the CIFAR-10 network
    32: (128, "1,2,2,2"),  # CIFAR-10, the paper's network: 35.7M parameters
    28: (64, "1,2,2"),  # MNIST / Fashion-MNIST: 28 -> 14 -> 7, 6.5M parameters
    16: (64, "1,2,2"),  # 16x16 sprites: 16 -> 8 -> 4, 6.5M parameters
}


def int_list(text: str, flag: str) -> list:
    """'1,2,2' -> [1, 2, 2], every entry a positive integer; else one line naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        sys.exit(f"{PROG}: {flag} must be comma-separated positive integers such as 1,2,2, got {text!r}")
    return values


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the step t (as in the Transformer): (B,) -> (B, dim).
    emb[i] = sin(t · 10000^(−i/(d/2−1))) for i < d/2, then the cosines."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def zero(layer: nn.Module) -> nn.Module:
    """Start a layer at zero output, as the paper's code does for the last layer of each branch:
    every residual block then begins as its skip path and the network begins by predicting ε = 0."""
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
    """ε_θ(x_t, t), or ε_θ(x_t, t, y) with num_classes: predicts the noise in x_t. Down path, middle,
    up path with skip connections."""

    def __init__(self, image_channels=3, image_size=32, channels=0, channel_mult="", num_res_blocks=2,
                 attn_res="", dropout=0.1, num_classes=0):
        super().__init__()
        default_ch, default_mult = UNET_SIZES.get(image_size, UNET_SIZES[32])
        ch = channels or default_ch
        mult = int_list(channel_mult or default_mult, "--channel-mult")
        attn = [] if attn_res == "none" else int_list(attn_res, "--attn-res") if attn_res else [image_size // 2]
        if image_size % 2 ** (len(mult) - 1):
            sys.exit(f"{PROG}: image size {image_size} cannot be halved "
                     f"{len(mult) - 1} times; use fewer entries in --channel-mult")
        self.ch = ch
        # t -> sinusoidal embedding (ch) -> MLP -> (4·ch), fed to every residual block
        self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        # class-conditional: one learned vector per label, added to the time embedding; row num_classes
        # is the null label ∅ ("no class"), which guidance needs (none of this exists without classes)
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, 4 * ch) if num_classes else None
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

    def forward(self, x, t, y=None):  # x: (B, C, H, W), t: (B,) integer steps 0..T-1, y: (B,) labels or None (∅)
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4·ch)
        if self.label_emb is not None:
            temb = temb + self.label_emb(torch.full_like(t, self.num_classes) if y is None else y)  # (B, 4·ch)
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


def build_model(cfg: Config, image_channels: int) -> UNet:
    return UNet(image_channels, cfg.image_size, cfg.channels, cfg.channel_mult, cfg.num_res_blocks,
                cfg.attn_res, cfg.dropout, cfg.num_classes if cfg.class_cond else 0)
# <<< shared: unet


# =============================================================================================
# 4. Objective: noise schedules, the forward process q(x_t | x_0), and Algorithm 1's loss
# =============================================================================================
# >>> shared: diffusion
def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape [T] (index i holds β_{i+1}: steps are 0-based in code)."""
    if schedule == "linear":
        # Ho et al.: β rises linearly from 1e-4 to 0.02 over T = 1000 steps; for other T the
        # endpoints scale by 1000/T so that ᾱ_T, the signal left at the end, stays ≈ 4e-5
        # (the top end 20/T would pass 1 for T < 20: the cap at 0.999, as for cosine, keeps β < 1).
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


def draw_batch(data: torch.Tensor, labels, cfg: Config, generator: torch.Generator, rows=slice(None)):
    """Algorithm 1, lines 2-4: x_0 ~ q(x_0) (training images), t ~ Uniform({1..T}) (0-based here) and
    ε ~ N(0, I), for a batch of --batch-size; with --class-cond also each image's label y, replaced by the
    null label ∅ with probability --p-uncond (Ho & Salimans, Algorithm 1). Under torchrun every process
    draws the same numbers (the same generator) and keeps its own `rows`: W processes take one process's step."""
    B, device = cfg.batch_size, data.device
    i = torch.randint(0, len(data), (B,), device=device, generator=generator)
    x0 = data[i]  # (B, C, H, W)
    if cfg.dataset == "cifar10":  # random horizontal flips, on CIFAR-10 only (as in the paper)
        flip = torch.rand(B, 1, 1, 1, device=device, generator=generator) < 0.5
        x0 = torch.where(flip, x0.flip(3), x0)
    t = torch.randint(0, cfg.timesteps, (B,), device=device, generator=generator)  # (B,)
    eps = torch.randn(x0.shape, device=device, generator=generator)  # (B, C, H, W)
    if not cfg.class_cond:
        return x0[rows], t[rows], eps[rows], None
    drop = torch.rand(B, device=device, generator=generator) < cfg.p_uncond  # (B,) True: train on ∅
    y = torch.where(drop, cfg.num_classes, labels[i])  # (B,) labels 0..K−1, or K for ∅
    return x0[rows], t[rows], eps[rows], y[rows]


def check_labels(cfg: Config, labels):
    """--class-cond: the dataset's labels (on the device of the images), with cfg.num_classes set; else None."""
    if not cfg.class_cond:
        return None
    if labels is None:
        sys.exit(f"{PROG}: --class-cond needs labels and {cfg.dataset} has none: a .npy dataset takes "
                 "--labels FILE.npy, a folder one subfolder of images per class")
    cfg.num_classes = cfg.num_classes or int(labels.max()) + 1
    if labels.max() >= cfg.num_classes:
        sys.exit(f"{PROG}: --num-classes {cfg.num_classes} is too few for labels up to {int(labels.max())}")
    return labels


def diffusion_loss(eps_model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
                   y=None) -> torch.Tensor:
    """Algorithm 1, line 5 (L_simple, Eq. 14): ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖², the batch mean
    (with labels y: ε_θ(x_t, t, y), the conditional model)."""
    return F.mse_loss(eps_model(q_sample(x0, t, eps, alpha_bar), t, y), eps)


def lr_factor(cfg: Config, s: int) -> float:
    """Step s (0-based) trains with learning rate --lr · lr_factor(cfg, s)."""
    # linear warm-up (paper):  min(1, (s + 1) / warmup)
    warm = min(1.0, (s + 1) / max(1, cfg.warmup))
    if cfg.lr_decay == "none":
        return warm
    # --lr-decay cosine:  × ½(1 + cos(π s / steps)), ≈ 0 by the last step, so a short run ends at rest
    return warm * (0.5 + 0.5 * math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
# <<< shared: diffusion


# =============================================================================================
# 5. Sampler: DDIM's generalised reverse process (Song et al., Eq. 12), inversion, interpolation
# =============================================================================================
# (Equation numbers in this section are Song et al.'s unless another paper is named; above it, Ho et al.'s.
# The notation is Ho et al.'s, which differs from Song et al.'s in one name: their α_t is Ho et al.'s
# ᾱ_t, the signal left after t steps. We write ᾱ_t.)
# L_simple above trains ε_θ on q(x_t | x_0) alone. Any reverse process with those same marginals
# can use it: DDIM's inference family q_σ (Eqs. 6-7; Lemma 1) has them for every σ, and for every
# sub-sequence τ of the steps (Sec. 4.2), and Eq. 12 samples its reverse: it jumps from τ_i
# straight to τ_{i−1}, S network calls instead of T.
#
# Steps are 0-based in code, as in ddpm.py: code step t is the paper's step t + 1, and
# alpha_bar[t] holds ᾱ_{t+1}. The paper's ᾱ_0 = 1 (clean data, the level below the first step)
# has no index: t_prev = −1 stands for it.
def timestep_sequence(T: int, S: int, skip: str = "uniform") -> list:
    """τ: the S steps (0-based, strictly increasing, in 0..T−1) at which the sampler calls ε_θ. Sampling
    starts at the last, τ_{S−1} (the paper's τ_S), from pure noise x ~ N(0, I); the three choices differ
    in where that is:

    uniform:   τ_i = ⌊i·T/S⌋, i = 0..S−1: 0, T/S, 2T/S, …, T − T/S. The DDIM code's range(0, T, T // S)
               when S divides T. It starts short of the last step, at T − T/S, whose ᾱ is not quite 0.
    trailing:  τ_i = ⌊(i+1)·T/S⌋ − 1: T/S − 1, 2T/S − 1, …, T − 1 (Lin et al. 2023, arXiv:2305.08891,
               Table 2). It starts at the last step, where training saw (almost) pure noise, as sampling gives.
    quadratic: τ_i = ⌊(i·√(0.8·T)/(S−1))²⌋, the DDIM code's choice for CIFAR-10: dense near the data, sparse
               in the noise. It starts at 0.8·T, where much signal is left (cosine, T = 100: ᾱ ≈ 0.09). For
               S ≳ √T the first values repeat (0, 0, 1, 2, 5, … for T = 1000, S = 50); each is raised to at
               least τ_{i−1} + 1, so the steps are distinct. For S = T all three give every step."""
    if not 1 <= S <= T:
        raise ValueError(f"need 1 <= S <= T, got S = {S}, T = {T}")
    if skip == "uniform":
        return [i * T // S for i in range(S)]
    if skip == "trailing":
        return [(i + 1) * T // S - 1 for i in range(S)]
    if skip == "quadratic":
        tau = [int(v) for v in np.linspace(0, math.sqrt(0.8 * T), S) ** 2]
        for i in range(1, S):
            tau[i] = max(tau[i], tau[i - 1] + 1)  # stays <= T − 1 (tests check every S <= T)
        return tau
    raise ValueError(f"unknown skip {skip!r}: use uniform, trailing or quadratic")


@torch.no_grad()
def sample(eps_model, shape, betas, steps=50, eta=0.0, skip="uniform", generator=None, x_T=None,
           clip_x0=False, device="cpu", on_step=None) -> torch.Tensor:
    """Generate images with DDIM's reverse process in S = `steps` network calls:
    x_{τ_S} → x_{τ_{S−1}} → … → x_{τ_1} → x_0 in the paper's 1-based τ (tau[S−1], …, tau[0] in code),
    each step by Eq. 12.

    eps_model(x_t, t) -> ε for t a LongTensor [B] of 0-based steps, as in ddpm.py; x_T: starting
    noise (drawn from `generator` if None); eta: 0 = deterministic, 1 = DDPM-like; skip: how τ is
    chosen (see timestep_sequence); clip_x0: off by default here, as in the DDIM code (the script's
    --clip-x0 is on, see the header); on_step(t, x_t, x0_pred), if given, is called at every step."""
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


# >>> shared: generate
def guided(model, y: torch.Tensor, w: float):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) as an ε-model (x_t, t) -> ε, for any sampler:
        ε̃(x_t, t, y) = (1 + w) · ε_θ(x_t, t, y) − w · ε_θ(x_t, t, ∅)
    Both terms come from one network call on the batch twice over (labels y, then the null label ∅);
    w = 0 is the plain conditional model, one call on the batch."""
    if w == 0:
        return lambda x, t: model(x, t, y)
    null = torch.full_like(y, model.num_classes)

    def eps_model(x, t):
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
        return (1 + w) * cond - w * uncond
    return eps_model


def sample_labels(cfg: Config, n: int):
    """The class of each of n images of a class-conditional model: --label, or every class in turn
    (0, 1, …, K−1, 0, 1, …), so that n images hold each class equally; None for an unconditional one."""
    if not cfg.class_cond:
        return None
    return torch.full((n,), cfg.label) if cfg.label >= 0 else torch.arange(n) % cfg.num_classes


def grid_labels(cfg: Config):
    """A sample grid of a class-conditional model: one row of 8 per class (64 of --label); else None (64 images)."""
    if not cfg.class_cond:
        return None
    return torch.full((64,), cfg.label) if cfg.label >= 0 else torch.arange(cfg.num_classes).repeat_interleave(8)


def generate(model, cfg: Config, n: int, shape, device, generator, label: str = "sampling", labels=None):
    """n images from the sampler (len(labels) of the given classes, guided by --guidance, for a
    class-conditional model), in batches of --batch-size, with a progress line: (n, C, H, W) in [-1, 1]."""
    n = n if labels is None else len(labels)
    progress, images, calls = Progress(f"{label} ({network_calls(cfg)} network calls per image)", n), [], 0

    def tick(*_):  # on_step: one network call done, for the whole batch
        nonlocal calls
        calls += 1
        progress.update(len(images) * cfg.batch_size + b * calls / network_calls(cfg))
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        for i in range(0, n, cfg.batch_size):
            b, calls = min(cfg.batch_size, n - i), 0
            eps_model = model if labels is None else guided(model, labels[i:i + b].to(device), cfg.guidance)
            # sample_with: this script's sample() above with cfg's settings (it is just after the fence)
            images.append(sample_with(cfg, eps_model, (b, *shape), generator, device, on_step=tick).float())
    progress.update(n)
    return torch.cat(images)
# <<< shared: generate


# =============================================================================================
# 6. Train: Algorithm 1 (the plumbing it calls, class Run, is after the fence)
# =============================================================================================
# >>> shared: train
def train(cfg: Config) -> None:
    """Algorithm 1: repeat { x_0 ~ q(x_0), t ~ Uniform({1..T}), ε ~ N(0, I); take a gradient step on
    ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² }, keeping an average of the weights (EMA) for sampling."""
    with Run(cfg, needs=("model", "ema", "optimizer", "warmup", "rng_batches")) as run:
        cfg, device = run.cfg, run.device
        data, labels = get_data(cfg)  # (N, C, H, W) in [-1, 1], and (N,) labels or None
        labels = check_labels(cfg, labels)  # --class-cond: the labels, and cfg.num_classes set; else None
        data, labels = data.to(device), None if labels is None else labels.to(device)  # resident on the device
        cfg.image_size = data.shape[-1]
        run.start(images=len(data), batch_per_process=cfg.batch_size // run.world)

        # --- core: the network, its EMA copy, the optimiser, the noise schedule ---
        model = build_model(cfg, data.shape[1]).to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # sampling uses these averaged weights
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel for all weights
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
        alpha_bar = torch.cumprod(1 - make_betas(cfg.schedule, cfg.timesteps), 0).float().to(device)  # ᾱ_t
        batches = torch.Generator(device).manual_seed(cfg.seed)  # the same in every process: x_0, t and ε
        step = run.restore(model=model, ema=ema, optimizer=optimizer, warmup=warmup, rng_batches=batches)
        net = run.wrap(model)  # torchrun: DDP, which averages the gradients; --compile: compiled. Same weights.
        run.describe(model, note=f"{cfg.schedule} schedule, T={cfg.timesteps}")
        while step < cfg.steps:
            # --- core: one step of Algorithm 1 ---
            model.train()
            x0, t, eps, y = draw_batch(data, labels, cfg, batches, run.rows)  # lines 2-4 (this process's share)
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
                loss = diffusion_loss(net, x0, t, eps, alpha_bar, y)  # line 5: ‖ε − ε_θ(x_t, t)‖²
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under torchrun, DDP averages the gradients over the processes here
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            warmup.step()
            # EMA:  θ_ema ← d · θ_ema + (1 − d) · θ,  d = min(decay, (1 + step)/(10 + step)): the warm-up
            # keeps early averages from clinging to the random init (0.9999⁵⁰⁰⁰ = 0.6 would still be init)
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one fused call
            step += 1

            # --- plumbing (class Run, after the fence): the log, grids from fixed noise, checkpoints, Ctrl-C ---
            run.log(step, loss=loss.detach(), lr=warmup.get_last_lr()[0])
            if run.due(step, cfg.sample_every):
                run.save_grid(step, lambda: generate(ema, cfg, 64, data.shape[1:], device, run.fixed_noise(),
                                                     f"sample grid at step {step}", grid_labels(cfg)))
            if run.stopping(step) or run.due(step, cfg.ckpt_every):
                run.save(step)  # after Ctrl-C or SIGTERM, this also ends the run (how to continue: --resume)
        if cfg.fid and run.rank == 0:
            run_fid(cfg, generate(ema, cfg, cfg.fid, data.shape[1:], device, run.fixed_noise(1), "--fid",
                                  sample_labels(cfg, cfg.fid)), run.dir, step)
# <<< shared: train


# =============================================================================================
# 7. Main: train, or generate, invert or interpolate with a checkpoint (those commands: after the fence)
# =============================================================================================
def main(cfg: Config) -> None:
    check_ranges(cfg)
    if cfg.channel_mult:
        int_list(cfg.channel_mult, "--channel-mult")
    if cfg.attn_res not in ("", "none"):
        int_list(cfg.attn_res, "--attn-res")
    mode = next((f"--{name}" for name in ("invert", "interpolate", "sample") if getattr(cfg, name)), "")
    if mode and not cfg.ckpt:
        sys.exit(f"{PROG}: {mode} needs --ckpt RUN/ckpt.pt (a checkpoint written by ddpm.py or ddim.py)")
    if cfg.invert:
        invert_mode(cfg)
    elif cfg.interpolate:
        interpolate_mode(cfg)
    elif cfg.visualize:
        visualize(cfg)
    elif cfg.sample:
        sample_mode(cfg)
    else:
        check_sample_steps(cfg)  # training draws its sample grids with DDIM: catch a bad S before it starts
        train(cfg)


# =============================================================================================
# Plumbing (a first reading stops at main(), above). First what main() runs besides training: --sample
# (PNGs, a grid, the speed, FID) and the other commands that write files around the sampler; then, shared
# by every script, the flags, reading datasets from disk, the run (processes, resume, log, checkpoints,
# Ctrl-C), files, progress
# =============================================================================================
SAMPLER_FIELDS = ("sample_steps", "eta", "skip", "clip_x0", "class_cond", "guidance")  # what describes a sample in fid.csv


def sample_with(cfg: Config, model, shape, generator, device, on_step=None) -> torch.Tensor:
    """This script's sampler with cfg's settings; it calls the network cfg.sample_steps times."""
    check_sample_steps(cfg)  # S <= T, else one line
    return sample(model, shape, make_betas(cfg.schedule, cfg.timesteps), cfg.sample_steps, cfg.eta, cfg.skip,
                  generator, clip_x0=cfg.clip_x0, device=device, on_step=on_step)


def network_calls(cfg: Config) -> int:
    return cfg.sample_steps


# >>> shared: sample_mode
def load_for_sampling(cfg: Config):
    """The EMA network of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt, needs=("ema", "config", "step"))
    cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, getattr(Config, k)) for k in ARCH_FIELDS})
    if cfg.label >= (cfg.num_classes if cfg.class_cond else 0):
        sys.exit(f"{PROG}: --label {cfg.label}: " + (f"{cfg.ckpt} knows classes 0..{cfg.num_classes - 1}"
                 if cfg.class_cond else f"{cfg.ckpt} is not class-conditional (train with --class-cond)"))
    channels = state["ema"]["conv_in.weight"].shape[1]
    model = build_model(cfg, channels)
    model.load_state_dict(state["ema"])
    return model.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state


def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the sampling speed (and FID with --fid)."""
    device = pick_device(cfg.device)
    model, cfg, shape, state = load_for_sampling(cfg)
    run_dir = cfg.out or sample_dir(cfg, state)
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    labels = sample_labels(cfg, n)  # None, or the class of each image
    images = generate(model.to(device), cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed),
                      labels=labels).cpu()
    seconds = time.time() - start  # .cpu() waited for the device to finish: the clock is honest
    save_pngs(images, os.path.join(run_dir, "generated"), labels)
    if labels is not None and cfg.label < 0:  # one row per class: the first images of each
        per_class = max(1, min(8, n // cfg.num_classes))
        rows = [torch.nonzero(labels == k).flatten()[:per_class] for k in range(cfg.num_classes)]
        save_grid(images[torch.cat(rows)], os.path.join(run_dir, "generated_grid.png"), nrow=per_class)
    else:
        save_grid(images[:64], os.path.join(run_dir, "generated_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          + " ".join(f"{k}={getattr(cfg, k)}" for k in SAMPLER_FIELDS) + f") -> {run_dir}/generated/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, state["step"])
# <<< shared: sample_mode


# >>> shared: visualize
def visualize(cfg: Config) -> None:
    """forward.png: one image at 10 noise levels; reverse.png: x_t (top) and x̂_0 (bottom) along the sampler's chain."""
    device = pick_device(cfg.device)
    if cfg.ckpt:
        model, cfg, shape, state = load_for_sampling(cfg)
    run_dir = cfg.out or (sample_dir(cfg, state) if cfg.ckpt else f"runs/{PROG}-visualize")
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x0 = get_data(cfg)[0][:1]  # (1, C, H, W): the first training image
    steps = torch.linspace(0, cfg.timesteps - 1, 10).round().long()  # 10 points along the chain
    alpha_bar = torch.cumprod(1 - make_betas(cfg.schedule, cfg.timesteps), 0)
    save_grid(q_sample(x0.expand(10, -1, -1, -1), steps, torch.randn(10, *x0.shape[1:]), alpha_bar),
              os.path.join(run_dir, "forward.png"), nrow=10)
    print(f"wrote {run_dir}/forward.png: x_t at t = {steps.tolist()}")
    if cfg.ckpt:
        chain, model = [], model.to(device)  # (t, x_t, predicted x_0) at every step of the sampler
        labels = sample_labels(cfg, 1)  # a class-conditional model draws --label (or class 0)
        sample_with(cfg, model if labels is None else guided(model, labels.to(device), cfg.guidance), (1, *shape),
                    torch.Generator(device).manual_seed(cfg.seed), device,
                    on_step=lambda t, x, x0_pred: chain.append((t, x, x0_pred)))
        chain = [chain[i] for i in sorted(set(torch.linspace(0, len(chain) - 1, 10).round().long().tolist()))]
        save_grid(torch.cat([x for _, x, _ in chain] + [x0_pred for _, _, x0_pred in chain]),
                  os.path.join(run_dir, "reverse.png"), nrow=len(chain))
        print(f"wrote {run_dir}/reverse.png: x_t (top row) and predicted x_0 (bottom row) at t = "
              f"{[t for t, _, _ in chain]}")
# <<< shared: visualize


def invert_mode(cfg: Config) -> None:
    """--invert: the first 8 training images → their latents x_T (η = 0 ODE, forwards) → back to images."""
    device = pick_device(cfg.device)
    model, cfg, shape, state = load_for_sampling(cfg)
    check_sample_steps(cfg)
    run_dir = cfg.out or sample_dir(cfg, state)
    os.makedirs(run_dir, exist_ok=True)
    x0 = get_data(cfg)[0][:8].to(device)  # (8, C, H, W): the first training images
    betas, model = make_betas(cfg.schedule, cfg.timesteps), model.to(device)
    labels = sample_labels(cfg, len(x0))  # a class-conditional model: --label (or every class in turn)
    model = model if labels is None else guided(model, labels.to(device), cfg.guidance)
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
    model, cfg, shape, state = load_for_sampling(cfg)
    check_sample_steps(cfg)
    run_dir = cfg.out or sample_dir(cfg, state)
    os.makedirs(run_dir, exist_ok=True)
    ends = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(cfg.seed))  # 4 pairs of x_T
    x_T = torch.stack([slerp(ends[0, row], ends[1, row], alpha) for row in range(4)
                       for alpha in torch.linspace(0, 1, 10).tolist()])  # (40, C, H, W)
    model = model.to(device)
    if cfg.class_cond:  # each row keeps one class: --label, or classes 0, 1, 2, 3
        rows = torch.full((4,), cfg.label) if cfg.label >= 0 else torch.arange(4) % cfg.num_classes
        model = guided(model, rows.repeat_interleave(10).to(device), cfg.guidance)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        images = sample(model, x_T.shape, make_betas(cfg.schedule, cfg.timesteps), cfg.sample_steps,
                        0.0, cfg.skip, x_T=x_T, clip_x0=cfg.clip_x0, device=device)
    save_grid(images, os.path.join(run_dir, "interpolate.png"), nrow=10)
    print(f"wrote {run_dir}/interpolate.png: each row decodes slerp(x_T⁽⁰⁾, x_T⁽¹⁾, α) for α = 0, 1/9, …, 1 "
          f"with η = 0 (S = {cfg.sample_steps}, {cfg.skip} τ)")


def check_sample_steps(cfg: Config) -> None:
    """S <= T, checked before anything runs: DDIM visits S of the model's T steps."""
    if cfg.sample_steps > cfg.timesteps:
        sys.exit(f"{PROG}: --sample-steps {cfg.sample_steps} is more than the model's "
                 f"T = {cfg.timesteps} diffusion steps; use at most {cfg.timesteps}")


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
