"""How close do ddpm.py's training loop and sampler come to the bare network? Ratios measured in one run.

  training-loop overhead = time per step of ddpm.train()  ÷  bare forward + backward + Adam step
                           on a batch already in memory (target ≤ 1.10)
  sampler overhead       = time per step of ddpm.sample() ÷  one bare forward at the same batch
                           (target ≤ 1.03)
  plus training images/s and peak memory of the chosen network, and the achieved FLOP/s of a
  training step ÷ the machine's measured matmul FLOP/s (how much of the hardware we use).

usage:
  python benchmarks/speed.py                           # the paper's CIFAR-10 network (35.7M)
  python benchmarks/speed.py --size mnist-cpu --batch-size 64 --precision bf16   # ddpm.py --recipe mnist-2400's

Timings on a shared machine are noisy: each ratio's two sides are measured alternately, in the
same run, several rounds, and the medians are compared.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402

NETWORK = ("channels", "channel_mult", "num_res_blocks", "attn_res", "dropout")  # the Config fields of the U-Net
SIZES = {  # name -> (image channels, image size, the U-Net's Config fields)
    "cifar10": (3, 32, {}),  # the paper's network, 35.7M parameters
    "mnist": (1, 28, {}),  # ddpm.py's default for 28x28 grey, 6.5M
    "mnist-cpu": (1, 28, {k: v for k, v in ddpm.RECIPES["mnist-2400"].items() if k in NETWORK}),  # mnist-2400: 1.11M
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="cifar10", choices=SIZES)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 128 on CUDA, 16 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (as ddpm.py --compile)")
    args = parser.parse_args()
    device = ddpm.pick_device(args.device)
    channels, size, kwargs = SIZES[args.size]
    batch = args.batch_size or (128 if device.type == "cuda" else 16)
    cfg = ddpm.Config(precision=args.precision)
    bf16 = ddpm.use_bf16(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {name} | torch {torch.__version__} | {args.size} network | batch {batch} | "
          f"{'bf16' if bf16 else 'fp32'}{' | compiled' if args.compile else ''}")

    # --- the bare reference: forward + backward + Adam on a resident batch, and a bare forward ---
    torch.manual_seed(0)
    model = ddpm.build_model(ddpm.Config(image_size=size, **kwargs), channels).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    net = torch.compile(model) if args.compile else model  # shares the weights with `model`
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # the optimizer ddpm.train() uses
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def bare_train_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(net(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def bare_forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model(x, t)

    # --- the real thing: ddpm.train() on a resident dataset, speed read from its metrics.csv ---
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "data.npy")
    np.save(data, np.random.default_rng(0).integers(0, 256, (512, size, size, channels), dtype=np.uint8))

    def loop_step_seconds(round_index):
        out = os.path.join(tmp, f"run{round_index}")
        n = args.steps
        ddpm.train(ddpm.Config(dataset=data, out=out, steps=2 * n, log_every=n, sample_every=10 ** 9,
                               ckpt_every=10 ** 9, batch_size=batch, timesteps=2, device=str(device),
                               precision=args.precision, compile=args.compile, **kwargs))
        rows = [row.split(",") for row in open(os.path.join(out, "metrics.csv")).read().splitlines()]
        return batch / float(rows[2][rows[0].index("images_per_s")])  # the second interval: after warm-up

    # --- the sampler: ddpm.sample() over T steps vs T bare forwards ---
    T = 20
    betas = ddpm.make_betas("linear", T)
    ema = model.eval()

    def sampler_step_seconds():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            ddpm.sample(ema, x.shape, betas, device=device)
            sync(device)
        return (time.perf_counter() - start) / T

    import contextlib
    import io
    bare, loop, fwd, samp = [], [], [], []
    for r in range(args.rounds):  # alternate the two sides of each ratio
        model.train()
        bare.append(timed(bare_train_step, device, args.steps))
        with contextlib.redirect_stdout(io.StringIO()):
            loop.append(loop_step_seconds(r))
        model.eval()
        fwd.append(timed(bare_forward, device, args.steps))
        samp.append(sampler_step_seconds())
    med = statistics.median
    print(f"training step: loop {med(loop) * 1e3:.1f} ms, bare {med(bare) * 1e3:.1f} ms "
          f"-> training-loop overhead {med(loop) / med(bare):.3f} (target <= 1.10)")
    print(f"sampling step: sampler {med(samp) * 1e3:.1f} ms, bare forward {med(fwd) * 1e3:.1f} ms "
          f"-> sampler overhead {med(samp) / med(fwd):.3f} (target <= 1.03)")
    print(f"training images/s: {batch / med(loop):.1f} (loop), {batch / med(bare):.1f} (bare)")

    # --- peak memory and the share of the machine's FLOP/s a training step achieves ---
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB (CUDA, allocated)")
    else:
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB "
              f"(whole process, max resident set)")
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:  # on the uncompiled network: the FLOPs are the same
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            F.mse_loss(model(x, t), x).backward()
    flops = counter.get_total_flops()
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    matmul = 2 * n ** 3 / timed(lambda: a @ a, device, 10)
    achieved = flops / med(loop)  # by ddpm.train() itself
    print(f"training step: {flops / 1e9:.1f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s achieved by the loop; "
          f"{n}x{n} matmul: {matmul / 1e9:.1f} GFLOP/s -> {achieved / matmul:.2f} of the matmul rate")


if __name__ == "__main__":
    main()
