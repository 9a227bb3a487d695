"""Benchmark, not a test: every CUDA path of the scripts, checked in one command on a GPU machine.

GPU time often comes in short slots, so this is one prepared run of about 8 minutes that downloads
nothing: synthetic CIFAR-shaped data (random 32x32 RGB images) and a random-weight Inception for fid.py.
It trains each script at its default (paper) size for a few hundred steps in fp32 (TF32) and bf16,
ddpm.py also with --compile and under torchrun (one process, NCCL), resumes a run and checks that it
continues exactly, then samples with ddpm.py, ddim.py and scores with fid.py. It prints one table:
images/s, peak GPU memory, training-loop and sampler overhead (as benchmarks/speed.py measures them),
whether every logged loss was finite, whether resuming was exact, and what the paper's 800k DDPM steps
would take on this GPU.

    python benchmarks/gpu_check.py                  # on a CUDA machine (about 8 minutes on one GPU)
    python benchmarks/gpu_check.py --dry-run        # anywhere: the same plan on the CPU with tiny networks
    python benchmarks/gpu_check.py --steps 100      # fewer steps per run (the timings get noisier)

The resume check runs in deterministic mode (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG),
so "exact" means bit for bit: a resumed run against an uninterrupted one, CUDA random state included.
"""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live in the repository root; benchmarks may import them
import dcgan  # noqa: E402
import ddim  # noqa: E402
import ddpm  # noqa: E402
import vae  # noqa: E402
import vaegan  # noqa: E402

TINY = {  # --dry-run: the networks shrunk so that the whole plan runs on a CPU in about a minute
    "ddpm": dict(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none", timesteps=10),
    "dcgan": dict(g_channels=8, d_channels=8, check_n=16), "vae": dict(channels=8, latent=8),
    "vaegan": dict(channels=8, d_channels=8, latent=8)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"gpu_check: {message} (see --help)")  # one line
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with tiny networks")
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (default: 200 on a GPU, 4 dry)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (the papers' 128)")
    parser.add_argument("--skip", default="", help="comma-separated checks to skip: compile, torchrun, fid")
    parser.add_argument("--out", default="", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; use --dry-run to run the same plan on the CPU with tiny networks")
    args.steps = args.steps or (4 if args.dry_run else 200)
    args.batch_size = 8 if args.dry_run else args.batch_size
    if args.steps < 2 or args.batch_size < 1:
        sys.exit("gpu_check: need --steps >= 2 and --batch-size >= 1")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def train_in_process(module, args, device, out: str, **flags) -> dict:
    """One training run of a script at its default size (tiny with --dry-run): its speed (the second logged
    interval, after warm-up), peak GPU memory, and whether every logged loss was finite."""
    kw = dict(dataset=args.data, out=out, steps=args.steps, log_every=args.steps // 2, sample_every=10 ** 9,
              ckpt_every=10 ** 9, batch_size=args.batch_size, device=device.type, **flags)
    if args.dry_run:
        kw |= TINY[module.PROG]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        module.train(module.Config(**kw))
    rows = metrics(out)
    logged = [(k, float(v)) for r in rows for k, v in r.items() if k not in ("step", "lr", "images_per_s", "elapsed_s")]
    return {"img/s": float(rows[-1]["images_per_s"]), "seconds": time.time() - start,
            "memory": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else math.nan,
            "finite": all(math.isfinite(v) or k == "sigma" for k, v in logged)}  # vae: σ is nan for Bernoulli


def bare_ddpm_overheads(args, device, bf16: bool, loop_img_s: float) -> tuple:
    """(training-loop overhead, sampler overhead) of ddpm.py at the run's size, as benchmarks/speed.py
    measures them: the loop's time per step ÷ a bare forward + backward + Adam on a resident batch, and
    ddpm.sample()'s time per step ÷ one bare forward."""
    kw = TINY["ddpm"] if args.dry_run else {}
    model = ddpm.build_model(ddpm.Config(image_size=32, **kw), 3).to(device)  # the run's network (T: no weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x, t = torch.randn(args.batch_size, 3, 32, 32, device=device), torch.randint(0, 1000, (args.batch_size,), device=device)

    def timed(fn, repeat=10):
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync(device)
        return (time.perf_counter() - start) / repeat

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model(x, t)
    bare = timed(step)
    betas, T = ddpm.make_betas("linear", 20), 20

    def chain():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            ddpm.sample(model.eval(), x.shape, betas, device=device)
    return (args.batch_size / loop_img_s) / bare, timed(chain, 2) / T / timed(forward)


def resume_is_exact(args, device, tmp: str) -> bool:
    """ddpm.py: n steps, stop, n more with --resume = 2n steps at once, bit for bit (deterministic mode)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        n, kw = max(1, args.steps // 4), TINY["ddpm"] if args.dry_run else {}
        common = dict(dataset=args.data, batch_size=args.batch_size, device=device.type, log_every=1,
                      sample_every=10 ** 9, ckpt_every=10 ** 9, timesteps=kw.get("timesteps", 1000),
                      precision="fp32", **{k: v for k, v in kw.items() if k != "timesteps"})
        with contextlib.redirect_stdout(io.StringIO()):
            ddpm.train(ddpm.Config(out=os.path.join(tmp, "whole"), steps=2 * n, **common))
            ddpm.train(ddpm.Config(out=os.path.join(tmp, "halves"), steps=n, **common))
            ddpm.train(ddpm.Config(out=os.path.join(tmp, "halves"), steps=2 * n, resume=True, **common))
        a, b = (torch.load(os.path.join(tmp, d, "ckpt.pt"), weights_only=True) for d in ("whole", "halves"))
        return all(torch.equal(a[k][name], b[k][name]) for k in ("model", "ema") for name in a[k])
    finally:
        torch.use_deterministic_algorithms(False)


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, **kwargs)


def main(args) -> None:
    device = torch.device("cpu" if args.dry_run else "cuda")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'}), " \
        f"{os.cpu_count()} cores (dry run: tiny networks, the timings mean nothing)"
    print(f"gpu_check on {machine} | torch {torch.__version__} | {args.steps} steps per run, batch {args.batch_size}")
    tmp = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(tmp, exist_ok=True)
    args.data = os.path.join(tmp, "cifar_shaped.npy")  # random 32x32 RGB images: no download
    np.save(args.data, np.random.default_rng(0).integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    skip, rows = set(args.skip.split(",")) - {""}, []

    def row(check, precision, compiled, result, overheads=("–", "–"), resume="–", note=""):
        rows.append([check, precision, compiled, f"{result['img/s']:.0f}", "–" if math.isnan(result["memory"])
                     else f"{result['memory']:.2f}", *overheads, "yes" if result["finite"] else "NO", resume, note])
        print(f"  {check} {precision}{' compiled' if compiled == 'yes' else ''}: {result['img/s']:.0f} img/s "
              f"in {result['seconds']:.0f} s", flush=True)

    ddpm_bf16 = None
    for module in (ddpm, dcgan, vae, vaegan):  # ddim.py trains with ddpm.py's code (shared blocks)
        for precision in ("fp32", "bf16"):
            result = train_in_process(module, args, device, os.path.join(tmp, f"{module.PROG}-{precision}"),
                                      precision=precision)
            overheads = ("–", "–")
            if module is ddpm:
                overheads = tuple(f"{v:.3f}" for v in bare_ddpm_overheads(args, device, precision == "bf16",
                                                                         result["img/s"]))
                ddpm_bf16 = result if precision == "bf16" else ddpm_bf16
            row(f"{module.PROG}.py", precision, "no", result, overheads)
    if "compile" not in skip:
        result = train_in_process(ddpm, args, device, os.path.join(tmp, "ddpm-compiled"), precision="bf16", compile=True)
        row("ddpm.py", "bf16", "yes", result, note=f"{result['seconds']:.0f} s with compilation")
    if "torchrun" not in skip:
        out = os.path.join(tmp, "ddpm-torchrun")
        flags = ["--dataset", args.data, "--out", out, "--steps", str(args.steps), "--log-every", str(args.steps // 2),
                 "--sample-every", str(10 ** 9), "--batch-size", str(args.batch_size), "--precision", "bf16",
                 "--device", device.type]
        if args.dry_run:
            flags += ["--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none",
                      "--timesteps", "10"]
        start = time.time()
        r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "ddpm.py", *flags])
        backend = "NCCL" if device.type == "cuda" else "gloo"
        if r.returncode:
            rows.append(["ddpm.py under torchrun", "bf16", "no", "FAILED", "–", "–", "–", "–", "–",
                         (r.stderr.strip().splitlines() or ["?"])[-1][:80]])
        else:
            got = metrics(out)
            row("ddpm.py under torchrun", "bf16", "no", {"img/s": float(got[-1]["images_per_s"]), "memory": math.nan,
                                                          "seconds": time.time() - start,
                                                          "finite": all(math.isfinite(float(g["loss"])) for g in got)},
                note=f"1 process, {backend}")
    exact = resume_is_exact(args, device, tmp)
    rows.append(["ddpm.py resumed", "fp32", "no", "–", "–", "–", "–", "–", "yes" if exact else "NO",
                 "n steps + --resume n = 2n steps, bit for bit, CUDA RNG included"])

    # --- sampling with the scripts as a user types it, and FID with random Inception weights ---
    ckpt = os.path.join(tmp, "ddpm-bf16", "ckpt.pt")
    samples = []
    for script, extra in (("ddpm.py", []), ("ddim.py", ["--sample-steps", "50" if not args.dry_run else "5"])):
        start = time.time()
        r = run([script, "--sample", "--ckpt", ckpt, "--num-samples", "256" if not args.dry_run else "8",
                 "--batch-size", "256" if not args.dry_run else "8", "--device", device.type, *extra,
                 "--out", os.path.join(tmp, f"samples-{script}")])
        line = next((l for l in r.stdout.splitlines() if "img/s" in l and "images in" in l), "")
        samples.append(f"{script} --sample: " + (line.split("(")[1].split(",")[0] if line else
                                                  f"FAILED: {(r.stderr.strip().splitlines() or ['?'])[-1][:100]}"))
    if "fid" not in skip:  # the reference: 2048 images on a GPU, 32 dry (Inception runs ~8 images/s on a CPU)
        reference = args.data if not args.dry_run else os.path.join(tmp, "reference.npy")
        if args.dry_run:
            np.save(reference, np.load(args.data)[:32])
        r = run(["fid.py", os.path.join(tmp, "samples-ddpm.py", "generated"), reference, "--weights", "random",
                 "--device", device.type, "--data-root", tmp])
        samples.append("fid.py (random Inception): " + ((r.stdout.strip().splitlines() or [""])[-1][:100] if
                                                        r.returncode == 0 else f"FAILED: {r.stderr.strip()[-100:]}"))

    header = ["check", "precision", "compile", "images/s", "peak GPU memory (GiB)", "training-loop overhead",
              "sampler overhead", "losses finite", "resume exact", "note"]
    print(f"\n### gpu_check: {machine}, torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print()
    for line in samples:
        print(f"- {line}")
    if ddpm_bf16 and ddpm_bf16["img/s"] > 0:
        hours = 800_000 * args.batch_size / ddpm_bf16["img/s"] / 3600
        print(f"- the paper's 800k DDPM steps of {args.batch_size} at this speed (bf16, not compiled): "
              f"{hours:.1f} h on one {machine.split(' (')[0]}" + (" (dry run: meaningless)" if args.dry_run else ""))
    print("- overheads: loop ÷ bare forward+backward+Adam (target ≤ 1.10); sampler ÷ bare forward (target ≤ 1.03)")


if __name__ == "__main__":
    main(parse_args())
