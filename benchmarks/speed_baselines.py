"""How close do dcgan.py's, vae.py's and vaegan.py's training loops come to their bare training step?
The same measure as benchmarks/speed.py for ddpm.py, one ratio per script, measured in one run:

  training-loop overhead = time per step of SCRIPT.train()  ÷  the bare step: the same losses, backward
                           passes and fused Adam steps on a batch already in memory (target ≤ 1.10)

The bare steps call the scripts' own loss functions; what the loop adds is drawing the batch, the log
(on-device sums: no synchronisation), the checks of Ctrl-C and of due grids and checkpoints.

usage:
  python benchmarks/speed_baselines.py                       # the three MNIST CPU recipes' networks, batch 128
  python benchmarks/speed_baselines.py --model vaegan --precision bf16 --device cuda

Timings on a shared machine are noisy: each ratio's two sides are measured alternately, in the
same run, several rounds, and the medians are compared.
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcgan  # noqa: E402
import vae  # noqa: E402
import vaegan  # noqa: E402

RUN_FIELDS = ("dataset", "steps", "device", "precision", "log_every", "sample_every", "ckpt_every", "check_every")


def network_of(module) -> dict:
    """The flags of the script's --recipe mnist that shape the network and its losses (not its run: the data,
    the budget, the device, the precision and the schedule of logs, grids, checks and checkpoints)."""
    return {k: v for k, v in module.RECIPES["mnist"].items() if k not in RUN_FIELDS}


RECIPES = {  # the networks of the scripts' MNIST CPU recipes (--recipe mnist); dcgan: no check before the last step
    "dcgan": (dcgan, dict(network_of(dcgan), check_every=10 ** 9, check_n=64)),
    "vae": (vae, network_of(vae)),
    "vaegan": (vaegan, network_of(vaegan)),
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


def bare_step(name, cfg, device):
    """The script's training step without its loop: fixed batches, the same losses, passes and optimisers."""
    m = RECIPES[name][0]
    bf16 = m.use_bf16(cfg, device)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    x = torch.rand(cfg.batch_size, 1, 28, 28, device=device) * 2 - 1
    if name == "dcgan":
        G, D = (net.to(device) for net in m.build_model(cfg, 1))
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)  # dcgan.train()'s Adam
        opt_g, opt_d = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
        z = torch.randn(cfg.batch_size, cfg.latent, 1, 1, device=device)  # (B, latent, 1, 1), as dcgan.train() draws z

        def step():
            with autocast():
                fake = G(z)
                loss_d, _, _ = m.discriminator_loss(D, x, fake.detach())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            D.requires_grad_(False)
            with autocast():
                loss_g = m.generator_loss(D, fake)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            D.requires_grad_(True)
        return step
    model = m.build_model(cfg, 1).to(device).train()
    if name == "vae":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)

        def step():
            with autocast():
                loss, _, _ = m.vae_loss(model, x, cfg.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
    eps, z_prior = torch.randn(2, cfg.batch_size, cfg.latent, device=device)

    def step():
        with autocast():
            losses = m.vaegan_losses(model, x, eps, z_prior, cfg.feature_sigma)
        m.set_gradients(model, losses, cfg.gamma, cfg.adv_weight)
        optimizer.step()
    return step


def loop_step_seconds(name, common, steps, folder, data):
    """Seconds per step of SCRIPT.train() itself, from its metrics.csv: the second interval (after warm-up)."""
    m, recipe = RECIPES[name]
    out = tempfile.mkdtemp(dir=folder)
    cfg = m.Config(dataset=data, out=out, steps=2 * steps, log_every=steps, sample_every=10 ** 9,
                   ckpt_every=10 ** 9, **common, **recipe)
    with contextlib.redirect_stdout(io.StringIO()):
        m.train(cfg)
    rows = open(os.path.join(out, "metrics.csv")).read().splitlines()
    speed = float(rows[2].split(",")[rows[0].split(",").index("images_per_s")])
    return cfg.batch_size / speed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all", choices=("all", *RECIPES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = dcgan.pick_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {name} | torch {torch.__version__} | {torch.get_num_threads()} threads | batch {args.batch_size} | "
          f"{args.precision}")
    folder = tempfile.mkdtemp()
    data = os.path.join(folder, "data.npy")  # a resident 28x28 grey dataset, as MNIST
    np.save(data, np.random.default_rng(0).integers(0, 256, (1024, 28, 28), dtype=np.uint8))
    common = dict(batch_size=args.batch_size, device=str(device), precision=args.precision)
    for model in RECIPES if args.model == "all" else [args.model]:
        m, recipe = RECIPES[model]
        torch.manual_seed(0)
        cfg = m.Config(image_size=28, **common, **recipe)
        step = bare_step(model, cfg, device)
        bare, loop = [], []
        for _ in range(args.rounds):  # alternate the two sides of the ratio
            bare.append(timed(step, device, args.steps))
            loop.append(loop_step_seconds(model, common, args.steps, folder, data))
        b, lo = statistics.median(bare), statistics.median(loop)
        print(f"{model:7s} training step: loop {lo * 1e3:7.1f} ms, bare {b * 1e3:7.1f} ms -> training-loop overhead "
              f"{lo / b:.3f} (target <= 1.10) | {args.batch_size / lo:7.1f} img/s (loop)", flush=True)


if __name__ == "__main__":
    main()
