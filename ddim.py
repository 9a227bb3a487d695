"""ddim.py: Denoising Diffusion Implicit Models: a DDPM sampled in a few deterministic steps.

Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502,
on a DDPM (Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239) trained exactly as in ddpm.py.

DDPM's loss only ever asks about q(x_t | x_0), one step t at a time: it never says how x_{t−1} follows
x_t. So DDIM keeps the trained network and changes only the sampler: a family of reverse processes with
the same q(x_t | x_0), one for each noise level η. η = 1 is DDPM-like; η = 0 adds no noise, so the
sampler is a fixed map x_T → x_0 (a discretised ODE) that can skip most steps, run backwards (x_0 → x_T:
inversion) and be walked along (interpolation between two x_T). Everything else is ddpm.py's, copied
between `# >>> shared:` markers: `diff ddpm.py ddim.py` is the sampler and what only DDIM can do.

    python ddim.py --sample --ckpt runs/ddpm-cifar10/ckpt.pt --sample-steps 50   # 50 network calls, not 1000
    python ddim.py --sample --recipe mnist-5min --ckpt runs/ddpm-mnist-5min/ckpt.pt   # the quick start's sampler
    python ddim.py --invert --ckpt RUN/ckpt.pt   # (or --interpolate) images -> latents x_T -> images
Times, scores and the DDIM paper's Table 1 command: README.md and docs/ddim.md.

Sections: 1. Config  2. Data  3. Model (U-Net)  4. Objective (schedules, q(x_t|x_0), the loss)
          5. Sampler (DDIM, Eq. 12; inversion; interpolation)  6. Train (ddpm.py's)  7. Main

Where we depart from the paper and its code (and why)
  - The uniform τ is ⌊i·T/S⌋: the DDIM code's range(0, T, T // S) when S divides T, and still S steps
    when it does not. The quadratic τ raises the repeats it makes near t = 0 (S ≳ √T) to distinct steps.
  - Inversion calls ε_θ at the step it goes to, as common inversion code does: the network has no input
    for the clean level it starts from.
  - Sampling clips x̂_0 to [-1, 1] by default and recomputes ε from it, as guided-diffusion's DDIM sampler
    does (the DDIM code does not: --no-clip-x0). The trailing τ needs it: it starts at t = T−1, where
    √ᾱ ≈ 5e-4 (cosine, T = 100) multiplies the network's error in x̂_0 by ~2000 (docs/ddim.md).
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
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.utils import save_image

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "ddim": names runs and error messages
READS = ("ddpm", "ddim")  # the scripts whose checkpoints this one reads (one format)


# 1. Config: every field is a flag (batch_size: --batch-size), its comment the --help text ==========
@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | mnist | fashion-mnist | a folder of images | a .npy of images
    data_root: str = "data"  # where torchvision keeps its datasets (downloaded there if missing)
    labels: str = ""  # with a .npy --dataset: its labels, a .npy of integers (N,) or one-hot rows (N, K)
    image_size: int = 0  # resize the images to this (0: the dataset's own size)
    # --- diffusion ---
    schedule: str = "linear"  # noise schedule: linear (Ho et al.) | cosine (Nichol & Dhariwal)
    timesteps: int = 1000  # T, the number of diffusion steps (paper: 1000)
    sample_steps: int = 50  # S, network calls per image: DDIM visits S of the T steps (the sub-sequence τ)
    eta: float = 0.0  # η in [0, 1]: 0 deterministic (DDIM), 1 DDPM-like noise (σ_t² = β̃_t when S = T)
    skip: str = "uniform"  # how τ picks S of the T steps: uniform (from 0) | trailing (from T−1) | quadratic
    clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] while sampling (as ddpm.py; the DDIM code: off)
    # --- model (0 or "": the size for the image size, from UNET_SIZES) ---
    channels: int = 0  # base width of the U-Net, even (0: 128, as in the paper; 64 at 28 and 16 px)
    channel_mult: str = ""  # width multiplier per resolution ("": 1,2,2,2, as in the paper; 1,2,2 at 28 and 16 px)
    num_res_blocks: int = 2  # residual blocks per resolution (paper: 2)
    attn_res: str = ""  # resolutions with self-attention, e.g. 16 or 14,7 ("": half the image size; none: only mid)
    dropout: float = 0.1  # dropout in the residual blocks (paper: 0.1 on CIFAR-10)
    # --- class-conditional model and classifier-free guidance (Ho & Salimans 2022) ---
    class_cond: bool = False  # condition ε_θ on the image's class: "draw me a 7"
    num_classes: int = 0  # with --class-cond: the number of classes (0: the largest label + 1)
    p_uncond: float = 0.1  # with --class-cond: how often a label is replaced by the null label ∅ (paper: 0.1-0.2)
    guidance: float = 0.3  # guidance weight w: ε̃ = (1 + w)·ε_θ(x, y) − w·ε_θ(x, ∅); 0: none (why 0.3: docs/ddpm.md)
    label: int = -1  # sampling a class-conditional model: only this class (-1: every class in turn)
    # --- optimisation ---
    steps: int = 800_000  # training steps (paper: 800k)
    batch_size: int = 128  # images per step, over all GPUs under torchrun (paper: 128); also the sampling batch
    lr: float = 2e-4  # Adam's learning rate (paper: 2e-4)
    warmup: int = 5000  # steps of linear learning-rate warm-up (paper: 5000)
    lr_decay: str = "none"  # none (paper: constant) | cosine (to 0 at --steps, so a short run ends at rest)
    grad_clip: float = 1.0  # clip the norm of the gradient to this (paper: 1)
    ema_decay: float = 0.9999  # decay of the weights' exponential moving average (paper: 0.9999)
    # --- run ---
    recipe: str = ""  # a measured setting from RECIPES, e.g. mnist-5min (flags given as well win)
    out: str = ""  # run folder ("": runs/ddim-<recipe or dataset>; --sample: the checkpoint's folder)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast on CPUs with AVX512-BF16 or AMX)
    compile: bool = False  # torch.compile the network for training
    seed: int = 0  # random seed
    log_every: int = 100  # steps between log lines (and rows of metrics.csv)
    sample_every: int = 10_000  # steps between sample grids, always from the same noise
    ckpt_every: int = 5000  # steps between checkpoints (one is also written at the end and on Ctrl-C)
    resume: bool = False  # continue training from --ckpt (default: the run folder's ckpt.pt)
    ckpt: str = ""  # the checkpoint (of ddpm.py or ddim.py) to resume, sample, visualise, invert or interpolate
    # --- generation ---
    sample: bool = False  # do not train: write --num-samples PNGs from --ckpt's averaged (EMA) weights
    num_samples: int = 64  # images that --sample writes
    fid: int = 0  # with --sample: the FID of this many samples against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; pytorch-fid's file for paper numbers)
    visualize: bool = False  # write forward.png (and with --ckpt reverse.png, reverse.gif): the processes step by step
    invert: bool = False  # write invert.png: 8 training images, their latents x_T (η = 0) and the images decoded back
    interpolate: bool = False  # write interpolate.png: slerp between pairs of latents x_T, decoded with η = 0


# What parse_args allows besides finite numbers >= 0: the choices of a text, and flags >= 1 or <= 1
CHOICES = {"schedule": ["linear", "cosine"], "skip": ["uniform", "trailing", "quadratic"],
           "lr_decay": ["none", "cosine"], "device": ["auto", "cuda", "cpu", "mps"],
           "precision": ["auto", "fp32", "bf16"]}
COUNTS = ("timesteps", "num_res_blocks", "steps", "batch_size", "log_every", "sample_every", "ckpt_every",
          "num_samples", "sample_steps")
FRACTIONS = ("dropout", "p_uncond", "ema_decay", "eta")
ARCH_FIELDS = ("dataset", "image_size", "schedule", "timesteps", "channels", "channel_mult", "num_res_blocks",
               "attn_res", "dropout", "class_cond", "num_classes")  # what a checkpoint fixes: read from it

# Measured recipes: --recipe NAME sets these flags (times, scores and how they were found: docs/ddpm.md):
# ddpm.py's, with the sampler that each was scored with. Without a recipe: the papers' CIFAR-10 setting.
FEW_STEPS = dict(sample_steps=20, eta=1.0, skip="trailing")  # 1/5 of DDPM's network calls (docs/ddim.md)
SMALL_MNIST = dict(dataset="mnist", schedule="cosine", timesteps=100, channels=32, channel_mult="1,2,2",
                   num_res_blocks=1, attn_res="7", dropout=0.0, lr_decay="cosine", device="cpu")
RECIPES = {
    "mnist-5min": dict(SMALL_MNIST, class_cond=True, batch_size=32, lr=2e-3, warmup=50, steps=850,
                       sample_every=850, ckpt_every=850, guidance=1.0, num_samples=256, **FEW_STEPS),
    "mnist-15min": dict(SMALL_MNIST, class_cond=True, batch_size=64, lr=1e-3, warmup=100, steps=1300,
                        sample_every=650, ckpt_every=650, guidance=0.0, **dict(FEW_STEPS, sample_steps=10)),
    "mnist-2400": dict(SMALL_MNIST, attn_res="", batch_size=64, lr=1e-3, warmup=100, steps=2400,
                       sample_every=400, ckpt_every=400, precision="bf16", **FEW_STEPS),  # docs/compare.md's
}


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


# 3. Model: the DDPM U-Net (Ho et al., Appendix B; the same layers as their TensorFlow code) ========
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
    every residual block then begins as its skip path and the network begins by predicting ε = 0."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(ch: int) -> nn.GroupNorm:
    # The paper's 32 groups; narrow layers keep >= 4 channels a group. One channel a group would be
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

    def __init__(self, image_channels=3, image_size=32, ch=128, mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn=(16,), dropout=0.1, num_classes=0):
        super().__init__()
        self.ch, self.num_classes = ch, num_classes
        # t -> sinusoidal embedding (ch) -> MLP -> (4·ch), fed to every residual block
        self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        # class-conditional: one learned vector per label, added to the time embedding; row num_classes
        # is the null label ∅ ("no class"), which guidance needs (none of this exists without classes)
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
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(now, now, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(group_norm(now), nn.SiLU(), zero(nn.Conv2d(now, image_channels, 3, padding=1)))

    def forward(self, x, t, y=None):  # x: (B, C, H, W), t: (B,) integer steps 0..T-1, y: (B,) labels or None (∅)
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4·ch)
        if self.label_emb is not None:
            temb = temb + self.label_emb(torch.full_like(t, self.num_classes) if y is None else y)  # (B, 4·ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]  # every output of the down path is kept for the up path
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, Block) else layer(h)  # a Block or a downsampler
            skips.append(h)
        for layer in self.mid:
            h = layer(h, temb)  # (B, ch·mult[-1], H/2^(L−1), W/2^(L−1))
        for layer in self.up:  # a Block takes the matching skip, concatenated on channels; or an upsampler
            h = layer(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(layer, Block) else layer(h)
        return self.out(h)  # (B, C, H, W): the predicted noise ε


def build_model(cfg, image_channels: int) -> UNet:
    """The U-Net that cfg describes (0 or "": the size from UNET_SIZES); a flag that does not fit is one line."""
    ch, mult = UNET_SIZES.get(cfg.image_size, UNET_SIZES[32])
    ch, mult, attn = cfg.channels or ch, cfg.channel_mult or mult, cfg.attn_res or str(cfg.image_size // 2)
    numbers = r"[1-9]\d*(,[1-9]\d*)*"  # such as 1,2,2
    if ch < 4 or ch % 2 or not re.fullmatch(numbers, mult) or not re.fullmatch(numbers + "|none", attn) \
            or cfg.image_size % 2 ** mult.count(","):
        sys.exit(f"{PROG}: need --channels even and >= 4 (the time embedding is sines and cosines), --channel-mult "
                 f"numbers that halve {cfg.image_size} px, --attn-res numbers or none; got {ch}, {mult}, {attn}")
    mult, attn = [int(m) for m in mult.split(",")], [int(a) for a in attn.split(",") if a != "none"]
    return UNet(image_channels, cfg.image_size, ch, mult, cfg.num_res_blocks, attn, cfg.dropout,
                cfg.num_classes if cfg.class_cond else 0)
# <<< shared: unet


# 4. Objective: noise schedules, the forward process q(x_t | x_0), Algorithm 1's loss ===============
# >>> shared: diffusion
def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """β_1..β_T as a float64 tensor of shape [T] (index i holds β_{i+1}: steps are 0-based in code)."""
    if schedule == "linear":
        # Ho et al.: β rises linearly from 1e-4 to 0.02 over T = 1000 steps; for other T both ends
        # scale by 1000/T, so that ᾱ_T, the signal left at the end, stays 2-4e-5 for 100 <= T <= 1000
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


# 5. Sampler: DDIM's generalised reverse process (Song et al., Eq. 12), inversion, interpolation ===
# Equation numbers here are Song et al.'s (above, Ho et al.'s). Song et al. write α_t for Ho et al.'s ᾱ_t,
# the signal left after t steps; we keep ᾱ_t. L_simple trains ε_θ on q(x_t | x_0) alone, so any reverse
# process with those marginals can use it: DDIM's family q_σ has them for every σ (Eqs. 6-7, Lemma 1)
# and every sub-sequence τ of the steps (Sec. 4.2); Eq. 12 samples its reverse, S network calls, not T.
# Steps are 0-based in code: alpha_bar[t] holds ᾱ_{t+1}, and t = −1 stands for ᾱ_0 = 1 (clean data).
def timestep_sequence(T: int, S: int, skip: str = "uniform") -> list:
    """τ: the S steps (0-based, increasing, in 0..T−1) at which the sampler calls ε_θ. Sampling starts at
    the last, τ_{S−1}, from pure noise; the three choices differ in where that is:
    uniform:   τ_i = ⌊i·T/S⌋: 0, T/S, …, T − T/S (the DDIM code's range(0, T, T // S) when S divides T).
    trailing:  τ_i = round((i+1)·T/S) − 1: …, T − 1 (Lin et al. 2023, arXiv:2305.08891, Table 2; halves
               round up). It starts at the last step, where training saw (almost) pure noise, as sampling does.
    quadratic: τ_i = ⌊(i·√(0.8·T)/(S−1))²⌋, the DDIM code's for CIFAR-10: dense near the data. Repeats
               near 0 (S ≳ √T) are raised to τ_{i−1} + 1. For S = T all three give every step."""
    if not 1 <= S <= T:
        raise ValueError(f"need 1 <= S <= T, got S = {S}, T = {T}")
    if skip == "uniform":
        return [i * T // S for i in range(S)]
    if skip == "trailing":
        return [(2 * (i + 1) * T + S) // (2 * S) - 1 for i in range(S)]  # ⌊(i+1)·T/S + ½⌋ − 1, in integers
    if skip == "quadratic":
        tau = [int(v) for v in np.linspace(0, math.sqrt(0.8 * T), S) ** 2]
        for i in range(1, S):
            tau[i] = max(tau[i], tau[i - 1] + 1)  # stays <= T − 1 (a test checks every S <= T)
        return tau
    raise ValueError(f"unknown skip {skip!r}: use uniform, trailing or quadratic")


@torch.no_grad()
def sample(eps_model, shape, betas, steps=50, eta=0.0, skip="uniform", generator=None, x_T=None,
           clip_x0=False, device="cpu", on_step=None) -> torch.Tensor:
    """Generate images with DDIM's reverse process in S = `steps` network calls, x_{τ_S} → … → x_0, each
    step by Eq. 12. eps_model(x_t, t) -> ε for t a LongTensor [B] of 0-based steps, as in ddpm.py; eta:
    0 deterministic, 1 DDPM-like; skip: how τ is chosen; clip_x0: off by default, as in the DDIM code (the
    script's --clip-x0 is on); on_step(t, x_t, x0_pred), if given, is called at every step."""
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
    """x_0 → x_T: the deterministic (η = 0, unclipped) process run upwards, along the τ that sample() comes
    down. With σ = 0, Eq. 12 is an Euler step of an ODE (Sec. 4.3, Eq. 13), which can be integrated both
    ways: sample(…, eta=0, clip_x0=False, x_T=invert(…)) gives x_0 back, up to the discretisation error."""
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


def round_trip(eps_model, x0, betas, steps=50, skip="uniform", device="cpu"):
    """x_0 → x_T → x_0 along one ODE: invert(), then sample() with η = 0, unclipped, and the same ε-model
    (clipping x̂_0 on the way down would leave the ODE the latent came up). Each step up used ε_θ from one
    level below the one the step down uses; a step multiplies that mismatch by √(ᾱ_prev/ᾱ_t), about 30 into
    t = T−1 where β is capped at 0.999: the uniform τ, which stops below T−1, inverts far more tightly."""
    x_T = invert(eps_model, x0, betas, steps, skip, device)
    return x_T, sample(eps_model, x0.shape, betas, steps, 0.0, skip, x_T=x_T, clip_x0=False, device=device)


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two latents, as in Sec. 5.3 (Shoemake 1985):
    x = sin((1−α)θ)/sin θ · x0 + sin(αθ)/sin θ · x1,  θ = arccos(⟨x0, x1⟩ / (‖x0‖ ‖x1‖)).
    Noise from N(0, I) in d dimensions lies near the sphere of radius √d, and two draws are nearly
    orthogonal: the straight line between them dips to ‖x‖ ≈ √(d/2) at its middle, a latent the model
    never saw, while the arc stays on the sphere."""
    theta = torch.arccos((x0 * x1).sum() / (x0.norm() * x1.norm())).item()
    return (math.sin((1 - alpha) * theta) * x0 + math.sin(alpha * theta) * x1) / math.sin(theta)


def sample_with(cfg: Config, eps_model, shape, generator, device, on_step=None) -> torch.Tensor:
    """This script's sampler with cfg's settings: cfg.sample_steps network calls per image."""
    if cfg.sample_steps > cfg.timesteps:
        sys.exit(f"{PROG}: --sample-steps {cfg.sample_steps} is more than the model's T = {cfg.timesteps}")
    return sample(eps_model, shape, make_betas(cfg.schedule, cfg.timesteps), cfg.sample_steps, cfg.eta, cfg.skip,
                  generator, None, cfg.clip_x0, device, on_step)


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


def sample_labels(cfg: Config, n: int, per_class: int = 1):
    """The class of each of n images of a class-conditional model (None for an unconditional one):
    --label, or every class in turn, per_class images each (0, 0, 1, 1, … for per_class = 2)."""
    if not cfg.class_cond:
        return None
    return torch.full((n,), cfg.label) if cfg.label >= 0 else torch.arange(n) // per_class % cfg.num_classes


def generate(model, cfg: Config, n: int, shape, device, generator, labels=None, what="sampling") -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1] from sample_with(), in batches of --batch-size, with a progress line
    every 10 s. A class-conditional model draws the classes `labels` (one per image), guided by --guidance."""
    n, images, start, shown = n if labels is None else len(labels), [], time.time(), time.time()
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        for i in range(0, n, cfg.batch_size):
            y = None if labels is None else labels[i:i + cfg.batch_size].to(device)  # this batch's classes
            eps_model = model if y is None else guided(model, y, cfg.guidance)
            images.append(sample_with(cfg, eps_model, (min(cfg.batch_size, n - i), *shape), generator, device).float())
            done, now = i + len(images[-1]), time.time()
            if now - shown > 10 or done == n and now - start > 10:  # a line for a wait of over 10 seconds
                print(f"{what}: {done}/{n} images | {done / (now - start):.2f} img/s | "
                      + (f"ETA {(n - done) / done * (now - start) / 60:.1f} min" if done < n else "done"), flush=True)
                shown = now
    return torch.cat(images)


def save_grid(ema, cfg: Config, shape, device, path: str) -> float:
    """A sample grid: 64 images (a row of 8 per class, for a class-conditional model) from the same noise every
    time, so that the grids of a run show its progress. Returns the seconds it took (they are not training)."""
    start = time.time()
    images = generate(ema, cfg, 64, shape, device, torch.Generator(device).manual_seed(cfg.seed),
                      sample_labels(cfg, 8 * cfg.num_classes, 8), f"grid {os.path.basename(path)}")
    save_image(images * 0.5 + 0.5, path)  # [-1, 1] -> [0, 1]
    return time.time() - start
# <<< shared: generate


# 6. Train: Algorithm 1, then the plumbing it calls (processes, checkpoints, the log) ===============
# >>> shared: train
def train(cfg: Config) -> None:
    """Algorithm 1: repeat { x_0 ~ q(x_0), t ~ Uniform({1..T}), ε ~ N(0, I); take a gradient step on
    ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² }, keeping an average of the weights (EMA) for sampling."""
    # --- plumbing: processes (torchrun starts one per GPU), the run folder, --resume ---
    rank, world, device = start_processes(cfg)  # plain python: rank 0 of 1
    cfg, out, state = open_run(cfg, ("model", "ema", "optimizer", "rng_batches"))  # state: on --resume
    data, labels = get_data(cfg)  # (N, C, H, W) in [-1, 1], and (N,) labels or None
    cfg.num_classes, cfg.image_size = check_labels(labels, cfg) if cfg.class_cond else 0, data.shape[-1]
    data, labels = data.to(device), labels.to(device) if cfg.class_cond else None  # resident on the device

    # --- core: the network, its EMA copy, the optimiser, the noise schedule ---
    torch.manual_seed(cfg.seed)  # the initial weights, then (process 0's) dropout masks
    model = build_model(cfg, data.shape[1]).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # sampling uses these averaged weights
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel for all weights
    alpha_bar = torch.cumprod(1 - make_betas(cfg.schedule, cfg.timesteps), 0).float().to(device)  # ᾱ_t
    batches = torch.Generator(device).manual_seed(cfg.seed)  # draws x_0, t and ε: the same in every process
    # --resume: the weights, the optimiser, the step and every random number generator, as they were
    step = restore(state, model=model, ema=ema, optimizer=optimizer, rng_batches=batches) if state else 0
    start_files(out, cfg, step) if rank == 0 else None  # OUT/config.json, OUT/samples/ (only process 0 writes)
    torch.manual_seed(cfg.seed + rank + step) if rank else None  # torchrun: the other processes' dropout masks
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # DDP averages the gradients
    net, bf16 = torch.compile(net) if cfg.compile else net, use_bf16(cfg, device)  # (all share model's weights)
    say(rank, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(data)} images | "
              f"{device} {'bf16' if bf16 else 'fp32'} | batch {cfg.batch_size} in {world} process(es) | {out}")
    stop = catch_stop_signals()  # Ctrl-C and SIGTERM ask the loop to save and stop
    run = dict(out=out, start=time.time(), last=time.time(), step=step, saved=state and step, resumed=state and step)
    losses, stopping = [], False  # this log interval's losses, on the device: the loop never waits for the GPU

    while step < cfg.steps and not stopping:
        # --- core: one step of Algorithm 1 (the model is in training mode throughout; sampling uses the EMA copy) ---
        x0, t, eps, y = draw_batch(data, labels, cfg, batches, slice(rank, None, world))  # lines 2-4, our rows
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(net, x0, t, eps, alpha_bar, y)  # line 5: ‖ε − ε_θ(x_t, t)‖²
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step)  # warm-up (and --lr-decay)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun, DDP averages the gradients over the processes here
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        # EMA: θ_ema ← d·θ_ema + (1 − d)·θ, d = min(decay, (1 + step)/(10 + step)): early averages forget the init
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one fused call
        step += 1

        # --- plumbing: the log, sample grids from fixed noise, checkpoints, a clean stop on Ctrl-C ---
        losses.append(loss.detach())
        stopping = world == 1 and "by" in stop  # (under torchrun, the processes agree at log steps)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean, stopping = agree(world, torch.stack(losses).mean(), stop)  # the mean over processes
            log_line(run, step, cfg, loss=mean, lr=optimizer.param_groups[0]["lr"]) if rank == 0 else None
            losses.clear()
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            run["last"] += save_grid(ema, cfg, data.shape[1:], device, f"{out}/samples/step_{step:07d}.png")
        if rank == 0 and (stopping or step % cfg.ckpt_every == 0 or step == cfg.steps):
            save_checkpoint(run, step, dict(model=model.state_dict(), ema=ema.state_dict(), step=step,
                                            optimizer=optimizer.state_dict(), rng_batches=batches.get_state(),
                                            config=dataclasses.asdict(cfg), script=PROG), device)
    stop_processes(world)  # torchrun: every process waits until process 0 has written the last files
    finish(stop, step, out) if rank == 0 else None
# <<< shared: train


def check_labels(labels, num_classes: int) -> int:
    """--class-cond: the number of classes (--num-classes, or the largest label + 1); no labels: one line."""
    if labels is None:
        sys.exit(f"{PROG}: --class-cond needs labels: a .npy takes --labels FILE.npy, a folder a subfolder per class")
    if num_classes and labels.max() >= num_classes:
        sys.exit(f"{PROG}: --num-classes {num_classes} is too few for labels up to {int(labels.max())}")
    return num_classes or int(labels.max()) + 1


# >>> shared: torchrun
def start_processes(cfg: Config):
    """(rank, world, device). torchrun starts one process per GPU and sets RANK (which one), WORLD_SIZE (how
    many) and LOCAL_RANK (which GPU of this machine); under plain python there is one process, rank 0 of 1."""
    rank, world, device = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), pick_device(cfg.device)
    if cfg.batch_size % world:  # --batch-size is the global batch: a run is the same on 1 or 8 GPUs
        sys.exit(f"{PROG}: --batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def say(rank: int, text: str) -> None:
    print(text, flush=True) if rank == 0 else None  # under torchrun, only the first process speaks


def stop_processes(world: int) -> None:
    if world > 1:  # every process waits for the others, so that none ends while another still needs it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def agree(world: int, loss: torch.Tensor, stop: dict):
    """The loss averaged over the processes, and whether any was asked to stop: torchrun's processes each
    catch Ctrl-C on their own, and must stop at the same step."""
    totals = torch.stack([loss, torch.tensor(float("by" in stop), device=loss.device)])
    if world > 1:
        torch.distributed.all_reduce(totals)  # summed over the processes, in every process
    return totals[0].item() / world, totals[1].item() > 0
# <<< shared: torchrun


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


# 7. Main: train, or use a checkpoint (--sample, --visualize, --invert, --interpolate) ==============
def main(cfg: Config) -> None:
    mode = next((name for name in ("invert", "interpolate", "sample") if getattr(cfg, name)), None)
    if mode and not cfg.ckpt:
        sys.exit(f"{PROG}: --{mode} needs --ckpt RUN/ckpt.pt (a checkpoint of ddpm.py or ddim.py)")
    if cfg.sample_steps > cfg.timesteps and not (mode or cfg.visualize):  # training draws its grids with DDIM
        sys.exit(f"{PROG}: --sample-steps {cfg.sample_steps} is more than --timesteps {cfg.timesteps}")
    {"invert": invert_mode, "interpolate": interpolate_mode, "sample": sample_mode}.get(
        mode, visualize if cfg.visualize else train)(cfg)


def invert_mode(cfg: Config) -> None:
    """--invert: 8 training images → their latents x_T → images again, along one ODE: η = 0, unclipped, the
    same ε-model both ways. A class-conditional model inverts unguided, ε_θ(x, t, y) (guidance bends the ODE:
    on our 15-minute MNIST model w = 0.5 raised the round trip's error by half, as Mokady et al. 2023 saw)."""
    device = pick_device(cfg.device)
    model, cfg, shape, out = load_for_sampling(cfg)
    data, labels = get_data(cfg)
    x0, betas = data[:8].to(device), make_betas(cfg.schedule, cfg.timesteps)  # (8, C, H, W): the first images
    eps_model = model.to(device) if not cfg.class_cond else guided(model.to(device), labels[:8].to(device), 0.0)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        x_T, x_back = round_trip(eps_model, x0, betas, cfg.sample_steps, cfg.skip, device)  # (8, C, H, W) each
    x_back = x_back.float()
    os.makedirs(out, exist_ok=True)
    save_image(torch.cat([x0, x_T.clamp(-1, 1), x_back]) * 0.5 + 0.5, os.path.join(out, "invert.png"), nrow=8)
    print(f"wrote {out}/invert.png: images, latents x_T (clipped for display), decoded back; S = {cfg.sample_steps}, "
          f"{cfg.skip} τ | error: mean squared {F.mse_loss(x_back, x0):.5f}, largest {(x_back - x0).abs().max():.4f} "
          f"(between two different images: {F.mse_loss(x0, x0.roll(1, 0)):.4f}) | latents: std {x_T.std():.3f}")


def interpolate_mode(cfg: Config) -> None:
    """--interpolate: 4 rows, each decoding 10 latents along the slerp arc between two x_T, with η = 0."""
    device = pick_device(cfg.device)
    model, cfg, shape, out = load_for_sampling(cfg)
    ends = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(cfg.seed))  # 4 pairs of x_T
    x_T = torch.stack([slerp(ends[0, row], ends[1, row], a) for row in range(4) for a in torch.linspace(0, 1, 10)])
    labels = sample_labels(cfg, 4)  # a class-conditional model: each row one class (--label, or 0, 1, 2, 3)
    eps_model = model.to(device) if labels is None else guided(
        model.to(device), labels.repeat_interleave(10).to(device), cfg.guidance)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        images = sample(eps_model, x_T.shape, make_betas(cfg.schedule, cfg.timesteps), cfg.sample_steps, 0.0,
                        cfg.skip, x_T=x_T, clip_x0=cfg.clip_x0, device=device)
    os.makedirs(out, exist_ok=True)
    save_image(images.float() * 0.5 + 0.5, os.path.join(out, "interpolate.png"), nrow=10)
    print(f"wrote {out}/interpolate.png: each row decodes slerp(x_T, x_T', α), α = 0 … 1, with η = 0")


# >>> shared: sample_mode
def load_for_sampling(cfg: Config):
    """The EMA network of --ckpt, cfg with the checkpoint's values for what it fixes, the image shape
    (C, H, W), and where to write: --out, else the checkpoint's folder (another's, or an unnamed one's: a subfolder)."""
    state = load_checkpoint(cfg.ckpt, needs=("ema", "config"))
    cfg = dataclasses.replace(cfg, **{k: state["config"].get(k, getattr(Config, k)) for k in ARCH_FIELDS})
    if not -1 <= cfg.label < (cfg.num_classes if cfg.class_cond else 0):
        sys.exit(f"{PROG}: --label {cfg.label}: " + (f"{cfg.ckpt} knows classes 0..{cfg.num_classes - 1}"
                 if cfg.class_cond else f"{cfg.ckpt} is not class-conditional (train with --class-cond)"))
    model = build_model(cfg, state["ema"]["conv_in.weight"].shape[1])
    model.load_state_dict(state["ema"])
    folder = os.path.dirname(os.path.abspath(cfg.ckpt))
    out = cfg.out or (folder if state.get("script") == PROG else os.path.join(folder, f"{PROG}-samples"))
    return model.eval(), cfg, (model.conv_in.in_channels, cfg.image_size, cfg.image_size), out


def sample_mode(cfg: Config) -> None:
    """--sample: --num-samples PNGs in OUT/generated/ (one file each, as FID tools read them), a grid, the
    speed, and --fid."""
    device = pick_device(cfg.device)
    model, cfg, shape, out = load_for_sampling(cfg)
    n, start = max(cfg.num_samples, cfg.fid), time.time()
    labels = sample_labels(cfg, n)  # None, or the class of each image: 0, 1, …, K−1, 0, 1, …
    images = generate(model.to(device), cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed),
                      labels).cpu()
    seconds = time.time() - start  # .cpu() waited for the device to finish: the clock is honest
    os.makedirs(os.path.join(out, "generated"), exist_ok=True)
    for i, image in enumerate(images * 0.5 + 0.5):  # 000000.png, … (000000_class3.png with labels)
        save_image(image, os.path.join(out, "generated", f"{i:06d}" + (f"_class{labels[i]}" if cfg.class_cond
                                                                        else "") + ".png"))
    per = min(8, n // cfg.num_classes) if cfg.class_cond and cfg.label < 0 else 0  # the grid: a row per class
    grid = torch.cat([images[labels == k][:per] for k in range(cfg.num_classes)]) if per else images[:64]
    save_image(grid, os.path.join(out, "generated_grid.png"), nrow=per or 8, normalize=True, value_range=(-1, 1))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}) -> {out}/generated/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid])


def visualize(cfg: Config) -> None:
    """forward.png: a training image at 10 noise levels. With --ckpt, reverse.png: x_t (top row) and the
    predicted x̂_0 (bottom row) along the sampler's chain, and reverse.gif: the whole chain as a film."""
    device = pick_device(cfg.device)
    model, cfg, shape, out = load_for_sampling(cfg) if cfg.ckpt else (None, cfg, None, f"runs/{PROG}-visualize")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x0 = get_data(cfg)[0][:1]  # (1, C, H, W): the first training image
    t = torch.linspace(0, cfg.timesteps - 1, 10).round().long()  # 10 points along the chain
    alpha_bar = torch.cumprod(1 - make_betas(cfg.schedule, cfg.timesteps), 0)
    save_image(q_sample(x0.expand(10, -1, -1, -1), t, torch.randn(10, *x0.shape[1:]), alpha_bar) * 0.5 + 0.5,
               os.path.join(out, "forward.png"), nrow=10)
    print(f"wrote {out}/forward.png: x_t at the 0-based steps t = {t.tolist()} (t = 0 is the paper's x_1)")
    if model is None:
        return
    chain = []  # (x_t, predicted x_0) at every network call of the sampler, from noise to image
    labels = sample_labels(cfg, 1)  # a class-conditional model draws --label (or class 0)
    eps_model = model.to(device) if labels is None else guided(model.to(device), labels.to(device), cfg.guidance)
    sample_with(cfg, eps_model, (1, *shape), torch.Generator(device).manual_seed(cfg.seed), device,
                on_step=lambda t, x, x0_pred: chain.append(torch.cat([x, x0_pred]).float().cpu() * 0.5 + 0.5))
    strip = [chain[i] for i in torch.linspace(0, len(chain) - 1, 10).round().long().unique()]
    save_image(torch.stack(strip, 1).flatten(0, 1), os.path.join(out, "reverse.png"), nrow=len(strip))
    film = chain[::max(1, len(chain) // 50)] + chain[-1:] * 12  # about 50 frames, then the end held for a second
    frames = [torchvision.transforms.functional.to_pil_image(torchvision.utils.make_grid(x.clamp(0, 1)))
              for x in film]  # each frame: x_t beside the predicted x_0
    frames = [frame.resize((4 * frame.width, 4 * frame.height), resample=0) for frame in frames]  # 4x, nearest
    frames[0].save(os.path.join(out, "reverse.gif"), save_all=True, append_images=frames[1:], duration=80, loop=0)
    print(f"wrote {out}/reverse.png and reverse.gif: x_t (top, left) and the predicted x_0 along the chain")
# <<< shared: sample_mode


if __name__ == "__main__":
    run_main(main)
