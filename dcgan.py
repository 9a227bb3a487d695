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
  python dcgan.py                           # CIFAR-10 at 32x32, ~100 epochs (40k steps of 128): a GPU job
  python dcgan.py --sample --ckpt runs/dcgan-cifar10/best.pt --num-samples 50000 \
      --fid 50000 --fid-weights pt_inception-2015-12-05-6726825d.pth   # Inception FID on the papers' ruler
  python dcgan.py --dataset mnist --g-channels 64 --d-channels 64 --steps 6000 --check-every 250 --device cpu ...
        # a CPU recipe: docs/dcgan.md has the exact command, its time on 2 cores and its MNIST score

Sections
  1. Config     2. Data     3. Model (G and D)     4. Objective (the minimax game, BCE on logits)
  5. Sampler and the quality check     6. Train (the game)     7. Main
  then, behind a fence, the plumbing a first reading skips: --sample, the flags, dataset files,
  the run (processes, resume, checkpoints, log), files and progress lines

Where we depart from the paper (and why)
  - Native 32x32 (the paper's nets are 64x64): the 4x4x1024 layer is dropped, so G goes
    4 -> 8 -> 16 -> 32 with 512, 256, 128 channels (--g-channels 128), and D mirrors it.
    MNIST runs at 28x28 (7 -> 14 -> 28), sprites at 16x16 (4 -> 8 -> 16); no image is resized.
  - z ~ N(0, I), as in pytorch/examples; the paper's code drew z ~ U(−1, 1).
  - The paper picks no model; we keep the one with the best quality check (see Sampler).
  - BatchNorm when generating, chosen by an A/B (docs/dcgan.md: MNIST CPU recipe, all 24 checks scored
    both ways on the shipped MNIST scorer, n = 2000). Samples (and so best.pt's images) use eval mode,
    the running statistics gathered in training: the two modes' samples scored the same within noise
    (batch − eval: +0.4 ± 1.3 MNIST-FID over steps 2000–6000), and in eval mode an image depends on its
    own z only, not on the batch size or the rest of the batch. The quality check that picks best.pt
    scores samples made with each batch's own statistics (as the paper's code and pytorch/examples
    sample): in that mode the proxy ranked the checkpoints like the shipped scorer (rank correlation
    0.89, against 0.58 in eval mode, whose proxy values jumped at some steps where the FID did not).
  - Batches are drawn uniformly with replacement instead of in shuffled epochs (as in ddpm.py).
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

PROG = os.path.splitext(os.path.basename(__file__))[0]  # "dcgan": names runs and error messages
READS = ("dcgan",)  # the scripts whose checkpoints this one can load


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
    check: str = "proxy"  # how samples are scored during training: proxy (a Fréchet distance in a fixed random conv net's features: no download) | fid (fid.py's Inception FID)
    check_every: int = 2000  # steps between quality checks; the best generator so far is kept as best.pt
    check_n: int = 2000  # generated images per check (and real ones for the proxy's reference)
    # --- run ---
    out: str = ""  # run directory ("": runs/dcgan-<dataset>; --sample: the checkpoint's folder, or its dcgan-samples/ for another script's)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cuda | cpu | mps
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | fp32 | bf16 (fast only on GPUs and CPUs with AVX512-BF16/AMX)
    compile: bool = False  # torch.compile both networks for training (the saved weights are not compiled)
    seed: int = 0  # random seed
    log_every: int = 100  # steps between progress lines and rows of metrics.csv
    sample_every: int = 2000  # steps between sample grids (drawn from the same fixed z)
    ckpt_every: int = 2000  # steps between checkpoints (one is also written at the end, and on Ctrl-C)
    resume: bool = False  # continue from the run's ckpt.pt (or --ckpt) at its saved step
    ckpt: str = ""  # checkpoint to resume from or sample from (RUN/best.pt: the best generator)
    # --- generation ---
    sample: bool = False  # only generate: --num-samples PNGs from --ckpt's generator
    num_samples: int = 64  # images written in --sample mode
    fid: int = 0  # if > 0: generate this many images and print their FID against the training set (fid.py)
    fid_weights: str = ""  # Inception weights for --fid ("": torchvision's; or a file, e.g. pytorch-fid's for paper numbers)


CHOICES = {"check": ("proxy", "fid"), "device": ("auto", "cuda", "cpu", "mps"),
           "precision": ("auto", "fp32", "bf16")}
RANGES = {"image_size": ">=0", "latent": ">=1", "g_channels": ">=1", "d_channels": ">=1", "steps": ">=1",
          "batch_size": ">=1", "lr": ">0", "beta1": "[0,1)", "beta2": "[0,1)", "check_every": ">=1",
          "check_n": ">=1", "log_every": ">=1", "sample_every": ">=1", "ckpt_every": ">=1", "num_samples": ">=1",
          "fid": ">=0"}
ARCH_FIELDS = ("dataset", "image_size", "latent", "g_channels", "d_channels")  # fixed by a checkpoint: taken from it
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
    # real and fake in separate batches: BatchNorm normalises each on its own (as in the paper's code)
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
def generate(model, cfg: Config, n: int, shape, device, generator, label: str = "sampling",
             batch_statistics: bool = False) -> torch.Tensor:
    """n images G(z), z ~ N(0, I) from `generator`, in batches of --batch-size: (n, C, H, W) in [-1, 1], on
    the host. G runs in eval mode: BatchNorm uses its running statistics, so an image depends on its own
    z only (not on the rest of the batch), and generating changes nothing in G. batch_statistics (the
    quality check's mode, see the header): each batch normalised with its own statistics, on a copy of G,
    so that G's running statistics stay as training left them."""
    training, progress, images = model.training, Progress(label, n), []
    model = copy.deepcopy(model).train() if batch_statistics else model.eval()
    z = torch.randn(n, cfg.latent, generator=generator, device=device)  # (n, latent)
    with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg, device)):
        for i in range(0, n, cfg.batch_size):
            images.append(model(z[i:i + cfg.batch_size]).float().cpu())  # (b, C, H, W)
            progress.update(i + len(images[-1]))
    model.train(training)
    return torch.cat(images)  # (n, C, H, W)


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
    """μ and Σ of φ(images) in float64, computed on the host (MPS has no float64): (512,), (512, 512)."""
    features = torch.cat([net(images[i:i + 500].to(device).float()).cpu().double()
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


class QualityCheck:
    """Every --check-every steps: --check-n samples from the same fixed z, scored by the proxy (or by FID
    with --check fid); a new best generator is saved as best.pt; each check is a row of quality.csv."""

    def __init__(self, cfg: Config, data: torch.Tensor, run):
        self.cfg, self.run, self.shape, self.file = cfg, run, data.shape[1:], None
        self.best_path = os.path.join(run.dir, "best.pt")
        self.best_value, self.best_step = (run.state["best_value"], run.state["best_step"]) if run.state \
            else (math.inf, 0)
        if cfg.check == "proxy":  # φ, and the statistics of a fixed set of real images (their own generator)
            self.phi = feature_net(data.shape[1]).to(run.device)
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:cfg.check_n]
            self.reference = feature_stats(self.phi, data[pick.to(data.device)], run.device)

    def __call__(self, G, step: int) -> None:
        start, cfg = time.time(), self.cfg
        images = generate(G, cfg, cfg.check_n, self.shape, self.run.device, self.run.fixed_noise(1),
                          label=f"quality check at step {step}", batch_statistics=True)
        if not images.isfinite().all():  # a diverged G: stop before scoring NaN (its checkpoint was not saved)
            self.run.diverged(step, "the generator's samples are NaN or infinite")
        value = run_fid(cfg, images, self.run.dir, step) if cfg.check == "fid" else \
            frechet_distance(*feature_stats(self.phi, images, self.run.device), *self.reference)  # lower is better
        if value < self.best_value:  # a new best generator: keep it, with everything, so it can resume too
            self.best_value, self.best_step = value, step
            self.run.save(step, path=self.best_path, **self.best())
        self.run.print(f"check at step {step}: {cfg.check} {value:.3f} | best {self.best_value:.3f} at step {self.best_step}")
        self.file = self.file or open_metrics(os.path.join(self.run.dir, "quality.csv"), self.run.step0,
                                              ["step", "check", "value", "best_value", "best_step"])
        csv.writer(self.file).writerow([step, cfg.check, f"{value:.4f}", f"{self.best_value:.4f}", self.best_step])
        self.file.flush()
        self.run.last_time += time.time() - start  # the check's time does not count against the training speed

    def best(self) -> dict:  # what every checkpoint stores about the best generator so far
        return {"best_value": self.best_value, "best_step": self.best_step}


# =============================================================================================
# 6. Train: the game (Goodfellow et al. Algorithm 1, k = 1); its plumbing, class Run, is after the fence
# =============================================================================================
def train(cfg: Config) -> None:
    """Goodfellow et al.'s Algorithm 1 with one D step per G step, and Adam as in Radford et al.: repeat {
    x ~ data, z ~ N(0, I); one step of D on −[log D(x) + log(1 − D(G(z)))]; one step of G on −log D(G(z)) }."""
    with Run(cfg, needs=("generator", "discriminator", "optimizer_g", "optimizer_d", "best_value", "best_step")) as run:
        cfg, device = run.cfg, run.device
        if run.world > 1:
            sys.exit(f"{PROG}: trains in one process; start it with python, not torchrun")
        data = get_data(cfg)[0].to(device)  # (N, C, H, W) in [-1, 1], resident on the device
        cfg.image_size = data.shape[-1]
        run.start(images=len(data))

        # --- core: the two networks and their optimisers (one each: they pull opposite ways) ---
        G, D = (net.to(device) for net in build_model(cfg, data.shape[1]))
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)  # fused: one kernel for all weights
        optimizer_g, optimizer_d = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
        check = QualityCheck(cfg, data, run)  # built before the restore: a resumed run draws what an uninterrupted one does
        step = run.restore(generator=G, discriminator=D, optimizer_g=optimizer_g, optimizer_d=optimizer_d)
        train_G, train_D = run.wrap(G), run.wrap(D)  # --compile: compiled; the same weights
        run.describe(G, D, note=f"quality check: {cfg.check}")
        while step < cfg.steps:
            # --- core: one step of the game: D ascends V(D, G), then G descends it ---
            G.train(), D.train()
            real = data[torch.randint(0, len(data), (cfg.batch_size,), device=device)]  # (B, C, H, W), x ~ data
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
            step += 1

            # --- plumbing (class Run, after the fence): the log, grids from fixed z, quality checks, checkpoints, Ctrl-C ---
            # D(x) → 1 and D(G(z)) → 0 means D wins; both near 0.5 is the game's equilibrium
            run.log(step, loss_d=loss_d.detach(), loss_g=loss_g.detach(),
                    d_real=torch.sigmoid(logits_real.detach().float()).mean(),
                    d_fake=torch.sigmoid(logits_fake.detach().float()).mean())
            if run.due(step, cfg.sample_every):
                run.save_grid(step, lambda: generate(G, cfg, 64, data.shape[1:], device, run.fixed_noise(),
                                                     label=f"sample grid at step {step}"))
            if run.due(step, cfg.check_every):
                check(G, step)  # best.pt
            if run.stopping(step) or run.due(step, cfg.ckpt_every):
                run.save(step, **check.best())  # after Ctrl-C or SIGTERM, this also ends the run (how to continue: --resume)
        run.print(f"best {cfg.check} {check.best_value:.3f} at step {check.best_step}: {check.best_path}")
        if cfg.fid:  # the FID of the generator we keep: the best one
            G.load_state_dict(load_checkpoint(check.best_path, needs=("generator",))["generator"])
            run_fid(cfg, generate(G, cfg, cfg.fid, data.shape[1:], device, run.fixed_noise(2), "--fid"),
                    run.dir, check.best_step)


# =============================================================================================
# 7. Main: train, or generate from a checkpoint (sample_mode and the other commands: just after the fence)
# =============================================================================================
def main(cfg: Config) -> None:
    check_ranges(cfg)
    if cfg.check_n < 2:
        sys.exit(f"{PROG}: --check-n must be at least 2 (a covariance needs two images), got {cfg.check_n}")
    if cfg.sample and not cfg.ckpt:
        sys.exit(f"{PROG}: --sample needs --ckpt RUN/best.pt (or RUN/ckpt.pt, written by training)")
    if cfg.sample:
        sample_mode(cfg)
    else:
        train(cfg)


# =============================================================================================
# Plumbing (a first reading stops at main(), above). First what main() runs besides training: --sample
# (PNGs, a grid, the speed, FID) and the other commands that write files around the sampler; then, shared
# by every script, the flags, reading datasets from disk, the run (processes, resume, log, checkpoints,
# Ctrl-C), files, progress
# =============================================================================================
def load_for_sampling(cfg: Config):
    """The generator of a checkpoint, and cfg with the checkpoint's values for what it fixes."""
    state = load_checkpoint(cfg.ckpt, needs=("generator", "discriminator", "config", "step"))
    cfg = dataclasses.replace(cfg, **{k: state["config"][k] for k in ARCH_FIELDS})
    channels = state["discriminator"]["net.0.weight"].shape[1]  # D's first convolution reads the image
    G, _ = build_model(cfg, channels)
    G.load_state_dict(state["generator"])
    return G.eval(), cfg, (channels, cfg.image_size, cfg.image_size), state


def sample_mode(cfg: Config) -> None:
    """--sample: N PNGs and a grid from a checkpoint, with the sampling speed (and FID with --fid)."""
    device = pick_device(cfg.device)
    model, cfg, shape, state = load_for_sampling(cfg)
    run_dir = cfg.out or sample_dir(cfg, state)
    n = max(cfg.num_samples, cfg.fid)
    start = time.time()
    images = generate(model.to(device), cfg, n, shape, device, torch.Generator(device).manual_seed(cfg.seed))
    seconds = time.time() - start  # generate() ends by copying to the host: the clock is honest
    save_pngs(images, os.path.join(run_dir, "generated"))
    save_grid(images[:64], os.path.join(run_dir, "generated_grid.png"))
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} img/s, batch {cfg.batch_size}, "
          f"step {state['step']}) -> {run_dir}/generated/")
    if cfg.fid:
        run_fid(cfg, images[:cfg.fid], run_dir, state["step"])


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
