"""Benchmark, not a test: classifier-free guidance on a class-conditional MNIST checkpoint, weight by weight.

For each guidance weight w, the checkpoint's EMA network draws --num-samples images, every class in turn
(so the classes are balanced), with ddim.py's sampler (its flags below; η = 1 and S = T is DDPM's own
posterior step). Each set is scored by the shipped MNIST scorer (benchmarks/mnist_fid.py): its MNIST-FID
against the 10,000 test images, the share of images in which the scorer's classifier sees the digit
that was asked for (its own accuracy on the MNIST test set is 98.7%), and the share of ink and grey
pixels (mnist_fid.strokes: bolder digits have more ink, blurrier ones more grey; the MNIST test set has
13.4% and 8.6%): a strong w can win the classifier and lose the FID by drawing bold, flat strokes.
It also times one guided sampling step against one unguided step at the same batch (guidance runs the
network on the batch twice over), and draws guidance.png: one row per digit, the same noise at each w,
left to right.

    python benchmarks/guidance.py --ckpt runs/ddpm-mnist-cond/ckpt.pt --num-samples 2000
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
from torchvision.utils import save_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live in the repository root; benchmarks may import them
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddim  # noqa: E402
import mnist_fid  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"guidance: {message} (see --help)")  # one line
    parser.add_argument("--ckpt", required=True, help="a class-conditional checkpoint of ddpm.py or ddim.py (MNIST)")
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.5,1,2,4",
                        help="guidance weights w, comma-separated (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=2000, help="images per weight, classes in turn")
    parser.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    parser.add_argument("--sample-steps", type=int, default=ddim.Config.sample_steps, help="ddim.py's S")
    parser.add_argument("--eta", type=float, default=ddim.Config.eta, help="ddim.py's η")
    parser.add_argument("--skip", default=ddim.Config.skip, choices=["uniform", "trailing", "quadratic"], help="ddim.py's τ")
    parser.add_argument("--clip-x0", default=ddim.Config.clip_x0, action=argparse.BooleanOptionalAction,
                        help="clip the predicted x_0 (ddim.py's default)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu", "mps"], help="where to sample")
    parser.add_argument("--data-root", default="data", help="where torchvision keeps MNIST (for the scorer)")
    parser.add_argument("--out", default="", help="where guidance.png goes (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    try:
        args.weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        sys.exit("guidance: --weights are comma-separated numbers, e.g. 0,0.1,0.2,0.3,0.5,1,2,4")
    if min(args.weights) < 0 or args.num_samples < 2 or args.batch_size < 1:
        sys.exit("guidance: need --weights >= 0, --num-samples >= 2 and --batch-size >= 1")
    return args


def main(args):
    device = ddim.pick_device(args.device)
    cfg = ddim.Config(ckpt=args.ckpt, batch_size=args.batch_size, device=args.device, sample_steps=args.sample_steps,
                      eta=args.eta, skip=args.skip, clip_x0=args.clip_x0)
    model, cfg, shape, _ = ddim.load_for_sampling(cfg)
    if not cfg.class_cond or cfg.dataset != "mnist":
        sys.exit(f"guidance: {args.ckpt} is not a class-conditional MNIST checkpoint (train with --class-cond)")
    model, step = model.to(device), ddim.load_checkpoint(args.ckpt, ("step",))["step"]
    labels = ddim.sample_labels(cfg, args.num_samples)  # 0, 1, ..., 9, 0, ...
    print(f"{args.ckpt} (step {step}, T = {cfg.timesteps}) | ddim.py sampler: S = {cfg.sample_steps}, "
          f"η = {cfg.eta:g}, {cfg.skip} τ, clip_x0 {cfg.clip_x0} | {args.num_samples} images per w", flush=True)
    print("| w | MNIST-FID | the asked digit seen | ink | grey | seconds |\n|---:|---:|---:|---:|---:|---:|")
    for w in args.weights:
        start = time.time()
        images = ddim.generate(model, dataclasses.replace(cfg, guidance=w), args.num_samples, shape, device,
                               torch.Generator(device).manual_seed(0), labels=labels, what=f"w = {w:g}").cpu()
        seconds = time.time() - start
        seen, (ink, grey) = mnist_fid.classes(images, args.data_root), mnist_fid.strokes(images)
        print(f"| {w:g} | {mnist_fid.score(images, args.data_root):.2f} | {100 * (seen == labels).float().mean():.1f}% "
              f"| {100 * ink:.1f}% | {100 * grey:.1f}% | {seconds:.0f} |", flush=True)
    ink, grey = mnist_fid.strokes(mnist_fid.mnist(args.data_root, train=False)[0] * 2 - 1)
    print(f"(ink: pixels > 0, grey: |pixel| < 0.8, as mnist_fid.strokes counts them; the MNIST test set: "
          f"{100 * ink:.1f}% and {100 * grey:.1f}%)")

    # --- the cost of guidance: one guided step against one unguided step, the same batch ---
    x, t = torch.randn(args.batch_size, *shape, device=device), torch.full((args.batch_size,), 10, device=device)
    y = labels[:args.batch_size].to(device)

    def per_call(eps_model, repeat=5):
        with torch.no_grad():
            eps_model(x, t)  # warm-up
            start = time.perf_counter()
            for _ in range(repeat):
                eps_model(x, t).cpu()
        return (time.perf_counter() - start) / repeat
    guided, plain = per_call(ddim.guided(model, y, 1.0)), per_call(ddim.guided(model, y, 0.0))
    print(f"\none sampling step at batch {args.batch_size}: guided {guided * 1e3:.0f} ms, unguided {plain * 1e3:.0f} ms "
          f"-> guided ÷ unguided = {guided / plain:.2f}")

    # --- the figure: one row per digit, the same noise at every w ---
    per_w, rows = 4, []
    for k in range(cfg.num_classes):
        for w in args.weights:
            generator = torch.Generator(device).manual_seed(100 + k)  # the same x_T (and z) at every w
            rows.append(ddim.generate(model, dataclasses.replace(cfg, guidance=w), per_w, shape, device, generator,
                                      labels=torch.full((per_w,), k), what=f"figure, digit {k}, w = {w:g}").cpu())
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "guidance.png")
    save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=per_w * len(args.weights))  # [-1, 1] -> [0, 1]
    print(f"wrote {path}: one row per digit; blocks of {per_w} from the same noise at w = "
          f"{', '.join(f'{w:g}' for w in args.weights)}, left to right")


if __name__ == "__main__":
    main(parse_args())
