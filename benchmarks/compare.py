"""Benchmark: every model of the repository trained, sampled and scored by one command, in one table.

The seed study's comparison (FID, training stability, training time, sampling speed, loss curves,
sample grids, DDPM samples over training), made by a script anyone can rerun. Each model's own
script runs as a subprocess, exactly the command a user would type (the scripts never import each
other); this file only times them, reads what they leave behind and scores their samples.

    python benchmarks/compare.py --preset cpu-mnist      # the scripts' MNIST recipes: about 68 min, 2 cores
    python benchmarks/compare.py --preset gpu-cifar10 --fid-weights pt_inception-2015-12-05-6726825d.pth
    python benchmarks/compare.py --smoke                 # the same code path on tiny budgets: < 1 min

Presets
  cpu-mnist    The scripts' own MNIST recipes, each trained by `SCRIPT.py --recipe NAME` (compare adds only
               --out and --data-root): ddpm.py --recipe mnist-2400 with --schedule cosine and with --schedule
               linear (T = 100, sampled with --var beta_tilde), ddim.py --recipe mnist-2400 sampling the
               cosine checkpoint (the recipe's sampler: 20 steps, η = 1, trailing τ, clipped x̂₀), and
               dcgan.py (samples from best.pt), vae.py, vaegan.py with --recipe mnist (sampled in fp32 on the
               CPU). 2000 samples each, scored by MNIST-FID (benchmarks/mnist_fid.py: a LeNet's features vs
               the 10k MNIST test images; NOT comparable with papers), or by fid.py's Inception FID with
               --fid-weights.
  gpu-cifar10  The paper-faithful CIFAR-10 runs: each script's defaults (DDPM linear and cosine: the paper's
               35.7M U-Net, 800k steps), DDIM with 50 and 100 steps (η = 0, quadratic τ, the DDIM paper's
               setting) of both DDPM checkpoints, DCGAN, VAE, VAE-GAN; 50,000 samples each; fid.py against
               the 50,000 training images. Paper-comparable only with pytorch-fid's weights file.
  smoke        Tiny nets, a few steps, a synthetic 28x28 .npy, 16 samples, a seeded random LeNet as the
               feature network: the code path of the other presets, end to end, in well under a minute.

Stages and resuming
  Every model goes through up to three stages: train (its script's training command), sample (its
  --sample command) and score (FID, and the quality of every training-time sample grid). Each finished
  stage writes OUT/stages/<preset>.<model>.<stage>.json, and a rerun of the same command skips it. A
  compare run that is killed is resumed by running it again: a training run that has a ckpt.pt is
  continued with the script's own --resume, so at most the steps since its last checkpoint are redone.
  Delete a stage file (or OUT) to redo that stage.

Outputs (OUT = --out, default runs/compare-<preset>/)
  results.md       the table (model, FID, training stability, training time, sampling images/s,
                   parameters), the machine, the exact commands, and how each number was measured
  losses.png       every model's training loss, one panel each (drawn with Pillow only)
  samples.png      every model's 8x8 sample grid (the first 64 of its scored samples), labelled
  progression_<model>.png   each trained model's fixed-noise grids over training (the first row of each
                   samples/step_N.png the script saved), labelled with the step: for DDPM, the seed
                   study's figure
  runs/<model>/    the scripts' own run directories; logs/ their full output; stages/ the JSON files

Training stability: measured, not asserted. See stability() below and README.md for the definition.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # fid.py lives in the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # mnist_fid.py lives beside this file
PRESETS = ("cpu-mnist", "gpu-cifar10", "smoke")


# =============================================================================================
# 1. Presets: which commands make each model
# =============================================================================================
@dataclasses.dataclass
class Model:
    key: str  # names its run directory and its stage files
    label: str  # its row in the table
    script: str  # the script that trains and samples it
    train: list  # training flags, without --out ([]: it samples another model's checkpoint)
    sample: list  # flags for --sample, without --ckpt and --out
    source: str = ""  # key of the model whose checkpoint it samples ("": its own)
    ckpt: str = "ckpt.pt"  # the checkpoint file it samples (dcgan: best.pt, the generator it keeps)
    loss: str = "loss"  # the metrics.csv column whose stability we measure
    loss_label: str = "loss"  # what that column is, for the figure
    also: tuple = ()  # other metrics.csv columns drawn in the same panel


def preset_models(preset: str, data: str, n: int) -> list:
    """The models of a preset, in the order they run (a DDIM row after the DDPM checkpoint it samples).
    `data` is the --dataset value of the training commands, n the number of samples to score."""
    gan = dict(loss="loss_g", loss_label="generator loss −log D(G(z))", also=("loss_d",))
    vaegan = dict(loss="gan_decoder", loss_label="decoder's adversarial loss −log D(·)", also=("gan_discriminator",))
    ddpm_loss = dict(loss_label="L_simple (MSE of ε)")
    vae_loss = dict(loss_label="−ELBO (nats/image)")
    if preset == "cpu-mnist":  # the scripts' own MNIST recipes (--recipe NAME): compare adds --out and --data-root
        num = ["--num-samples", str(n)]
        return [  # DDPM: mnist-2400 with either schedule, sampled with σ² = β̃ (the recipe leaves --var at β)
            *[Model(f"ddpm-{s}", f"DDPM ({s}, T = 100)", "ddpm.py", ["--recipe", "mnist-2400", "--schedule", s],
                    ["--recipe", "mnist-2400", "--var", "beta_tilde", *num], **ddpm_loss)
              for s in ("cosine", "linear")],
            Model("ddim", "DDIM, 20 steps, η = 1, trailing τ (DDPM cosine's checkpoint)", "ddim.py", [],
                  ["--recipe", "mnist-2400", *num], source="ddpm-cosine", **ddpm_loss),  # the recipe's sampler
            # the others sample in fp32 on the CPU, as they were scored (their recipes' bf16 is for training)
            Model("dcgan", "DCGAN (best.pt)", "dcgan.py", ["--recipe", "mnist"], [*num, "--device", "cpu"],
                  ckpt="best.pt", **gan),
            Model("vae", "VAE (Bernoulli decoder)", "vae.py", ["--recipe", "mnist"], [*num, "--device", "cpu"],
                  **vae_loss),
            Model("vaegan", "VAE-GAN", "vaegan.py", ["--recipe", "mnist"], [*num, "--device", "cpu"], **vaegan),
        ]
    if preset == "gpu-cifar10":  # each script's defaults are the paper's CIFAR-10 setting
        big = ["--num-samples", str(n), "--batch-size", "500"]  # the sampling batch only sets the speed
        models = [Model(f"ddpm-{s}", f"DDPM ({s}, T = 1000)", "ddpm.py", ["--dataset", data, "--schedule", s], big,
                        **ddpm_loss) for s in ("linear", "cosine")]
        for s in ("linear", "cosine"):
            models += [Model(f"ddim{k}-{s}", f"DDIM, {k} steps, η = 0 (DDPM {s})", "ddim.py", [],
                             ["--sample-steps", str(k), "--eta", "0", "--skip", "quadratic", "--no-clip-x0", *big],
                             source=f"ddpm-{s}", **ddpm_loss) for k in (50, 100)]
        return models + [
            Model("dcgan", "DCGAN (best.pt)", "dcgan.py", ["--dataset", data], big, ckpt="best.pt", **gan),
            Model("vae", "VAE (Bernoulli decoder)", "vae.py", ["--dataset", data], big, **vae_loss),
            Model("vaegan", "VAE-GAN", "vaegan.py", ["--dataset", data], big, **vaegan)]
    # smoke: the same kinds of commands on budgets that finish in seconds
    tiny = ["--device", "cpu", "--batch-size", "8", "--steps", "8", "--log-every", "1", "--sample-every", "4",
            "--ckpt-every", "4"]
    few = ["--num-samples", str(n), "--batch-size", "16", "--device", "cpu"]
    return [
        Model("ddpm", "DDPM (linear, T = 10)", "ddpm.py",
              ["--dataset", data, "--timesteps", "10", "--channels", "8", "--channel-mult", "1,2", "--num-res-blocks",
               "1", "--attn-res", "none", "--dropout", "0", "--warmup", "1", *tiny], few, **ddpm_loss),
        Model("ddim", "DDIM, 5 steps, η = 1 (the DDPM's checkpoint)", "ddim.py", [],
              ["--sample-steps", "5", "--eta", "1", *few], source="ddpm", **ddpm_loss),
        Model("dcgan", "DCGAN (best.pt)", "dcgan.py",
              ["--dataset", data, "--g-channels", "8", "--d-channels", "8", "--check-every", "4", "--check-n", "16",
               *tiny], few, ckpt="best.pt", **gan),
        Model("vae", "VAE (Bernoulli decoder)", "vae.py",
              ["--dataset", data, "--channels", "8", "--latent", "8", *tiny], few, **vae_loss),
        Model("vaegan", "VAE-GAN", "vaegan.py",
              ["--dataset", data, "--channels", "8", "--d-channels", "8", "--latent", "8", *tiny], few, **vaegan),
    ]


def smoke_data(path: str) -> None:
    """256 synthetic 28x28 grey images (a bright bar on black, at random places and angles), as uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    images = []
    for _ in range(256):
        cy, cx, angle, length = *rng.uniform(8, 20, 2), rng.uniform(0, np.pi), rng.uniform(6, 12)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        images.append(((np.abs(along) < length) & (np.abs(across) < 1.5)) * 255)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.stack(images).astype(np.uint8))  # (256, 28, 28)


# =============================================================================================
# 2. Training stability: the definition (README.md says the same in words)
# =============================================================================================
CV_STABLE, CV_UNSTABLE = 0.05, 0.25  # loss CV over the last quarter: ≤ 5% stable, > 25% unstable
RISE_STABLE, RISE_UNSTABLE = 0.10, 0.50  # worst quality relapse: ≤ 10% stable, > 50% unstable


def worst_rise(values) -> float:
    """The largest relapse of a lower-is-better quality series: max over k of q_k / min(q_0..q_{k-1}) − 1,
    floored at 0. 0.3 means that at some checkpoint the quality was 30% worse than the best before it."""
    best, worst = float(values[0]), 0.0
    for v in values[1:]:
        worst = max(worst, float(v) / max(best, 1e-12) - 1)
        best = min(best, float(v))
    return worst


def stability(steps, losses, quality=None) -> dict:
    """Training stability of one run, from its logged loss and (optionally) its quality over training.

    (a) cv: the coefficient of variation std/|mean| (population std, ddof = 0) of the loss rows logged
        at steps > 0.75 · (last step), i.e. over the last quarter of training. Each row of a script's
        metrics.csv is already the mean of the loss over its --log-every steps; no further smoothing.
        A flat loss gives 0; white noise of relative size s gives s; a loss that still falls or that
        climbs away adds its trend. For the GANs the loss is the generator's −log D(G(z)) (the
        discriminator's loss is drawn in losses.png, not measured).
    (b) rise: worst_rise() of the quality measured during training (lower is better), one value per
        checkpoint in training order: how far the samples ever fell back behind the best so far.
    verdict: "unstable" if a loss is not finite, cv > 0.25 or rise > 50%; else "moderate" if
    cv > 0.05 or rise > 10%; else "stable". Thresholds are ours, chosen so that the run-to-run
    wobble of a healthy GAN reads as "moderate", not as failure; the two numbers are in the table."""
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    rise = worst_rise(quality) if quality is not None and len(quality) > 1 else float("nan")
    if len(losses) == 0 or not np.isfinite(losses).all():
        return {"cv": float("nan"), "rise": rise, "verdict": "unstable", "why": "the loss is not finite"}
    window = losses[steps > 0.75 * steps[-1]]
    window = window if len(window) >= 2 else losses[-2:]
    cv = float(window.std() / abs(window.mean())) if window.mean() != 0 else float("inf")
    reasons = [f"loss CV {cv:.3f}"] + ([] if math.isnan(rise) else [f"quality rise {100 * rise:.0f}%"])
    if cv > CV_UNSTABLE or rise > RISE_UNSTABLE:
        verdict = "unstable"
    elif cv > CV_STABLE or rise > RISE_STABLE:
        verdict = "moderate"
    else:
        verdict = "stable"
    return {"cv": cv, "rise": rise, "verdict": verdict, "why": ", ".join(reasons)}


# =============================================================================================
# 3. Quality: one Fréchet distance ("ruler") per preset
# =============================================================================================
class Ruler:
    """A Fréchet distance in one feature space: FID with Inception, MNIST-FID with a LeNet, or (smoke)
    a seeded random LeNet. `features(images)` takes uint8 (N, C, H, W) and returns (μ, Σ)."""

    def __init__(self, name: str, note: str, features, reference):
        self.name, self.note, self.features, self._reference, self._ref_stats = name, note, features, reference, None

    def __call__(self, images: torch.Tensor) -> float:
        import fid
        if self._ref_stats is None:  # computed (or read from a cache) once, when first needed
            self._ref_stats = self._reference()
        return fid.frechet_distance(*self.features(images), *self._ref_stats)


def lenet_stats(net, images: torch.Tensor):
    """uint8 images, any size and channel count → grey 28x28 in [0, 1] → (μ, Σ) of the LeNet features."""
    import mnist_fid
    x = images.float().div(255).mean(1, keepdim=True)  # (N, 1, H, W) in [0, 1]
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True)
    return mnist_fid.stats(net, x)


def make_ruler(args, preset: str, data: str) -> Ruler:
    import fid
    import mnist_fid
    if args.fid_weights:  # Inception FID (fid.py) against the training set, or --fid-reference
        weights = None if args.fid_weights == "torchvision" else args.fid_weights
        reference = args.fid_reference or ("cifar10-train" if preset == "gpu-cifar10" else "mnist-train")
        options = dict(device=args.device, batch_size=args.fid_batch_size, weights=weights, data_root=args.data_root)
        paper = "pt_inception" in os.path.basename(args.fid_weights)
        return Ruler("FID", f"fid.py, Inception weights {args.fid_weights}, against {reference}; "
                     + ("paper-comparable only at n = 50,000 against cifar10-train" if paper else
                        "NOT comparable with papers (only pytorch-fid's pt_inception weights are)"),
                     lambda images: fid.compute_stats(images, **options),
                     lambda: fid.compute_stats(reference, **options))
    if preset == "smoke":  # a random LeNet, seeded, against the synthetic training images: fast and offline
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = mnist_fid.LeNet().eval()
        return Ruler("random-feature FD", "a seeded random LeNet's features vs the smoke data (tests only: meaningless)",
                     lambda images: lenet_stats(net, images),
                     lambda: lenet_stats(net, torch.from_numpy(np.load(data))[:, None]))
    net = mnist_fid.classifier(args.data_root)
    return Ruler("MNIST-FID", "benchmarks/mnist_fid.py: Fréchet distance in the 128-d features of a small MNIST "
                 "classifier, against the 10,000 MNIST test images; NOT comparable with Inception FID or papers, "
                 "only with other MNIST-FIDs at equal n",
                 lambda images: lenet_stats(net, images),
                 lambda: lenet_stats(net, (mnist_fid.mnist(args.data_root, train=False)[0] * 255).round().byte()))


def load_pngs(folder: str) -> torch.Tensor:
    """The scripts' --sample output (000000.png, ...) as uint8 (N, C, H, W); grey PNGs give C = 1."""
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if re.fullmatch(r"\d{6}\.png", f))
    if len(files) < 2:
        sys.exit(f"compare: {folder} holds {len(files)} generated PNG(s); a Fréchet distance needs at least 2")
    pixels = np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in files])
    return torch.from_numpy(pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)).contiguous()


def grid_tiles(path: str) -> torch.Tensor:
    """The images of a samples/step_N.png grid (torchvision's save_image, as the scripts call it: 8 a row,
    2-pixel padding; 64, or 8 per class for a class-conditional DDPM) as uint8 (N, C, s, s); grids of grey
    images are saved as RGB, and come back grey (C = 1)."""
    from PIL import Image
    grid = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    s = (grid.shape[1] - 2) // 8 - 2  # tile size, from the width 8·(s + 2) + 2
    rows = (grid.shape[0] - 2) // (s + 2)
    tiles = np.stack([grid[2 + r * (s + 2):2 + r * (s + 2) + s, 2 + c * (s + 2):2 + c * (s + 2) + s]
                      for r in range(rows) for c in range(8)])  # (64, s, s, 3)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    return x[:, :1] if (x == x[:, :1]).all() else x


def step_grids(run_dir: str) -> list:
    """(step, path) of every samples/step_N.png of a run, in training order."""
    folder = os.path.join(run_dir, "samples")
    names = sorted(f for f in os.listdir(folder) if re.fullmatch(r"step_\d+\.png", f)) if os.path.isdir(folder) else []
    return [(int(re.findall(r"\d+", f)[0]), os.path.join(folder, f)) for f in names]


# =============================================================================================
# 4. Stages: run a script, time it, keep the result
# =============================================================================================
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} CPU cores; {gpu}; torch {torch.__version__}; Python {platform.python_version()}"


def shown(command: list) -> str:
    """A command as a user would type it: `python`, and paths relative to the repository."""
    words = ["python"] + [os.path.relpath(w, ROOT) if os.path.isabs(w) and w.startswith(ROOT) else w
                          for w in command[1:]]
    return " ".join(shlex.quote(w) for w in words)


def run_command(command: list, log_path: str, quiet: bool) -> tuple:
    """Run a script from the repository root; its output goes to log_path and to our stdout (with --quiet,
    only its progress lines, one every 30 s). Returns (output, wall-clock seconds). A failure stops
    everything: rerun to resume."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"compare: $ {shown(command)}", flush=True)
    start, lines, echoed = time.perf_counter(), [], 0.0
    with open(log_path, "w") as log, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:  # the scripts print a progress line (ETA) every few seconds
            lines.append(line)
            log.write(line)
            progress = "ETA" in line or "done in" in line
            if not quiet or progress and time.perf_counter() - echoed > 30:  # --quiet: progress, every 30 s
                print("    " + line, end="", flush=True)
                echoed = time.perf_counter() if quiet else echoed
    seconds = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"compare: this command failed (exit {process.returncode}; its output is in {log_path}): "
                 f"{shown(command)}; fix it and run compare.py again: finished stages are kept")
    return "".join(lines), seconds


def stage(out: str, preset: str, model: Model, name: str, work) -> dict:
    """A stage's result: read from OUT/stages/<preset>.<model>.<name>.json if a run finished it
    before, else work() run now and its result stored (atomically) there."""
    path = os.path.join(out, "stages", f"{preset}.{model.key}.{name}.json")
    if os.path.exists(path):
        print(f"compare: {model.key} {name}: done earlier, skipped ({os.path.relpath(path)})", flush=True)
        with open(path) as f:
            return json.load(f)
    result = {**work(), "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def loop_seconds(rows: list, resumed_at=()) -> float:
    """Training time from metrics.csv's elapsed_s (the loop, sample grids and checks included), summed over
    the run's segments. Each --resume restarts that clock, and the script first drops the rows after the
    checkpoint it resumes (those steps are trained again), so the rows are one increasing run of steps whose
    elapsed_s falls back at every resume. A segment starts where elapsed_s falls, or at the first row past a
    step in resumed_at (the checkpoints compare resumed from: a short segment's clock need not fall below the
    previous one's); each segment's last elapsed_s is added up. The steps between a killed segment's last row
    and its checkpoint are not counted (at most --log-every steps per resume)."""
    total, last, previous_step = 0.0, 0.0, -1
    for row in rows:
        step, elapsed = int(row["step"]), float(row["elapsed_s"])
        if elapsed < last or any(previous_step <= b < step for b in resumed_at):  # the clock restarted here
            total += last
        last, previous_step = elapsed, step
    return total + last


def checkpoint_step(ckpt_path: str) -> int:
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["step"])


def own_checks(run_dir: str) -> dict:
    """A script's own quality check over training, if it keeps one (dcgan.py: quality.csv, columns step and
    its --check, proxy by default): {"column": name, "rows": [[step, value], ...]}; else {}."""
    path = os.path.join(run_dir, "quality.csv")
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {"column": rows[0][1], "rows": [[int(r[0]), float(r[1])] for r in rows[1:] if r]}


def count_parameters(ckpt_path: str) -> dict:
    """Trainable parameters per network in a checkpoint: every state dict except EMA copies and
    optimisers, without BatchNorm's running statistics (buffers, not parameters)."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    counts = {}
    for name, value in state.items():
        if isinstance(value, dict) and value and "ema" not in name and "optim" not in name \
                and all(torch.is_tensor(v) for v in value.values()):
            counts[name] = sum(v.numel() for k, v in value.items()
                               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return counts


def train_command(model: Model, run_dir: str, args) -> list:
    """The model's training command: its preset flags (cpu-mnist: the script's --recipe), then what compare adds."""
    return [sys.executable, model.script, *model.train, "--data-root", args.data_root, "--out", run_dir]


def sample_command(model: Model, ckpt: str, run_dir: str) -> list:
    return [sys.executable, model.script, "--sample", "--ckpt", ckpt, *model.sample, "--out", run_dir]


def train_stage(model: Model, run_dir: str, args, stages: str) -> dict:
    """The training command; a ckpt.pt left by a killed compare run is continued with --resume. The steps it
    was resumed from are kept in stages/<preset>.<model>.train.resumes (loop_seconds() needs them); a run
    that starts afresh (no ckpt.pt) clears that file."""
    command = train_command(model, run_dir, args)
    ckpt, resumes = os.path.join(run_dir, "ckpt.pt"), os.path.join(stages, f"{args.preset}.{model.key}.train.resumes")
    resumed = os.path.exists(ckpt)  # a killed compare run left it: continue it
    if not resumed and os.path.exists(resumes):
        os.remove(resumes)  # a fresh run: earlier runs' resume points mean nothing to it
    resumed_at = []
    if resumed:  # this step, and those of earlier resumes of this run
        os.makedirs(stages, exist_ok=True)
        with open(resumes, "a+") as f:
            f.write(f"{checkpoint_step(ckpt)}\n")
            f.seek(0)
            resumed_at = [int(line) for line in f.read().split()]
    _, wall = run_command(command + ["--resume"] * resumed, os.path.join(args.out, "logs", f"{model.key}-train.log"),
                          args.quiet)
    rows = read_metrics(run_dir)
    return {"command": shown(command), "resumed": resumed, "resumed_at": resumed_at, "wall_s": wall,
            "train_s": loop_seconds(rows, resumed_at), "steps": int(rows[-1]["step"]),
            "parameters": count_parameters(ckpt), "own_checks": own_checks(run_dir)}


def sample_stage(model: Model, ckpt: str, run_dir: str, args) -> dict:
    command = sample_command(model, ckpt, run_dir)
    output, wall = run_command(command, os.path.join(args.out, "logs", f"{model.key}-sample.log"), args.quiet)
    found = re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) img/s", output)
    if not found:
        sys.exit(f"compare: {model.script} --sample did not print 'N images in S s (R img/s'; see its log")
    n, rate = int(found[1]), float(found[3])  # the rate, not n / the seconds printed to 0.1 s
    # the script's own clock covers generation only (not start-up or PNG writing); we keep both
    return {"command": shown(command), "n": n, "seconds": n / rate, "images_per_s": rate, "wall_s": wall}


def score_stage(model: Model, run_dir: str, ruler: Ruler, trained: bool) -> dict:
    print(f"compare: {model.key} score: {ruler.name} of {run_dir}/generated", flush=True)
    images = load_pngs(os.path.join(run_dir, "generated"))
    result = {"ruler": ruler.name, "ruler_note": ruler.note, "n": len(images), "fid": ruler(images)}
    if trained:  # quality over training: the same ruler on each fixed-noise grid of 64 (cheap, biased by n = 64)
        result["grid_quality"] = [[step, ruler(grid_tiles(path))] for step, path in step_grids(run_dir)]
    return result


# =============================================================================================
# 5. Figures, drawn with Pillow only
# =============================================================================================
PANEL_W, PANEL_H, COLUMNS = 420, 300, 3  # losses.png: one panel per trained model, COLUMNS a row
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]  # main loss, then the other columns


ASCII = str.maketrans({"−": "-", "ε": "eps", "η": "eta", "·": "*", "τ": "tau", "̃": "~"})


def font(size: int = 12):
    """DejaVu Sans where the system has it (it has −, ε, η), else Pillow's own font."""
    from PIL import ImageFont
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 with FreeType: a scalable font
        except (TypeError, OSError):
            return ImageFont.load_default()


def write(draw, xy, text: str, size: int = 12, **kwargs) -> None:
    """draw.text in font(size); Pillow's own font lacks −, ε, η, so they are spelled out for it."""
    chosen = font(size)
    if "DejaVu" not in str(getattr(chosen, "path", "")):
        text = text.translate(ASCII)
    (draw.multiline_text if "\n" in text else draw.text)(xy, text, font=chosen, **kwargs)


def nice_ticks(low: float, high: float, count: int = 5) -> list:
    """About `count` round values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    span = (high - low) or abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list:
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    multiples = (1,) if len(decades) > 3 else (1, 2, 5)
    return [m * 10.0 ** d for d in decades for m in multiples if low <= m * 10.0 ** d <= high]


def short(value: float) -> str:
    """Tick labels of steps: 2600, 40k, 0.8M."""
    return f"{value / 1e6:g}M" if abs(value) >= 1e6 else f"{value / 1e3:g}k" if abs(value) >= 1e4 else f"{value:g}"


def draw_panel(draw, box: tuple, title: str, ylabel: str, series: list, shade_from: float) -> None:
    """One loss panel in box = (x0, y0, x1, y1): series = [(name, steps, values), ...], the first in
    front; the last quarter of training (where the CV is measured) shaded. Log y if the values span
    more than a factor 10 and are all positive."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 38, y1 - 40  # the plot area
    write(draw, (x0 + 8, y0 + 4), title, 13, fill="black")
    write(draw, (x0 + 8, y0 + 21), ylabel, 11, fill=(90, 90, 90))
    finite = [v for _, _, vs in series for v in vs if math.isfinite(v)]
    steps = [s for _, ss, _ in series for s in ss]
    if not finite or not steps:
        write(draw, (left, (top + bottom) // 2), "no finite values", 12, fill="red")
        return
    lo, hi, smax = min(finite), max(finite), max(steps)
    logy = lo > 0 and hi / lo > 10
    f = (lambda v: math.log10(v)) if logy else (lambda v: v)
    ticks = log_ticks(lo, hi) if logy else nice_ticks(lo, hi)
    if not logy:
        lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    flo, fhi = f(lo), f(hi) if f(hi) > f(lo) else f(lo) + 1

    def px(step, value):
        return (left + (right - left) * step / max(smax, 1),
                bottom - (bottom - top) * (f(value) - flo) / (fhi - flo))

    draw.rectangle((px(shade_from, lo)[0], top, right, bottom), fill=(236, 236, 236))  # the CV window
    for t in ticks:  # y ticks and grid lines
        y = px(0, t)[1]
        draw.line((left, y, right, y), fill=(215, 215, 215))
        write(draw, (left - 6, y), f"{t:.3g}", 10, fill="black", anchor="rm")
    for t in nice_ticks(0, smax, 4):  # x ticks
        x = px(t, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        write(draw, (x, bottom + 6), short(t), 10, fill="black", anchor="mt")
    write(draw, ((left + right) // 2, bottom + 22), "training step", 11, fill="black", anchor="mt")
    draw.rectangle((left, top, right, bottom), outline="black")
    for i, (name, ss, vs) in reversed(list(enumerate(series))):  # the main loss drawn last, on top
        points = [px(s, v) for s, v in zip(ss, vs) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=COLORS[i % len(COLORS)], width=2 if i == 0 else 1)
        write(draw, (right - 4, top + 4 + 13 * i), name, 10, fill=COLORS[i % len(COLORS)], anchor="ra")


def losses_figure(panels: list, path: str) -> None:
    """panels: [(title, ylabel, series, last_step)], drawn as small multiples, COLUMNS a row."""
    from PIL import Image, ImageDraw
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    image = Image.new("RGB", (PANEL_W * min(COLUMNS, max(1, len(panels))), PANEL_H * rows), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, ylabel, series, last_step) in enumerate(panels):
        x, y = PANEL_W * (i % COLUMNS), PANEL_H * (i // COLUMNS)
        draw_panel(draw, (x, y, x + PANEL_W, y + PANEL_H), title, ylabel, series, 0.75 * last_step)
    image.save(path)


def montage(items: list, path: str, band: int = 34) -> None:
    """items: [(caption lines, image path)], each image under its caption, COLUMNS a row."""
    from PIL import Image, ImageDraw
    images = [Image.open(p).convert("RGB") for _, p in items]
    scale = max(1, 256 // max(im.width for im in images))  # small grids are enlarged (nearest) to ≥ 256 px
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    text_w = max(font(12).getlength(line) for caption, _ in items for line in caption.split("\n"))
    cell_w = int(max(text_w, max(im.width for im in images))) + 16  # wide enough for the longest caption
    cell_h = max(im.height for im in images) + band + 8
    columns = min(COLUMNS, len(images))
    canvas = Image.new("RGB", (cell_w * columns, cell_h * math.ceil(len(images) / columns)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((caption, _), im) in enumerate(zip(items, images)):
        x, y = cell_w * (i % columns) + 8, cell_h * (i // columns) + 4
        write(draw, (x, y), caption, 12, fill="black", spacing=2)
        canvas.paste(im, (x, y + band))
    canvas.save(path)


def labelled_progression(run_dir: str, path: str, title: str) -> bool:
    """The first row of every samples/step_N.png a script saved during training, one row per grid,
    with its step written to the left and a title on top: samples over training."""
    from PIL import Image, ImageDraw
    grids = step_grids(run_dir)
    if not grids:
        return False
    rows = [Image.open(p).convert("RGB") for _, p in grids]
    height = (rows[0].width - 2) // 8 + 2  # one row of tiles, with its padding
    margin, head = 80, 24
    canvas = Image.new("RGB", (margin + rows[0].width, head + height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    write(draw, (4, 4), title, 12, fill="black")
    for i, ((step, _), grid) in enumerate(zip(grids, rows)):
        canvas.paste(grid.crop((0, 0, grid.width, height)), (margin, head + i * height))
        write(draw, (margin - 6, head + i * height + height // 2), f"step {step}", 11, fill="black", anchor="rm")
    canvas.save(path)
    return True


# =============================================================================================
# 6. The report
# =============================================================================================
def number(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report(args, preset: str, models: list, results: dict, ruler: Ruler, skipped: list) -> None:
    out = args.out
    rows, panels, grids = [], [], []
    for model in models:
        r = results[model.key]
        trained = results[model.source or model.key]  # DDIM: the training run of the checkpoint it samples
        metrics = read_metrics(os.path.join(out, "runs", model.source or model.key))
        column = model.loss if model.loss in metrics[0] else "loss"
        steps = [float(m["step"]) for m in metrics]
        losses = [float(m[column]) for m in metrics]
        quality = [q for _, q in trained["score"].get("grid_quality", [])]
        st = stability(steps, losses, quality)
        params = sum(trained["train"]["parameters"].values())
        rows.append((model, r, trained, st, params, column))
        if not model.source:
            series = [(column, steps, losses)] + [(c, steps, [float(m[c]) for m in metrics])
                                                  for c in model.also if c in metrics[0]]
            panels.append((f"{model.label}: CV {st['cv']:.3f}, {st['verdict']}", model.loss_label, series, steps[-1]))
        grids.append((f"{model.label}\n{ruler.name} {r['score']['fid']:.2f} (n = {r['score']['n']})",
                      os.path.join(out, "runs", model.key, "generated_grid.png")))
    losses_figure(panels, os.path.join(out, "losses.png"))
    montage(grids, os.path.join(out, "samples.png"))
    progressions = [f"progression_{m.key}.png" for m in models if not m.source and labelled_progression(
        os.path.join(out, "runs", m.key), os.path.join(out, f"progression_{m.key}.png"), f"{m.label}: samples from "
        "the same noise over training")]

    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machines = sorted({s["machine"] for r in results.values() for s in r.values()})
    lines = [f"# Model comparison: preset {preset}", "",
             f"Command: `{command}`  ", f"Machine: {'; '.join(machines)}  ",
             f"Quality: **{ruler.name}**, {ruler.note}; n = {rows[0][1]['score']['n']} samples per model.", "",
             f"| model | {ruler.name} | training stability | loss CV, last 25% | worst quality rise (%) | "
             "training time (min) | sampling images/s | parameters (M) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for model, r, trained, st, params, column in rows:
        lines.append(f"| {model.label} | {number(r['score']['fid'])} | {st['verdict']} | {number(st['cv'], 3)} | "
                     f"{number(100 * st['rise'], 0)} | {number(trained['train']['train_s'] / 60, 1)} | "
                     f"{number(r['sample']['images_per_s'], 1)} | {number(params / 1e6, 3)} |")
    lines += ["", "How each column was measured:", "",
              f"- **{ruler.name}**: of the n samples written by the model's `--sample` command (lower is better).",
              "- **training stability**: `stability()` in benchmarks/compare.py. *Loss CV*: std/|mean| of the "
              "loss rows of metrics.csv (each the mean over `--log-every` steps) logged in the last quarter of "
              "training; the loss is L_simple for DDPM, the −ELBO for the VAE, the generator's −log D(G(z)) "
              "for DCGAN and the decoder's adversarial −log D(·) for the VAE-GAN. *Worst quality rise*: the "
              f"same {ruler.name} computed on each fixed-noise 64-image grid saved during training "
              "(samples/step_N.png), and the largest relapse behind the best earlier grid, max_k q_k / "
              "min_{j<k} q_j − 1 (n = 64 is heavily biased, but the same for every grid of a run). Verdict: "
              f"unstable if a loss is not finite, CV > {CV_UNSTABLE} or rise > {RISE_UNSTABLE:.0%}; moderate if "
              f"CV > {CV_STABLE} or rise > {RISE_STABLE:.0%}; else stable. A DDIM row shares its DDPM's training.",
              "- **training time**: the training loop's own clock (metrics.csv `elapsed_s`, summed over resumed "
              "segments: a resumed script drops the rows after its checkpoint and restarts the clock), sample "
              "grids and quality checks included, start-up and data loading not.",
              "- **sampling images/s**: n divided by the generation time the script itself prints (its clock "
              "stops when the images reach the host; start-up and PNG writing are not included).",
              "- **parameters**: counted in the checkpoint (EMA copies, optimisers and BatchNorm statistics "
              "excluded); GANs count both networks.", "",
              "Figures: `losses.png` (loss curves; the shaded band is the last quarter, where the CV is measured), "
              "`samples.png` (the first 64 scored samples of each model), "
              + ", ".join(f"`{p}`" for p in progressions) + " (samples from fixed noise over training).", "",
              "## Details", ""]
    for model, r, trained, st, params, column in rows:
        nets = " + ".join(f"{k} {v:,}" for k, v in trained["train"]["parameters"].items())
        curve = ", ".join(f"{s}: {q:.4g}" for s, q in trained["score"].get("grid_quality", []))
        checks = trained["train"].get("own_checks") or {}
        best = min(checks["rows"], key=lambda row: row[1]) if checks.get("rows") else None
        lines.append(f"- **{model.label}** ({model.key}): stability from `{column}` ({st['why']}); "
                     f"{trained['train']['steps']} steps; parameters {nets}; sampling {r['sample']['n']} images in "
                     f"{r['sample']['seconds']:.1f} s (wall clock with start-up and PNG writing "
                     f"{r['sample']['wall_s']:.1f} s)" + (f"; grid {ruler.name} by step: {curve}" if curve else "")
                     + (f"; the script's own check (quality.csv, {checks['column']}): best {best[1]:.4g} at step "
                        f"{best[0]} of {len(checks['rows'])} checks" if best else ""))
    for key in skipped:
        lines.append(f"- **{key}**: not run: its script is not in this checkout.")
    lines += ["", "## Commands, in the order they ran", ""]
    for model, r, *_ in rows:
        if "command" in r.get("train", {}) and not model.source:
            lines.append(f"    {r['train']['command']}" + ("    # resumed with --resume" if r["train"]["resumed"] else ""))
        lines.append(f"    {r['sample']['command']}")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 8]))
    print(f"compare: wrote {out}/results.md, losses.png, samples.png and {len(progressions)} progression image(s)")


# =============================================================================================
# 7. Main
# =============================================================================================
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"compare: {message} (see --help)")  # one line, not usage + error
    parser.add_argument("--preset", choices=PRESETS, help="which comparison: cpu-mnist | gpu-cifar10 | smoke")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset: tiny budgets, synthetic data, < 1 min")
    parser.add_argument("--out", default="", help="output folder (default: runs/compare-<preset>); a rerun resumes it")
    parser.add_argument("--data-root", default="data", help="where torchvision keeps MNIST / CIFAR-10 (and FID stats)")
    parser.add_argument("--fid-weights", default="", help="Inception FID through fid.py: a weights file (pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth: paper-comparable), 'torchvision', or 'random' (tests); "
                        "default: MNIST-FID for cpu-mnist, torchvision's weights for gpu-cifar10")
    parser.add_argument("--fid-reference", default="", help="the reference side of the Inception FID (default: the "
                        "training set, cifar10-train or mnist-train; any source fid.py takes)")
    parser.add_argument("--fid-batch-size", type=int, default=200, help="images per Inception batch")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="where FID runs")
    parser.add_argument("--quiet", action="store_true",
                        help="echo only the scripts' progress lines, one every 30 s (all their output is in OUT/logs/)")
    args = parser.parse_args(argv)
    if args.smoke:
        if args.preset not in (None, "smoke"):
            sys.exit("compare: --smoke is the smoke preset; leave out --preset or pass --preset smoke")
        args.preset = "smoke"
    if not args.preset:
        sys.exit(f"compare: choose --preset ({' | '.join(PRESETS)}) or --smoke")
    if args.preset == "gpu-cifar10" and not args.fid_weights:
        args.fid_weights = "torchvision"
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "runs", f"compare-{args.preset}"))
    args.data_root = os.path.abspath(args.data_root)
    return args


def main(args) -> None:
    preset, out = args.preset, args.out
    start = time.time()
    if preset == "smoke":
        data = os.path.join(out, "data", "smoke.npy")
        if not os.path.exists(data):
            smoke_data(data)
    else:
        data = "mnist" if preset == "cpu-mnist" else "cifar10"
    n = {"cpu-mnist": 2000, "gpu-cifar10": 50_000, "smoke": 16}[preset]
    models, skipped = [], []
    for model in preset_models(preset, data, n):
        (models if os.path.exists(os.path.join(ROOT, model.script)) else skipped).append(model)
    skipped = [m.key for m in skipped]
    for key in skipped:
        print(f"compare: {key}: its script is not in this checkout; left out of the table", flush=True)
    ruler = make_ruler(args, preset, data)
    results = {}
    for model in models:
        run_dir = os.path.join(out, "runs", model.key)
        results[model.key] = r = {}
        if not model.source:
            r["train"] = stage(out, preset, model, "train",
                               lambda: train_stage(model, run_dir, args, os.path.join(out, "stages")))
        ckpt = os.path.join(out, "runs", model.source or model.key, model.ckpt)
        r["sample"] = stage(out, preset, model, "sample", lambda: sample_stage(model, ckpt, run_dir, args))
        r["score"] = stage(out, preset, model, f"score-{ruler.name.replace(' ', '_')}",
                           lambda: score_stage(model, run_dir, ruler, trained=not model.source))
    report(args, preset, models, results, ruler, skipped)
    print(f"compare: preset {preset} finished in {(time.time() - start) / 60:.1f} min (this invocation)")


if __name__ == "__main__":
    main(parse_args())
