"""benchmarks/compare.py: the stability measure and the training time against cases whose answer is known,
the smoke preset end to end (every script trained, sampled and scored; the table, the figures, resuming),
and the other presets' commands (cpu-mnist: the scripts' own recipes) parsed by their scripts."""
import glob
import json
import math
import os
import re
import shutil
import sys
import time
import types

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


@pytest.mark.parametrize("n", [64, 80])  # 80: a class-conditional DDPM's grid, 8 images of each of 10 classes
def test_grid_tiles_undo_the_scripts_save_image(tmp_path, n):
    from torchvision.utils import save_image
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_image(x * 0.5 + 0.5, tmp_path / "step_0000004.png")  # as the scripts save samples/step_N.png
    tiles = compare.grid_tiles(str(tmp_path / "step_0000004.png"))
    expected = ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)  # save_image's rounding
    assert tiles.shape == (n, 1, 28, 28) and torch.equal(tiles, expected)


def rows_of(*segments):
    """metrics.csv rows: each segment a list of (step, elapsed_s), its clock started at its own start."""
    return [{"step": str(step), "elapsed_s": str(elapsed)} for segment in segments for step, elapsed in segment]


def test_training_time_adds_up_the_segments_of_a_resumed_run():
    # 400 steps in 40 s, checkpoint at 400, killed at 600: the resumed script dropped the rows of 500 and 600
    # (trained again) and restarted its clock at the checkpoint; 400 more steps took 41 s
    rows = rows_of([(100, 10), (200, 20), (300, 30), (400, 40)], [(500, 11), (600, 21), (700, 31), (800, 41)])
    assert compare.loop_seconds(rows) == 81 and compare.loop_seconds(rows, [400]) == 81
    assert compare.loop_seconds(rows[:4]) == 40  # one segment: its last elapsed_s
    # a short segment (resumed at 200, stopped at 300 by Ctrl-C with a checkpoint there, 5 s), then another
    # resume whose first row came at 12 s: its clock never fell below the previous one's. The steps compare
    # resumed from mark the segments; the clock alone would miss one
    rows = rows_of([(100, 10), (200, 20)], [(300, 5)], [(400, 12)])
    assert compare.loop_seconds(rows, [200, 300]) == 20 + 5 + 12
    assert compare.loop_seconds(rows) == 20 + 12


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
    # parameters, counted independently: the smoke U-Net built from the preset's own flags
    flags = {m.key: m.train for m in models}
    unet = ddpm.build_model(ddpm.dataclasses.replace(ddpm.parse_args(flags["ddpm"]), image_size=28), 1)
    assert stages["smoke.ddpm.train.json"]["parameters"] == {"model": sum(p.numel() for p in unet.parameters())}
    import dcgan  # and the GAN's two networks, without BatchNorm's running statistics
    nets = dcgan.build_model(dcgan.dataclasses.replace(dcgan.parse_args(flags["dcgan"]), image_size=28), 1)
    assert stages["smoke.dcgan.train.json"]["parameters"] == {
        "generator": sum(p.numel() for p in nets[0].parameters()),
        "discriminator": sum(p.numel() for p in nets[1].parameters())}
    # dcgan.py's own check (quality.csv: step,proxy), read back beside compare's ruler; the others keep none
    checks = stages["smoke.dcgan.train.json"]["own_checks"]
    assert checks["column"] == "proxy" and [s for s, _ in checks["rows"]] == [4, 8]
    assert all(math.isfinite(v) for _, v in checks["rows"])
    assert all(stages[f"smoke.{k}.train.json"]["own_checks"] == {} for k in ("ddpm", "vae", "vaegan"))
    assert "the script's own check (quality.csv, proxy): best" in open(out / "results.md").read()
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


def test_a_training_killed_after_its_checkpoint_resumes_and_its_time_adds_up(smoke):
    """A run killed after its checkpoint at step 4, having logged steps 5 and 6: compare resumes it, the
    script drops those two rows and logs them again with its clock restarted, and the training time is the
    two segments' clocks added up (the dropped rows' 3000 s would show)."""
    out, _ = smoke
    vae_model = next(m for m in compare.preset_models("smoke", str(out / "data" / "smoke.npy"), 16) if m.key == "vae")
    run_dir = out / "runs" / "vae"
    for path in glob.glob(str(out / "stages" / "smoke.vae.*")):
        os.remove(path)
    shutil.rmtree(run_dir)
    killed = run_script("vae.py", *vae_model.train, "--steps", "4", "--out", str(run_dir))  # ckpt.pt at step 4
    assert killed.returncode == 0, killed.stderr
    header = open(run_dir / "metrics.csv").readline().strip().split(",")
    with open(run_dir / "metrics.csv", "a") as f:  # what the killed run logged after its checkpoint
        for step, elapsed in ((5, 1000.0), (6, 2000.0)):
            f.write(",".join(str({"step": step, "elapsed_s": elapsed}.get(c, 1.0)) for c in header) + "\n")
    again = run_script("benchmarks/compare.py", "--smoke", "--out", str(out), "--quiet", timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    commands = [line for line in again.stdout.splitlines() if line.startswith("compare: $ python")]
    assert len(commands) == 2 and commands[0].startswith("compare: $ python vae.py --dataset") \
        and commands[0].endswith("--resume") and "vae.py --sample" in commands[1], commands
    rows = compare.read_metrics(str(run_dir))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # steps 5 and 6 logged once, by the resumed run
    train = json.load(open(out / "stages" / "smoke.vae.train.json"))
    assert train["resumed"] is True and train["resumed_at"] == [4] and train["steps"] == 8
    assert train["train_s"] == pytest.approx(float(rows[3]["elapsed_s"]) + float(rows[7]["elapsed_s"]))
    assert 0 < train["train_s"] < 1000
    vae_row = next(r for r in table(out / "results.md")[1] if r["model"] == vae_model.label)
    assert float(vae_row["training time (min)"]) == round(train["train_s"] / 60, 1)
    assert any(line.strip().startswith("python vae.py --dataset") and line.endswith("# resumed with --resume")
               for line in open(out / "results.md").read().splitlines())


@pytest.mark.parametrize("preset", compare.PRESETS)
def test_every_preset_command_is_accepted_by_its_script(preset):
    """cpu-mnist and gpu-cifar10 cannot run here: the very commands compare would run (train_command,
    sample_command) parse in their scripts, flag for flag, with the data root, run folder and sample count
    compare adds."""
    import importlib
    sys.path.insert(0, ROOT)
    args = types.SimpleNamespace(data_root="/data", out="/out", preset=preset)
    for m in expected_models_of(preset):
        script = importlib.import_module(m.script.removesuffix(".py"))
        run_dir = f"/out/runs/{m.key}"
        if m.train:
            command = compare.train_command(m, run_dir, args)
            assert command[1] == m.script
            cfg = script.parse_args(command[2:])
            assert not cfg.sample and cfg.data_root == "/data" and cfg.out == run_dir
            assert cfg.dataset == {"cpu-mnist": "mnist", "gpu-cifar10": "cifar10", "smoke": "x.npy"}[preset]
        command = compare.sample_command(m, f"/out/runs/{m.source or m.key}/{m.ckpt}", run_dir)
        cfg = script.parse_args(command[2:])
        assert cfg.sample and cfg.ckpt.endswith(m.ckpt) and cfg.out == run_dir
        assert cfg.num_samples == {"cpu-mnist": 2000, "gpu-cifar10": 50_000, "smoke": 16}[preset]


def test_cpu_mnist_trains_and_samples_with_the_scripts_recipes():
    """cpu-mnist's training commands are `SCRIPT.py --recipe NAME` and what compare must add (--out,
    --data-root; DDPM's --schedule), so a recipe changed in its script changes the preset with it; the
    DDIM row samples with ddim.py's recipe, and the labels say what the recipes set."""
    import ddim
    import ddpm
    import importlib
    args = types.SimpleNamespace(data_root="/data", out="/out", preset="cpu-mnist")
    models = {m.key: m for m in expected_models_of("cpu-mnist")}
    recipes = {"ddpm-cosine": "mnist-2400", "ddpm-linear": "mnist-2400", "dcgan": "mnist", "vae": "mnist",
               "vaegan": "mnist"}
    assert set(models) == set(recipes) | {"ddim"}
    for key, name in recipes.items():
        m, script = models[key], importlib.import_module(models[key].script.removesuffix(".py"))
        command = compare.train_command(m, f"/out/runs/{key}", args)
        added = {"ddpm-cosine": ["--schedule", "cosine"], "ddpm-linear": ["--schedule", "linear"]}.get(key, [])
        assert command[2:] == ["--recipe", name, *added, "--data-root", "/data", "--out", f"/out/runs/{key}"]
        cfg = script.parse_args(command[2:])  # every flag of the recipe, but the schedule DDPM's rows choose
        assert all(getattr(cfg, k) == v for k, v in script.RECIPES[name].items() if k != "schedule"), key
        assert compare.shown(command) == " ".join(  # as results.md lists it
            ["python", m.script, "--recipe", name, *added, "--data-root", "/data", "--out", f"/out/runs/{key}"])
    for s in ("cosine", "linear"):  # DDPM: the recipe's sampler (T steps, bf16, batch 64), σ² = β̃
        cfg = ddpm.parse_args(compare.sample_command(models[f"ddpm-{s}"], "c", "o")[2:])
        assert cfg.recipe == "mnist-2400" and cfg.var == "beta_tilde" and cfg.precision == "bf16"
        assert f"T = {ddpm.RECIPES['mnist-2400']['timesteps']}" in models[f"ddpm-{s}"].label
    ddim_row = models["ddim"]  # the cosine checkpoint, sampled with ddim.py --recipe mnist-2400
    command = compare.sample_command(ddim_row, "/out/runs/ddpm-cosine/ckpt.pt", "/out/runs/ddim")
    assert ddim_row.source == "ddpm-cosine" and command[2:] == [
        "--sample", "--ckpt", "/out/runs/ddpm-cosine/ckpt.pt", "--recipe", "mnist-2400", "--num-samples", "2000",
        "--out", "/out/runs/ddim"]
    cfg, recipe = ddim.parse_args(command[2:]), ddim.RECIPES["mnist-2400"]
    assert all(getattr(cfg, k) == v for k, v in recipe.items())
    assert f"{cfg.sample_steps} steps, η = {cfg.eta:g}, {cfg.skip} τ" in ddim_row.label and cfg.clip_x0


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
