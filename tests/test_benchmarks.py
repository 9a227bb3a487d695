"""The benchmarks run (their figures are printed, never asserted as timings)."""
import re

import numpy as np
import pytest
import torch

from conftest import MNIST_ROOT, needs_mnist, run_script


def test_speed_benchmark_runs_and_prints_its_ratios():
    r = run_script("benchmarks/speed.py", "--size", "mnist-cpu", "--batch-size", "2", "--steps", "1",
                   "--rounds", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for line in ("training-loop overhead", "sampler overhead", "training images/s", "peak memory", "GFLOP"):
        assert line in r.stdout


@needs_mnist
def test_mnist_fid_ranks_real_digits_far_above_noise():
    import sys
    sys.path.insert(0, "benchmarks")
    import mnist_fid
    real = mnist_fid.mnist(MNIST_ROOT, train=True)[0][:500] * 2 - 1
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1)
    scores = [mnist_fid.score(x, MNIST_ROOT) for x in (real, blurred, noise)]
    assert scores[0] < scores[1] < scores[2] and scores[0] < 20, scores
    assert np.isfinite(scores).all()


def test_mnist_fid_strokes_counts_ink_and_grey_pixels():
    import sys
    sys.path.insert(0, "benchmarks")
    import mnist_fid
    x = torch.full((2, 1, 28, 28), -1.0)  # paper everywhere
    assert mnist_fid.strokes(x) == (0.0, 0.0)
    x[0, 0, :14] = 1.0  # half of one image is ink: a quarter of all pixels
    x[1, 0, :7] = 0.5  # an eighth is ink, but not saturated: grey too
    x[1, 0, 7:14] = -0.5  # another eighth is grey on the paper side: not ink
    ink, grey = mnist_fid.strokes(x)
    assert ink == pytest.approx(0.25 + 0.125) and grey == pytest.approx(0.125 + 0.125)


@needs_mnist
def test_mnist_fid_command_prints_the_stroke_statistics(tmp_path):
    """The scorer's command line on a folder of real digits: its ink and grey are the test set's, near enough."""
    import sys
    sys.path.insert(0, "benchmarks")
    import mnist_fid
    from PIL import Image
    for i, image in enumerate(mnist_fid.mnist(MNIST_ROOT, train=True)[0][:200]):
        Image.fromarray((image[0] * 255).round().byte().numpy()).save(tmp_path / f"{i:06d}.png")
    r = run_script("benchmarks/mnist_fid.py", str(tmp_path), "--data-root", MNIST_ROOT)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("ink"))
    ink, grey, real_ink, real_grey = (float(v) for v in re.findall(r"([\d.]+)%", line))
    assert (real_ink, real_grey) == (13.42, 8.59), line
    assert abs(ink - real_ink) < 1.5 and abs(grey - real_grey) < 1.5, line


def test_gpu_check_runs_its_whole_plan_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every check of the GPU plan, on the CPU with tiny networks, so
    that the script is known to work before a GPU is ever lent (compilation skipped: minutes on a CPU)."""
    r = run_script("benchmarks/gpu_check.py", "--dry-run", "--skip", "compile", "--out", str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split(" | ")[0][2:] for line in table[1:]]
    assert checks == ["ddpm.py"] * 2 + ["dcgan.py"] * 2 + ["vae.py"] * 2 + ["vaegan.py"] * 2 + \
        ["ddpm.py under torchrun", "ddpm.py resumed"], checks
    assert all("| NO |" not in line and "FAILED" not in line for line in table), table
    assert "| yes | n steps + --resume" in r.stdout  # the resume check is exact
    for line in ("ddpm.py --sample:", "ddim.py --sample:", "fid.py (random Inception):", "800k DDPM steps"):
        assert line in r.stdout and "FAILED" not in r.stdout.split(line)[1].splitlines()[0], line


def test_plot_metrics_draws_the_named_columns_and_names_a_missing_one(tmp_path):
    """A metrics.csv as the scripts write it: the PNG shows one line per column (its colour is in the
    picture); a column that is not there is one line naming the columns that are."""
    from PIL import Image
    with open(tmp_path / "metrics.csv", "w") as f:
        f.write("step,d_real,d_fake,elapsed_s\n" + "".join(f"{s},{0.9 - s / 1e4},{0.1 + s / 1e4},{s}\n"
                                                         for s in range(100, 1100, 100)))
    out = tmp_path / "d.png"
    r = run_script("benchmarks/plot_metrics.py", str(tmp_path), "d_real", "d_fake", "--out", str(out))
    assert r.returncode == 0, r.stderr
    colors = set(map(tuple, np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).tolist()))
    assert {(31, 119, 180), (214, 39, 40)} <= colors  # the first two series' colours (compare.COLORS)
    r = run_script("benchmarks/plot_metrics.py", str(tmp_path), "d_recon")
    assert r.returncode != 0 and "no column d_recon" in r.stderr and "d_real" in r.stderr
    assert "Traceback" not in r.stderr


def test_speed_baselines_runs_each_scripts_loop_against_its_bare_step():
    """One ratio per script, on the networks of the scripts' own --recipe mnist (the bare steps call the
    scripts' losses with the recipes' flags: a renamed loss, flag or Config field fails here)."""
    import sys
    sys.path.insert(0, "benchmarks")
    import speed_baselines
    import dcgan
    import vae
    import vaegan
    for module in (dcgan, vae, vaegan):  # the recipe's network flags, none of its run flags
        network = speed_baselines.network_of(module)
        assert network and all(module.RECIPES["mnist"][k] == v for k, v in network.items())
        assert not set(network) & {"steps", "device", "precision", "dataset"}
    r = run_script("benchmarks/speed_baselines.py", "--batch-size", "4", "--steps", "1", "--rounds", "1",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "training-loop overhead" in line]
    assert [line.split()[0] for line in lines] == ["dcgan", "vae", "vaegan"], r.stdout
    assert all(float(re.search(r"overhead ([\d.]+)", line)[1]) > 0 for line in lines)


def test_speed_benchmark_builds_the_recipes_network():
    import sys
    sys.path.insert(0, "benchmarks")
    import speed
    import ddpm
    channels, size, network = speed.SIZES["mnist-cpu"]
    model = ddpm.build_model(ddpm.Config(image_size=size, **network), channels)
    assert network == {k: ddpm.RECIPES["mnist-2400"][k] for k in speed.NETWORK}
    assert sum(p.numel() for p in model.parameters()) == 1_112_801  # docs/ddpm.md's 1.11M U-Net


@pytest.fixture(scope="module")
def conditional_mnist_ckpt(tmp_path_factory):
    """A class-conditional ddpm.py run of 2 steps on real MNIST (a tiny U-Net, T = 10): its ckpt.pt."""
    import ddpm
    folder = tmp_path_factory.mktemp("cond")
    ddpm.train(ddpm.Config(dataset="mnist", data_root=MNIST_ROOT, class_cond=True, out=str(folder), steps=2,
                           channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none", timesteps=10,
                           device="cpu", batch_size=4, log_every=1, sample_every=100, warmup=1))
    return str(folder / "ckpt.pt")


def test_guidance_defaults_to_the_weights_it_was_asked_for():
    import sys
    sys.path.insert(0, "benchmarks")
    import guidance
    assert guidance.parse_args(["--ckpt", "x"]).weights == [0, 0.1, 0.2, 0.3, 0.5, 1, 2, 4]


@needs_mnist
def test_guidance_benchmark_prints_its_table_with_ink_and_grey_and_draws_its_figure(conditional_mnist_ckpt, tmp_path):
    import sys
    sys.path.insert(0, "benchmarks")
    import mnist_fid
    from PIL import Image
    r = run_script("benchmarks/guidance.py", "--ckpt", conditional_mnist_ckpt, "--weights", "0,1", "--num-samples",
                   "20", "--batch-size", "10", "--sample-steps", "2", "--data-root", MNIST_ROOT, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 2, T = 10)" in r.stdout and "S = 2" in r.stdout
    lines = r.stdout.splitlines()
    assert "| w | MNIST-FID | the asked digit seen | ink | grey | seconds |" in lines
    rows = [line.strip("|").split("|") for line in lines if re.match(r"\| [\d.]+ \| ", line)]
    assert [float(row[0]) for row in rows] == [0, 1], r.stdout
    for row in rows:  # FID, then three percentages, then seconds
        assert float(row[1]) >= 0 and all(0 <= float(c.strip().rstrip("%")) <= 100 for c in row[2:5]), row
    real_ink, real_grey = mnist_fid.strokes(mnist_fid.mnist(MNIST_ROOT, train=False)[0] * 2 - 1)
    assert f"the MNIST test set: {100 * real_ink:.1f}% and {100 * real_grey:.1f}%" in r.stdout
    assert "guided ÷ unguided" in r.stdout
    # one row per digit; 4 images per weight, side by side: 10 rows of 8 tiles of 28 px (2 px padding)
    with Image.open(tmp_path / "guidance.png") as image:
        assert image.size == (2 + 8 * 30, 2 + 10 * 30)
