"""Benchmark (a GPU job): which precision, memory layout and compilation train ddpm.py's paper network fastest.

One prepared call of about 8 minutes on one GPU. It trains the paper's CIFAR-10 U-Net (35.7M parameters) at
batch 128 on synthetic CIFAR-shaped data (random 32x32 RGB images: the speed does not depend on the pixels),
with ddpm.py's own step (draw_batch, diffusion_loss, fused Adam, gradient clipping, the EMA), in every setting of

    precision   fp32 (TF32 matmuls and convolutions, as ddpm.py sets them) | bf16 (autocast)
    layout      NCHW (PyTorch's default) | channels_last (what cuDNN's fast bf16 convolutions want)
    compile     none | torch.compile() | torch.compile(mode="reduce-overhead") (CUDA graphs: fewer launches)

and prints a table: images/s, peak GPU memory, the achieved TFLOP/s and its share of the GPU's dense peak for
that precision (the FLOPs of one step counted by torch's FlopCounterMode, as benchmarks/speed.py does), then
the fastest setting and what the paper's 800k steps would take with it. Last, the samplers' images/s at
batch 256 in the fastest precision and layout: DDIM-50 in full, DDPM-1000 from 100 of its steps (each step
costs the same network call). Settings are run cheapest first; past --budget seconds the rest are skipped
and said so, so one slot always returns a table.

    python benchmarks/gpu_speed.py                 # on a CUDA machine
    python benchmarks/gpu_speed.py --dry-run       # anywhere: the same plan on the CPU, a tiny network,
                                                   # compile with the "eager" backend (tests run this)
"""
import argparse
import copy
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddim  # noqa: E402
import ddpm  # noqa: E402

# Dense (no sparsity) peak TFLOP/s by GPU name, from NVIDIA's data sheets: (bf16, tf32)
PEAKS = {"H200": (989, 495), "H100 PCIe": (756, 378), "H100": (989, 495), "A100": (312, 156), "L4": (121, 60)}
COMPILES = {"none": None, "default": {}, "cuda graphs": {"mode": "reduce-overhead"}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"gpu_speed: {message} (see --help)")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with a tiny network")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (paper: 128)")
    parser.add_argument("--sample-batch", type=int, default=256, help="batch of the sampler timings")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation happens there)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per setting")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which settings are skipped")
    parser.add_argument("--peak-tflops", default="", help="BF16,TF32 dense peaks if the GPU is not in PEAKS")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch_size, args.sample_batch, args.warmup, args.steps = 8, 4, 2, 3
    if min(args.batch_size, args.sample_batch, args.steps) < 1 or args.warmup < 0:
        sys.exit("gpu_speed: --batch-size, --sample-batch and --steps must be >= 1, --warmup >= 0")
    return args


def setup(args):
    """The device, the config of the network (the paper's, or a tiny one for --dry-run), synthetic data."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed: no CUDA GPU here; run it on a GPU machine, or pass --dry-run")
    ddpm.pick_device(device.type)  # TF32 on, as in the scripts
    size = dict(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none") if args.dry_run else {}
    cfg = ddpm.Config(dataset="synthetic", image_size=32, batch_size=args.batch_size, warmup=1, **size)
    data = torch.rand(1024, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)
    return device, cfg, data


def train_speed(args, device, cfg, data, precision, layout, compile_as, flops):
    """(images/s, peak memory in GiB, achieved TFLOP/s) of ddpm.py's training step in one setting."""
    torch.manual_seed(0)
    model = ddpm.build_model(cfg, 3).to(device, memory_format=layout)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    alpha_bar = torch.cumprod(1 - ddpm.make_betas(cfg.schedule, cfg.timesteps), 0).float().to(device)
    options = COMPILES[compile_as]
    torch._dynamo.reset()  # each setting compiles afresh (and never meets dynamo's limit of recompilations)
    net = model if options is None else torch.compile(model, **({"backend": "eager"} if args.dry_run else options))
    data, batches = data.contiguous(memory_format=layout), torch.Generator(device).manual_seed(0)

    def step(i):
        x0, t, eps, y = ddpm.draw_batch(data, None, cfg, batches)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            loss = ddpm.diffusion_loss(net, x0, t, eps, alpha_bar, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - min(0.9999, (1 + i) / (10 + i)))
        return loss
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    if not torch.isfinite(loss):
        sys.exit(f"gpu_speed: the loss is {loss.item()} in {precision}, {layout}, compile {compile_as}")
    seconds = (time.perf_counter() - start) if device.type == "cpu" else (torch.cuda.synchronize() or
                                                                         time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return args.steps * args.batch_size / seconds, memory, flops * args.steps / seconds / 1e12


def step_flops(args, device, cfg, data):
    """FLOPs of one training step (forward and backward) at the training batch, counted on the plain network."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ddpm.build_model(cfg, 3).to(device)
    alpha_bar = torch.cumprod(1 - ddpm.make_betas(cfg.schedule, cfg.timesteps), 0).float().to(device)
    x0, t, eps, y = ddpm.draw_batch(data, None, cfg, torch.Generator(device).manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        ddpm.diffusion_loss(model, x0, t, eps, alpha_bar, y).backward()
    return counter.get_total_flops()


def peaks(args, device):
    """(bf16, tf32) dense peak TFLOP/s of this GPU, or None."""
    if args.peak_tflops:
        return tuple(float(v) for v in args.peak_tflops.split(","))
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    return next((value for key, value in PEAKS.items() if key in name), None)


def sampler_speed(args, device, cfg, precision, layout):
    """images/s of DDIM-50 (T = 1000, in full) and of DDPM-1000 (100 of its steps, times 10) at --sample-batch."""
    torch.manual_seed(0)
    model = ddpm.build_model(cfg, 3).to(device, memory_format=layout).eval()
    shape, speeds = (args.sample_batch, 3, 32, 32), {}
    for name, run in (("DDIM-50", lambda g: ddim.sample(model, shape, ddpm.make_betas("linear", 1000), 50, 0.0,
                                                        generator=g, device=device)),
                      ("DDPM-1000", lambda g: ddpm.sample(model, shape, ddpm.make_betas("linear", 1000)[:100], g,
                                                          device=device))):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            run(torch.Generator(device).manual_seed(0))  # warm-up
            start = time.perf_counter()
            run(torch.Generator(device).manual_seed(1)).float().cpu()  # .cpu() waits for the GPU
        seconds = (time.perf_counter() - start) * (10 if name == "DDPM-1000" else 1)
        speeds[name] = args.sample_batch / seconds
    return speeds


def main(args):
    device, cfg, data = setup(args)
    flops, peak, started = step_flops(args, device, cfg, data), peaks(args, device), time.time()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run, tiny network)"
    millions = sum(p.numel() for p in ddpm.build_model(cfg, 3).parameters()) / 1e6
    print(f"{name} | torch {torch.__version__} | {millions:.1f}M parameters | batch {args.batch_size} | "
          f"{flops / args.batch_size / 1e9:.2f} GFLOP per training image (forward and backward)")
    print("| precision | layout | compile | images/s | peak memory | TFLOP/s | of the dense peak |\n|---|---|---|---:|---:|"
          "---:|---:|")
    rows = []
    # cheapest first (compiling takes a minute or more), then the settings most likely to win
    plan = [(c, p, layout) for c, layout, p in itertools.product(COMPILES, ("channels_last", "NCHW"), ("bf16", "fp32"))]
    for compile_as, precision, layout in plan:
        if time.time() - started > args.budget:
            print(f"| {precision} | {layout} | {compile_as} | skipped: past --budget {args.budget:g} s | | | |")
            continue
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        speed, memory, tflops = train_speed(args, device, cfg, data, precision, memory_format, compile_as, flops)
        share = f"{tflops / peak[precision == 'fp32']:.1%}" if peak else "n/a"
        print(f"| {precision} | {layout} | {compile_as} | {speed:.0f} | {memory:.2f} GiB | {tflops:.3g} | {share} |"
              .replace("nan GiB", "n/a"), flush=True)
        rows.append((speed, precision, layout, compile_as))
    speed, precision, layout, compile_as = max(rows)
    base = next((r[0] for r in rows if r[1:] == ("fp32", "NCHW", "none")), None)  # the 1821 on an H200
    print(f"\nfastest: {precision}, {layout}, compile {compile_as}: {speed:.0f} images/s"
          + (f", {speed / base:.2f}x fp32 NCHW without compile" if base else "")
          + f"; the paper's 800k steps of 128 would take {800_000 * 128 / speed / 3600:.1f} h")
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    speeds = sampler_speed(args, device, cfg, precision, memory_format)
    print(f"sampling at batch {args.sample_batch} ({precision}, {layout}, no compile): "
          + ", ".join(f"{k} {v:.1f} images/s" for k, v in speeds.items()))


if __name__ == "__main__":
    main(parse_args())
