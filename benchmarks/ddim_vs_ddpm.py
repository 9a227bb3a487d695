"""Benchmark, not a test: DDPM against DDIM on one checkpoint, for speed and sample quality.

The seed project's question (DDPM or DDIM: how much faster, and what does it cost?), answered on
the same network. The checkpoint's EMA network is loaded once; then DDPM (ddpm.sample, all T steps)
and DDIM (ddim.sample, S ∈ {10, 20, 50, 100} steps, η ∈ {0, 1}) each generate --num-samples images
from the same seed, in batches of --batch-size. Each setting is timed (wall clock, after a
warm-up batch; DDPM last), its images go to OUT/<setting>/ as PNGs and its first 8 to a row of
OUT/comparison.png (with the same seed, every row starts from the same x_T), and it is scored:
  - MNIST checkpoints: benchmarks/mnist_fid.py (the Fréchet distance in a small digit classifier's
    features: CPU-friendly; only comparable with itself, at equal n);
  - other datasets: fid.py's Inception FID against the training set, if --fid-weights is given
    (a weights file, "torchvision" for torchvision's download, "random" for tests only).
Prints a Markdown table and the machine it ran on, ready for README.md.

    python benchmarks/ddim_vs_ddpm.py --ckpt runs/ddpm-mnist/ckpt.pt --num-samples 2000 --batch-size 500
    python benchmarks/ddim_vs_ddpm.py --ckpt runs/ddpm-cifar10/ckpt.pt --num-samples 10000 \
        --fid-weights pt_inception-2015-12-05-6726825d.pth --skip quadratic     # the paper's CIFAR-10 τ
"""
import argparse
import dataclasses
import math
import os
import platform
import re
import sys
import time

import torch
from torchvision.utils import save_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live in the repository root; benchmarks may import them
import ddim  # noqa: E402
import ddpm  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"ddim_vs_ddpm: {message} (see --help)")  # one line
    parser.add_argument("--ckpt", required=True, help="checkpoint written by ddpm.py or ddim.py")
    parser.add_argument("--num-samples", type=int, default=1000, help="images per setting (compare quality at equal n)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per sampling batch (the same for all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="where to sample")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA, else fp32 (as in the scripts)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed for every setting")
    parser.add_argument("--var", default="beta", choices=["beta", "beta_tilde"],
                        help="DDPM's σ_t²: β_t (the paper's CIFAR-10 choice) or β̃_t (what DDIM's η = 1 uses)")
    parser.add_argument("--ddim-steps", default="10,20,50,100", help="DDIM's S values, comma-separated")
    parser.add_argument("--etas", default="0,1", help="DDIM's η values, comma-separated")
    parser.add_argument("--skip", default=ddim.Config.skip, choices=["uniform", "trailing", "quadratic"],
                        help=f"DDIM's τ, see ddim.py (default: ddim.py's, {ddim.Config.skip})")
    parser.add_argument("--clip-x0", default=ddim.Config.clip_x0, action=argparse.BooleanOptionalAction,
                        help=f"clip DDIM's predicted x_0 to [-1, 1] (default: ddim.py's, {ddim.Config.clip_x0})")
    parser.add_argument("--out", default="", help="where the PNGs go (default: <checkpoint folder>/ddim_vs_ddpm)")
    parser.add_argument("--data-root", default="data", help="where torchvision datasets are (for the quality measure)")
    parser.add_argument("--fid-weights", default="", help="non-MNIST quality: Inception weights for fid.py "
                        "(a file, 'torchvision', or 'random' for tests); empty: no quality column")
    args = parser.parse_args(argv)
    try:
        args.ddim_steps = [int(s) for s in args.ddim_steps.split(",")]
        args.etas = [float(e) for e in args.etas.split(",")]
    except ValueError:
        sys.exit("ddim_vs_ddpm: --ddim-steps and --etas are comma-separated numbers, e.g. 10,20,50 and 0,1")
    if min(args.ddim_steps) < 1 or not all(0 <= e <= 1 for e in args.etas) or min(args.num_samples,
                                                                                   args.batch_size) < 1:
        sys.exit("ddim_vs_ddpm: need --ddim-steps >= 1, 0 <= --etas <= 1, --num-samples and --batch-size >= 1")
    if not os.path.isfile(args.ckpt):
        sys.exit(f"ddim_vs_ddpm: checkpoint {args.ckpt} does not exist")
    return args


def quality_measure(dataset: str, args):
    """(name of the measure, function images -> float), or (why there is none, None)."""
    if dataset == "mnist":
        try:
            import mnist_fid  # benchmarks/mnist_fid.py, beside this file
        except ImportError:
            return "n/a (benchmarks/mnist_fid.py is missing)", None
        return "MNIST-FID (LeNet features vs the MNIST test set; lower is better)", \
            lambda images: mnist_fid.score(images, args.data_root)
    if args.fid_weights:
        import fid
        reference = f"{dataset}-train" if dataset in ddpm.TORCHVISION else dataset
        weights = None if args.fid_weights == "torchvision" else args.fid_weights
        device = str(ddpm.pick_device(args.device))
        return f"FID vs {reference} (Inception weights: {args.fid_weights}; lower is better)", \
            lambda images: fid.score(images, reference, device=device, batch_size=50, weights=weights,
                                     data_root=args.data_root)
    return "n/a (pass --fid-weights to measure FID)", None


def tradeoff_figure(rows: list, etas: list, path: str, measure: str, note: str) -> None:
    """Quality (y) against network calls per image (x, log scale): one line per η, DDPM as a point.
    rows: [(label, calls, seconds, quality)], DDPM first; drawn with Pillow only (compare.py's helpers)."""
    from PIL import Image, ImageDraw
    import compare
    points = [(calls, float(q)) for _, calls, _, q in rows]
    W, H, left, right, top, bottom = 640, 420, 70, 620, 50, 360
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [c for c, _ in points], [q for _, q in points]
    xlo, xhi, ticks = min(xs) / 1.3, max(xs) * 1.3, compare.nice_ticks(0, max(ys))
    if ticks[-1] < max(ys):  # nice_ticks stays inside [0, max]: one round value more keeps every point in the frame
        ticks.append(ticks[-1] + ticks[1] - ticks[0])
    px = lambda c, q: (left + (right - left) * math.log(c / xlo) / math.log(xhi / xlo),  # noqa: E731
                       bottom - (bottom - top) * q / ticks[-1])
    compare.write(draw, (left, 8), f"{measure} against network calls per image", 13, fill="black")
    compare.write(draw, (left, 28), f"({note})", 11, fill="black")  # a line of its own: it can be long
    for t in ticks:
        draw.line((left, px(xlo, t)[1], right, px(xlo, t)[1]), fill=(220, 220, 220))
        compare.write(draw, (left - 6, px(xlo, t)[1]), f"{t:g}", 10, fill="black", anchor="rm")
    for c in compare.log_ticks(xlo, xhi):
        compare.write(draw, (px(c, 0)[0], bottom + 6), f"{c:g}", 10, fill="black", anchor="mt")
    compare.write(draw, ((left + right) // 2, bottom + 24), "network calls per image (log scale)", 11,
                  fill="black", anchor="mt")
    draw.rectangle((left, top, right, bottom), outline="black")
    for i, eta in enumerate(etas):  # the DDIM rows come after DDPM's, S by S, each with every η
        line = [px(c, q) for (c, q), (label, *_) in zip(points[1:], rows[1:]) if f"η = {eta:g}," in label]
        color = compare.COLORS[i % len(compare.COLORS)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        compare.write(draw, (right - 8, top + 8 + 15 * i), f"DDIM, η = {eta:g}", 11, fill=color, anchor="ra")
    x, y = px(*points[0])
    draw.rectangle((x - 5, y - 5, x + 5, y + 5), outline="black", width=2)
    compare.write(draw, (x - 8, y - 8), f"DDPM, {points[0][0]} calls", 11, fill="black", anchor="rb")
    image.save(path)


def save_pngs(images: torch.Tensor, folder: str) -> None:
    """One PNG per image in [-1, 1] (000000.png, ...), the format FID tools read; this script's earlier
    PNGs there go first, or a tool would count them."""
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):
        if re.fullmatch(r"\d{6}\.png", old):
            os.remove(os.path.join(folder, old))
    for i, image in enumerate(images.float().cpu() * 0.5 + 0.5):
        save_image(image, os.path.join(folder, f"{i:06d}.png"))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(args):
    device = ddpm.pick_device(args.device)
    # the network, loaded once (EMA weights); the checkpoint fixes dataset, schedule, T and architecture
    model, ddpm_cfg, shape, _ = ddpm.load_for_sampling(ddpm.Config(
        ckpt=args.ckpt, batch_size=args.batch_size, precision=args.precision, device=args.device, var=args.var))
    model, trained_steps = model.to(device), ddpm.load_checkpoint(args.ckpt, ("step",))["step"]
    ddim_cfg = ddim.Config(**{k: getattr(ddpm_cfg, k) for k in ddim.ARCH_FIELDS}, batch_size=args.batch_size,
                           precision=args.precision, device=args.device, skip=args.skip, clip_x0=args.clip_x0)
    T = ddpm_cfg.timesteps
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "ddim_vs_ddpm")
    settings = [(f"DDPM (σ² = {'β̃' if args.var == 'beta_tilde' else 'β'}, clipped x̂₀)", f"ddpm-T{T}", T,
                 lambda n, g: ddpm.generate(model, ddpm_cfg, n, shape, device, g))]
    for S in args.ddim_steps:
        if S > T:
            print(f"skipping DDIM S = {S}: more than the checkpoint's T = {T}")
            continue
        for eta in args.etas:
            cfg = dataclasses.replace(ddim_cfg, sample_steps=S, eta=eta)
            settings.append((f"DDIM η = {eta:g}, {args.skip} τ{', clipped x̂₀' if args.clip_x0 else ''}",
                             f"ddim-S{S}-eta{eta:g}", S,
                             lambda n, g, cfg=cfg: ddim.generate(model, cfg, n, shape, device, g)))
    measure_name, measure = quality_measure(ddpm_cfg.dataset, args)
    print(f"{args.ckpt} (step {trained_steps}, {ddpm_cfg.dataset}, {ddpm_cfg.schedule} schedule, T = {T}) | "
          f"{args.num_samples} images per setting, batch {args.batch_size}, seed {args.seed} | {device} | "
          f"{'bf16' if ddpm.use_bf16(ddpm_cfg, device) else 'fp32'}", flush=True)

    # warm-up: the first network calls pay for allocation and kernel selection; keep that off the clock
    ddim.generate(model, dataclasses.replace(ddim_cfg, sample_steps=min(5, T)), min(args.batch_size, args.num_samples),
                  shape, device, torch.Generator(device).manual_seed(args.seed)).cpu()
    # DDPM runs last: on our shared 2-core machine the first minute after the warm-up was up to 20%
    # slower; any such slowdown is then charged to the DDIM rows (against the claim under test)
    rows, firsts = {}, {}
    for label, folder, steps, generate in settings[1:] + settings[:1]:
        start = time.perf_counter()
        images = generate(args.num_samples, torch.Generator(device).manual_seed(args.seed)).float().cpu()
        seconds = time.perf_counter() - start  # .cpu() waits for the device: the clock is honest
        save_pngs(images, os.path.join(out, folder))
        firsts[folder] = images[:8]
        quality = f"{measure(images):.2f}" if measure else "n/a"
        rows[folder] = (label, steps, seconds, quality)
        print(f"  {folder}: {seconds:.1f} s, quality {quality}", flush=True)
    rows = [rows[folder] for _, folder, _, _ in settings]  # in table order: DDPM first
    save_image(torch.cat([firsts[folder] for _, folder, _, _ in settings]) * 0.5 + 0.5,
               os.path.join(out, "comparison.png"), nrow=8)

    print(f"\ncommand: python benchmarks/ddim_vs_ddpm.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine(device)}; torch {torch.__version__}")
    print(f"quality: {measure_name}\nimages: {out}/<setting>/, first 8 of each setting (one row each) "
          f"in {out}/comparison.png; quality against network calls in {out}/tradeoff.png\n")
    if measure:
        tradeoff_figure(rows, args.etas, os.path.join(out, "tradeoff.png"), measure_name.split(" (")[0],
                        f"{args.num_samples} samples per point, {args.skip} τ{', clipped x̂₀' if args.clip_x0 else ''}")
    # ms per batched network call should be the same in every row (the samplers differ only in how
    # many calls they make); a row that differs was disturbed by something else running on the machine
    batches = -(-args.num_samples // args.batch_size)
    print("| sampler | network calls per image | seconds | images/s | time ÷ DDPM | ms per call | quality |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ddpm_seconds = rows[0][2]
    for label, steps, seconds, quality in rows:
        print(f"| {label} | {steps} | {seconds:.1f} | {args.num_samples / seconds:.2f} | "
              f"{seconds / ddpm_seconds:.3f} | {1000 * seconds / (steps * batches):.0f} | {quality} |")


if __name__ == "__main__":
    main(parse_args())
