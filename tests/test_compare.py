"""benchmarks/compare.py: the stability measure against curves whose answer is known, and the smoke
preset end to end (every script trained, sampled and scored; the table, the figures, resuming)."""
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_one_line_error, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare  # noqa: E402

NUMERIC = ("loss CV", "worst quality rise", "training time", "sampling images/s", "parameters")


# --- the stability measure on synthetic loss curves ---
def test_flat_loss_has_zero_cv_and_is_stable():
    steps = np.arange(1, 201) * 100
    result = compare.stability(steps, np.full(200, 0.025), quality=[300.0, 200.0, 150.0, 140.0])
    assert result["cv"] < 1e-12 and result["rise"] == 0 and result["verdict"] == "stable"


def test_noisy_loss_gives_the_cv_of_its_noise_and_ignores_the_first_three_quarters():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 8001)
    mean, sd = 2.0, 0.2  # white noise of relative size 0.1 on a plateau...
    losses = mean + sd * rng.standard_normal(8000)
    losses[:6000] += 50 * np.exp(-steps[:6000] / 500)  # ...after a large transient, outside the last quarter
    result = compare.stability(steps, losses)
    # the CV of n = 2000 iid draws has a standard error of about cv/√(2n) = 0.0016
    assert abs(result["cv"] - sd / mean) < 0.01, result
    assert result["verdict"] == "moderate"  # 0.05 < 0.1 ≤ 0.25
    window = losses[steps > 6000]  # the definition in the docstring, computed here by hand
    assert result["cv"] == pytest.approx(np.sqrt(np.mean((window - window.mean()) ** 2)) / window.mean(), rel=1e-12)


def test_diverging_loss_is_unstable():
    steps = np.arange(1, 401)
    losses = np.where(steps <= 300, 0.03, 0.03 * np.exp((steps - 300) / 20.0))  # blows up in the last quarter
    assert compare.stability(steps, losses)["verdict"] == "unstable"
    nan_tail = np.append(np.full(399, 0.03), np.nan)
    assert compare.stability(steps, nan_tail)["verdict"] == "unstable"


def test_quality_relapse_is_measured_against_the_best_earlier_value():
    assert compare.worst_rise([400, 280, 192, 138, 141, 123, 125, 140, 120]) == pytest.approx(140 / 123 - 1)
    assert compare.worst_rise([5, 4, 3, 2]) == 0  # only improving
    flat = np.full(40, 1.0)
    assert compare.stability(np.arange(40), flat, [100, 50, 40, 80])["verdict"] == "unstable"  # 100% worse
    assert compare.stability(np.arange(40), flat, [100, 50, 40, 46])["verdict"] == "moderate"  # 15% worse
    assert compare.stability(np.arange(40), flat, [100, 50, 40, 42])["verdict"] == "stable"  # 5% worse


def test_grid_tiles_undo_save_grid():
    sys.path.insert(0, ROOT)
    import ddpm
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"grid_{os.getpid()}.png")
    ddpm.save_grid(x, path)
    tiles = compare.grid_tiles(path)
    os.remove(path)
    expected = ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # save_image's rounding
    assert tiles.shape == (64, 1, 28, 28) and torch.equal(tiles, expected)


def test_no_preset_is_one_line_error():
    assert_one_line_error(run_script("benchmarks/compare.py"), "--preset")


# --- the smoke preset, end to end ---
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    start = time.time()
    result = run_script("benchmarks/compare.py", "--smoke", "--out", str(out), "--quiet", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"smoke preset: {time.time() - start:.1f} s")
    return out, result


def table(path):
    """The results table as a list of dicts, one per row (the lines between the header and a blank line)."""
    lines = open(path).read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    assert set(lines[first + 1].replace("|", "").replace("-", "").replace(":", "")) <= {" ", ""}
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells)))
    return header, rows


def expected_models():
    return [m for m in compare.preset_models("smoke", "x.npy", 16) if os.path.exists(os.path.join(ROOT, m.script))]


def test_smoke_writes_a_well_formed_table(smoke):
    out, _ = smoke
    header, rows = table(out / "results.md")
    models = expected_models()
    assert [r["model"] for r in rows] == [m.label for m in models]
    assert header[1] == "random-feature FD"  # the quality column is named after the preset's ruler
    for name in (header[1],) + NUMERIC:
        column = next(c for c in header if c.startswith(name))
        values = [float(r[column]) for r in rows]
        assert all(math.isfinite(v) and v >= 0 for v in values), (column, values)
    assert all(r["training stability"] in ("stable", "moderate", "unstable") for r in rows)
    text = open(out / "results.md").read()
    assert "torch " + torch.__version__ in text and "CPU cores" in text
    assert "python benchmarks/compare.py --smoke" in text
    ddpm_row, ddim_row = rows[0], rows[1]  # DDIM samples the DDPM's checkpoint: same training, same network
    for column in ("parameters (M)", "training time (min)", "loss CV, last 25%"):
        assert ddim_row[column] == ddpm_row[column]


def test_smoke_measures_what_the_scripts_left(smoke):
    out, _ = smoke
    sys.path.insert(0, ROOT)
    import ddpm
    stages = {os.path.basename(p): json.load(open(p)) for p in glob.glob(str(out / "stages" / "*.json"))}
    models = expected_models()
    assert len(stages) == sum(2 if m.source else 3 for m in models)
    # parameters, counted independently: the smoke U-Net built from its flags
    unet = ddpm.UNet(1, 28, channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none", dropout=0)
    assert stages["smoke.ddpm.train.json"]["parameters"] == {"model": sum(p.numel() for p in unet.parameters())}
    import dcgan  # and the GAN's two networks, without BatchNorm's running statistics
    nets = dcgan.build_model(dcgan.Config(image_size=28, g_channels=8, d_channels=8), 1)
    assert stages["smoke.dcgan.train.json"]["parameters"] == {
        "generator": sum(p.numel() for p in nets[0].parameters()),
        "discriminator": sum(p.numel() for p in nets[1].parameters())}
    for m in models:
        sample = stages[f"smoke.{m.key}.sample.json"]
        printed = re.search(r"\(([\d.]+) img/s", open(out / "logs" / f"{m.key}-sample.log").read())[1]
        assert sample["n"] == 16 and sample["images_per_s"] == float(printed)  # the script's own clock
        score = stages[f"smoke.{m.key}.score-random-feature_FD.json"]
        assert score["n"] == 16 and math.isfinite(score["fid"]) and score["fid"] >= 0
        if not m.source:  # one quality value per training-time grid (steps 4 and 8)
            assert [s for s, _ in score["grid_quality"]] == [4, 8]
            assert stages[f"smoke.{m.key}.train.json"]["steps"] == 8


def test_smoke_figures_are_valid_pngs(smoke):
    out, _ = smoke
    trained = [m for m in expected_models() if not m.source]
    with Image.open(out / "losses.png") as image:
        image.verify()
    with Image.open(out / "losses.png") as image:  # one panel per trained model, COLUMNS a row
        assert image.size == (compare.PANEL_W * min(compare.COLUMNS, len(trained)),
                              compare.PANEL_H * math.ceil(len(trained) / compare.COLUMNS))
        assert np.asarray(image).std() > 10  # something is drawn on the white canvas
    with Image.open(out / "samples.png") as image:  # 8x8 grids of 16 samples: 2 rows of 30-pixel tiles
        grid_w, grid_h = 8 * 30 + 2, 2 * 30 + 2
        cells = len(expected_models())
        assert image.width % 3 == 0 and image.width >= (grid_w + 16) * 3  # cells widen for long captions
        assert image.height == (grid_h + 34 + 8) * math.ceil(cells / 3)
    for m in trained:  # the fixed-noise rows at steps 4 and 8, under a title
        with Image.open(out / f"progression_{m.key}.png") as image:
            assert image.size == (80 + 8 * 30 + 2, 24 + 2 * 32)


def test_a_rerun_skips_finished_stages_and_a_killed_training_resumes(smoke):
    out, first = smoke
    before = table(out / "results.md")[1]
    stages = glob.glob(str(out / "stages" / "*.json"))
    # as if a compare run had been killed during dcgan's training: its ckpt.pt is there, its stage file not
    os.remove(out / "stages" / "smoke.dcgan.train.json")
    again = run_script("benchmarks/compare.py", "--smoke", "--out", str(out), "--quiet", timeout=600)
    assert again.returncode == 0, again.stderr
    commands = [line for line in again.stdout.splitlines() if line.startswith("compare: $ python")]
    assert len(commands) == 1 and "dcgan.py" in commands[0] and commands[0].endswith("--resume"), commands
    assert again.stdout.count("done earlier, skipped") == len(stages) - 1  # every other stage
    assert json.load(open(out / "stages" / "smoke.dcgan.train.json"))["resumed"] is True
    assert table(out / "results.md")[1] == before  # the resumed run's metrics.csv tells the same story


@pytest.mark.parametrize("preset", compare.PRESETS)
def test_every_preset_command_is_accepted_by_its_script(preset):
    """gpu-cifar10 cannot run here; its commands (and cpu-mnist's) at least parse, flag for flag."""
    import importlib
    sys.path.insert(0, ROOT)
    for m in expected_models_of(preset):
        script = importlib.import_module(m.script.removesuffix(".py"))
        if m.train:
            cfg = script.parse_args(m.train + ["--data-root", "data", "--out", "x"])
            assert cfg.dataset in ("mnist", "cifar10", "x.npy") and not cfg.sample
        cfg = script.parse_args(["--sample", "--ckpt", "x"] + m.sample + ["--out", "x"])
        assert cfg.sample and cfg.num_samples == {"cpu-mnist": 2000, "gpu-cifar10": 50_000, "smoke": 16}[preset]


def expected_models_of(preset):
    data = {"cpu-mnist": "mnist", "gpu-cifar10": "cifar10", "smoke": "x.npy"}[preset]
    n = {"cpu-mnist": 2000, "gpu-cifar10": 50_000, "smoke": 16}[preset]
    return [m for m in compare.preset_models(preset, data, n) if os.path.exists(os.path.join(ROOT, m.script))]


def test_the_columns_compare_reads_are_in_every_scripts_metrics_csv(smoke):
    """compare.py measures each model on named metrics.csv columns (falling back to "loss" if one is
    missing, which would silently measure the wrong curve): the scripts must keep writing them."""
    out, _ = smoke
    for m in expected_models():
        if not m.source:
            header = open(out / "runs" / m.key / "metrics.csv").readline().strip().split(",")
            assert {m.loss, *m.also} <= set(header), (m.key, header)
