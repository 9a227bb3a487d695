"""Draw columns of a run's metrics.csv against the training step, as one PNG (Pillow only).

usage:
  python benchmarks/plot_metrics.py RUN_DIR d_real d_recon d_prior --out d.png   # VAE-GAN: is the game on?
  python benchmarks/plot_metrics.py runs/dcgan-mnist d_real d_fake --out d.png   # DCGAN: D on real and fake

Each named column is one line in one panel, so quantities on one scale (D's three probabilities, a
network's losses) can be read side by side; the last quarter of training is shaded, as in compare.py.
"""
import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (its Pillow panel: the same look as compare.py's losses.png)


def read_columns(run_dir: str, columns: list) -> tuple:
    """The steps and each column's values of RUN_DIR/metrics.csv; one line naming what is missing."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        sys.exit(f"plot_metrics: {path} does not exist; pass the run directory a training script wrote")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        have = ", ".join(rows[0]) if rows else "no rows"
        sys.exit(f"plot_metrics: {path} has no column {', '.join(missing)} (it has: {have})")
    steps = [int(r["step"]) for r in rows]
    return steps, {c: [float(r[c]) if r[c] else math.nan for r in rows] for c in columns}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory with metrics.csv")
    parser.add_argument("columns", nargs="+", help="metrics.csv columns to draw, in one panel")
    parser.add_argument("--out", default="", help="the PNG to write (default: RUN_DIR/metrics_<columns>.png)")
    parser.add_argument("--title", default="", help="the panel's title (default: the run directory)")
    args = parser.parse_args(argv)
    steps, values = read_columns(args.run_dir, args.columns)
    out = args.out or os.path.join(args.run_dir, f"metrics_{'_'.join(args.columns)}.png")
    series = [(c, steps, values[c]) for c in args.columns]
    compare.losses_figure([(args.title or os.path.basename(os.path.normpath(args.run_dir)), ", ".join(args.columns),
                            series, max(steps))], out)
    print(f"plot_metrics: {len(steps)} rows of {', '.join(args.columns)} -> {out}")


if __name__ == "__main__":
    main()
