"""ddpm.py: the math against closed forms, the network, and the script end to end."""
import csv
import dataclasses
import math
import os
import socket

import numpy as np

import pytest
import torch

import ddpm
from conftest import HAVE_MNIST, MNIST_ROOT, assert_one_line_error, needs_mnist, run_in_process

TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none", "--timesteps", "10",
        "--device", "cpu", "--batch-size", "8", "--warmup", "1"]


# --------------------------------------------------------------------------------------------
# 1. Math against closed forms
# --------------------------------------------------------------------------------------------
def test_linear_schedule_endpoints_and_spacing():
    betas = ddpm.make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15) and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # T = 300 (the seed study): endpoints scaled by 1000/T, so the chain still ends in noise
    short = ddpm.make_betas("linear", 300)
    assert short[0].item() == pytest.approx(1e-4 * 1000 / 300) and short[-1].item() == pytest.approx(0.02 * 1000 / 300)
    for b in (betas, short):
        assert torch.cumprod(1 - b, 0)[-1].item() < 1e-4


@pytest.mark.parametrize("T,expected", [(100, 2.0e-5), (300, 3.4e-5), (1000, 4.0e-5)])
def test_the_scaled_linear_schedule_ends_at_2_to_4e_5_as_the_header_says(T, expected):
    alpha_bar_T = torch.cumprod(1 - ddpm.make_betas("linear", T), 0)[-1].item()
    assert alpha_bar_T == pytest.approx(expected, rel=0.05) and 2e-5 * 0.95 < alpha_bar_T < 4e-5 * 1.05


def test_cosine_schedule_matches_closed_form_and_cap():
    T, s = 1000, 0.008
    betas = ddpm.make_betas("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0)
    for t in (1, 10, 250, 500, 900, 990):  # ᾱ after t steps is f(t)/f(0) while no β is capped
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # the cap is reached at the very end...
    assert betas[-1].item() == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()  # ...and nowhere else
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0))
    with pytest.raises(ValueError):
        ddpm.make_betas("quadratic", 10)


def test_timestep_embedding_formula():
    emb = ddpm.timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = [10000 ** (-i / 3) for i in range(4)]
    expected = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_q_sample_equals_iterating_one_step_forward():
    """q(x_t | x_0) in closed form = applying q(x_t | x_{t−1}) t times, in distribution."""
    torch.manual_seed(0)
    betas = ddpm.make_betas("cosine", 50)
    alpha_bar = torch.cumprod(1 - betas, 0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    x = x0.clone()
    for t in range(30):  # x_t = √(1−β_t) x_{t−1} + √β_t ε
        x = (1 - betas[t]).sqrt().float() * x + betas[t].sqrt().float() * torch.randn_like(x)
    direct = ddpm.q_sample(x0, torch.full((200_000,), 29), torch.randn_like(x0), alpha_bar)
    for sample in (x, direct):
        assert sample.mean().item() == pytest.approx(alpha_bar[29].sqrt().item() * 0.7, abs=0.01)
        assert sample.var().item() == pytest.approx(1 - alpha_bar[29].item(), rel=0.02)


def test_posterior_mean_and_variance_by_bayes_rule():
    """q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) · q(x_{t−1} | x_0): a product of two Gaussians."""
    betas = ddpm.make_betas("linear", 100)
    alpha_bar = torch.cumprod(1 - betas, 0).tolist()
    x0, x_t = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    for t in (1, 10, 99):
        b, a_prev = betas[t].item(), alpha_bar[t - 1]
        precision = 1 / (1 - a_prev) + (1 - b) / b  # of x_{t−1}: prior N(√ᾱ_{t−1} x_0, 1−ᾱ_{t−1}), likelihood N(x_t; √α_t x_{t−1}, β_t)
        mean = (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(1 - b) * x_t / b) / precision
        got_mean, got_var = ddpm.q_posterior(x0, x_t, t, betas)
        assert got_var == pytest.approx(1 / precision, rel=1e-9)
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-9)
    assert ddpm.q_posterior(x0, x_t, 0, betas)[1] == 0  # at t = 0 the posterior is the point x_0


def gaussian_eps_model(mu, s, betas):
    """The exact ε-predictor for data x_0 ~ N(mu, s²) per pixel:
    x_t ~ N(√ᾱ mu, ᾱ s² + 1 − ᾱ)  ⇒  E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ)."""
    alpha_bar = torch.cumprod(1 - betas, 0)

    def eps_model(x, t):
        a = alpha_bar[t].float()[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps_model


@pytest.mark.parametrize("schedule,var", [("linear", "beta"), ("cosine", "beta_tilde"), ("cosine", "beta")])
def test_sampler_with_exact_model_returns_the_data_law(schedule, var):
    mu, s = 0.3, 0.5
    betas = ddpm.make_betas(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    x = ddpm.sample(gaussian_eps_model(mu, s, betas), (4000, 1, 2, 2), betas, g, var=var, clip_x0=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.04)


def test_sampler_is_algorithm_2_step_by_step():
    """Unclipped, each step is x_{t−1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε_θ) + σ_t z, no z at the end."""
    T = 50
    betas = ddpm.make_betas("linear", T)
    alpha_bar = torch.cumprod(1 - betas, 0)
    eps_model = lambda x, t: torch.sin(3 * x) + 0.1 * t[:, None, None, None]  # noqa: E731  any fixed function
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    for var in ("beta", "beta_tilde"):
        got = ddpm.sample(eps_model, x_T.shape, betas, torch.Generator().manual_seed(5), x_T=x_T, var=var,
                          clip_x0=False)
        g, x = torch.Generator().manual_seed(5), x_T.double()
        for t in reversed(range(T)):
            eps = eps_model(x, torch.full((3,), t))
            x = (x - betas[t] / (1 - alpha_bar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
            if t > 0:
                sigma2 = betas[t] if var == "beta" else (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * betas[t]
                x = x + sigma2.sqrt() * torch.randn(x.shape, generator=g).double()
        assert torch.allclose(got.double(), x, rtol=1e-4, atol=1e-4)


def test_sampler_is_reproducible_and_uses_x_T():
    betas = ddpm.make_betas("cosine", 20)
    model = lambda x, t: 0.5 * x  # noqa: E731
    a = ddpm.sample(model, (2, 3, 4, 4), betas, torch.Generator().manual_seed(3))
    b = ddpm.sample(model, (2, 3, 4, 4), betas, torch.Generator().manual_seed(3))
    c = ddpm.sample(model, (2, 3, 4, 4), betas, torch.Generator().manual_seed(3), x_T=torch.zeros(2, 3, 4, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clipping_keeps_predicted_x0_in_range():
    betas = ddpm.make_betas("linear", 10)
    seen = []
    ddpm.sample(lambda x, t: -5 * x, (2, 1, 4, 4), betas, torch.Generator().manual_seed(0),
                on_step=lambda t, x, x0: seen.append(x0.abs().max().item()))
    assert len(seen) == 10 and max(seen) <= 1.0


# --------------------------------------------------------------------------------------------
# The network and the objective
# --------------------------------------------------------------------------------------------
def small_cfg(**kw):
    return ddpm.Config(**{**dict(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="none", dropout=0.0,
                                timesteps=10, device="cpu", batch_size=4, sample_every=100, warmup=1), **kw})


def test_paper_cifar10_network_has_35_7M_parameters():
    model = ddpm.build_model(ddpm.Config(image_size=32), 3)  # the defaults for 32x32 RGB
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) < 0.2e6, n
    assert len([m for m in model.modules() if isinstance(m, ddpm.Attention)]) == 6  # at 16 px (4 up, 2 down), + mid


@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1), (16, 3), (16, 1)])
def test_unet_shapes_and_identity_start(size, channels):
    model = ddpm.build_model(ddpm.Config(image_size=size, channels=32, num_res_blocks=1), channels)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert out.abs().max() == 0  # the output convolution starts at zero: ε̂ = 0 before training


@pytest.mark.parametrize("flags,words", [(dict(image_size=28, channel_mult="1,2,2,2"), "halve 28 px"),
                                         (dict(image_size=16, channels=7), "even"),
                                         (dict(image_size=16, channels=2), "even and >= 4"),
                                         (dict(image_size=16, channel_mult="1,x"), "--channel-mult")])
def test_a_network_that_cannot_be_built_is_one_line(flags, words):
    with pytest.raises(SystemExit, match=words):
        ddpm.build_model(ddpm.Config(**flags), 1)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ddpm.build_model(ddpm.Config(image_size=16, channels=32, channel_mult="1,2", num_res_blocks=1,
                                         dropout=0.0), 1)
    alpha_bar = torch.cumprod(1 - ddpm.make_betas("linear", 100), 0)
    x0 = torch.rand(16, 1, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(1)
    t_fixed, eps_fixed = torch.randint(0, 100, (16,), generator=g), torch.randn(x0.shape, generator=g)

    def loss_at_fixed_noise():  # the same t and ε each time we evaluate
        with torch.no_grad():
            return ddpm.diffusion_loss(model, x0, t_fixed, eps_fixed, alpha_bar).item()
    before = loss_at_fixed_noise()
    for _ in range(15):
        loss = ddpm.diffusion_loss(model, x0, torch.randint(0, 100, (16,)), torch.randn_like(x0), alpha_bar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_at_fixed_noise() < 0.8 * before
    assert before == pytest.approx(1.0, abs=0.1)  # ε̂ = 0 at the start: the loss is E‖ε‖² per pixel = 1


# --------------------------------------------------------------------------------------------
# 2. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_its_files_then_samples_and_visualizes(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_in_process("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout
    for f in ("config.json", "ckpt.pt", "metrics.csv", "samples/step_0000002.png", "samples/step_0000004.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert list(rows[0]) == ["step", "loss", "lr", "images_per_s", "elapsed_s"]
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"model", "ema", "optimizer", "rng_cpu", "config", "script"}

    r = run_in_process("ddpm.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    pngs = sorted(os.listdir(os.path.join(out, "generated")))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    assert Image.open(os.path.join(out, "generated", pngs[0])).size == (16, 16)
    assert os.path.isfile(os.path.join(out, "generated_grid.png"))

    r = run_in_process("ddpm.py", "--visualize", "--ckpt", os.path.join(out, "ckpt.pt"), "--dataset", tiny_npy,
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "forward.png")) and os.path.isfile(os.path.join(out, "reverse.png"))
    gif = Image.open(os.path.join(out, "reverse.gif"))
    assert gif.n_frames >= 10  # the reverse chain as a film: T = 10 steps, the last one held


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_npy):
    """Six steps in one go = three steps, a stop, and three more after --resume (bit for bit)."""
    common = dict(dataset=tiny_npy, log_every=1, warmup=3, dropout=0.1)  # dropout: the random state is restored too
    ddpm.train(small_cfg(out=str(tmp_path / "a"), steps=6, **common))
    ddpm.train(small_cfg(out=str(tmp_path / "b"), steps=3, **common))
    ddpm.train(small_cfg(out=str(tmp_path / "b"), steps=6, resume=True, **common))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]


OLD_CONFIG = {  # ddpm.py's Config as the previous version (2026-12-07) wrote it into every checkpoint
    'dataset': 'x.npy', 'data_root': 'data', 'image_size': 16, 'schedule': 'linear', 'timesteps': 10, 'var': 'beta',
    'clip_x0': True, 'channels': 8, 'channel_mult': '1,2', 'num_res_blocks': 1, 'attn_res': 'none', 'dropout': 0.0,
    'class_cond': False, 'num_classes': 0, 'labels': '', 'p_uncond': 0.1, 'guidance': 0.5, 'label': -1, 'steps': 3,
    'batch_size': 4, 'lr': 0.0002, 'warmup': 1, 'lr_decay': 'none', 'grad_clip': 1.0, 'ema_decay': 0.9999, 'out': '',
    'device': 'cpu', 'precision': 'auto', 'compile': False, 'seed': 0, 'log_every': 100, 'sample_every': 10000,
    'ckpt_every': 5000, 'resume': False, 'ckpt': '', 'sample': False, 'num_samples': 64, 'fid': 0, 'fid_weights': '',
    'visualize': False}


def old_checkpoint(path, dataset="x.npy", script="ddpm"):
    """A checkpoint in the previous version's layout: its keys (warmup, log_sums), its config's fields."""
    cfg = ddpm.Config(**{k: v for k, v in OLD_CONFIG.items() if k in ddpm.ARCH_FIELDS})
    model = ddpm.build_model(cfg, 3)
    optimizer = torch.optim.Adam(model.parameters())
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "optimizer": optimizer.state_dict(),
                "warmup": {"base_lrs": [2e-4], "last_epoch": 3}, "rng_batches": torch.Generator().get_state(),
                "step": 3, "config": dict(OLD_CONFIG, dataset=dataset), "script": script, "log_sums": (None, 0),
                "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.empty(0)}, path)


@pytest.mark.parametrize("script", ["ddpm.py", "ddim.py"])
def test_checkpoints_of_the_previous_version_still_sample_and_visualize(tmp_path, script, tiny_npy):
    old_checkpoint(tmp_path / "ckpt.pt", tiny_npy)
    r = run_in_process(script, "--sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "3", "--device", "cpu",
                   "--sample-steps" if script == "ddim.py" else "--seed", "5", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "s" / "generated")) == 3
    r = run_in_process(script, "--visualize", "--ckpt", str(tmp_path / "ckpt.pt"), "--device", "cpu",
                   "--sample-steps" if script == "ddim.py" else "--seed", "5", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "v" / "reverse.gif")


def test_training_refuses_to_overwrite_a_run(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    args = ["ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY]
    assert run_in_process(*args).returncode == 0
    assert_one_line_error(run_in_process(*args), "--resume")
    # a checkpoint without the training state is refused in one line, not a KeyError
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    del state["rng_batches"]
    torch.save(state, os.path.join(out, "ckpt.pt"))
    assert_one_line_error(run_in_process(*args, "--resume", "--steps", "2"), "rng_batches")


@pytest.mark.parametrize("args,words", [
    (["--schedule", "quadratic"], ["--schedule", "linear"]),
    (["--steps", "ten"], ["--steps"]),
    (["--timesteps", "0"], ["--timesteps"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--recipe", "mnist-1min"], ["--recipe", "mnist-5min"]),
    (["--dataset", "no/such/folder"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
    (["--ema-decay", "1.5"], ["--ema-decay"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "-1"], ["--lr"]),
])
def test_bad_flags_give_one_clear_line(args, words):
    assert_one_line_error(run_in_process("ddpm.py", *args), *words)


def test_a_recipe_sets_its_flags_and_flags_given_win():
    cfg = ddpm.parse_args(["--recipe", "mnist-5min"])
    assert (cfg.dataset, cfg.steps, cfg.batch_size, cfg.lr, cfg.class_cond) == ("mnist", 850, 32, 2e-3, True)
    cfg = ddpm.parse_args(["--recipe", "mnist-5min", "--steps", "10", "--no-class-cond"])
    assert (cfg.steps, cfg.class_cond, cfg.lr) == (10, False, 2e-3)
    assert ddpm.parse_args(["--schedule", "cosine"]) == ddpm.Config(schedule="cosine")  # the paper's defaults


def test_offline_download_names_the_files_to_place(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror("no network in this test")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(SystemExit) as e:
        ddpm.get_data(ddpm.Config(dataset="cifar10", data_root=str(tmp_path)))
    assert "cifar-10-python.tar.gz" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(SystemExit) as e:
        ddpm.get_data(ddpm.Config(dataset="mnist", data_root=str(tmp_path)))
    assert "train-images-idx3-ubyte" in str(e.value) and os.path.join(str(tmp_path), "MNIST", "raw") in str(e.value)


@needs_mnist
def test_real_mnist_loads():
    x, y = ddpm.get_data(ddpm.Config(dataset="mnist", data_root=MNIST_ROOT))
    assert x.shape == (60000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    assert y.shape == (60000,) and set(y.tolist()) == set(range(10))  # the labels, for --class-cond
    assert -0.8 < x.mean().item() < -0.7  # MNIST is mostly black background


def test_ema_follows_its_warm_up_formula(tmp_path, tiny_npy):
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + step)/(10 + step)): 0.1, then 2/11."""
    cfg = small_cfg(dataset=tiny_npy, steps=1, lr=1e-3, out=str(tmp_path / "run"))
    torch.manual_seed(cfg.seed)  # train() seeds, then builds the network: the same initial weights
    init = ddpm.build_model(dataclasses.replace(cfg, image_size=16), 3).state_dict()
    ddpm.train(cfg)
    one = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ddpm.train(dataclasses.replace(cfg, steps=2, resume=True))
    two = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    moved = 0
    for name, theta in two["model"].items():
        assert torch.allclose(one["ema"][name], 0.1 * init[name] + 0.9 * one["model"][name], atol=1e-6), name
        assert torch.allclose(two["ema"][name], 2 / 11 * one["ema"][name] + 9 / 11 * theta, atol=1e-6), name
        moved += not torch.equal(theta, one["model"][name])
    assert moved > 10  # the second step moved many tensors, so the checks above have teeth


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_learning_rate_follows_warm_up_and_optional_cosine(tmp_path, tiny_npy, decay):
    """lr(s) = lr · min(1, (s + 1)/warmup) · [½(1 + cos(π s / steps)) with --lr-decay cosine]; the row of
    metrics.csv at step n (n steps done) logs the rate its last step used, lr(n − 1)."""
    ddpm.train(small_cfg(dataset=tiny_npy, steps=6, warmup=3, lr=1e-3, lr_decay=decay, log_every=1,
                         out=str(tmp_path / "run")))
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    for r in rows:
        s = int(r["step"]) - 1
        want = 1e-3 * min(1.0, (s + 1) / 3) * (0.5 + 0.5 * math.cos(math.pi * s / 6) if decay == "cosine" else 1)
        assert float(r["lr"]) == pytest.approx(want, rel=1e-3, abs=1e-9), (s, r["lr"])
    assert len(rows) == 6


def test_fid_flag_scores_samples_against_the_training_set(tmp_path, tiny_npy):
    """--fid N generates N images and scores them with fid.py (random Inception: offline, meaningless
    numbers, but the whole path runs) and prints the value."""
    out = str(tmp_path / "run")
    np.save(tiny_npy, np.load(tiny_npy)[:8])  # a small reference set: Inception is slow on a CPU
    assert run_in_process("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY).returncode == 0
    r = run_in_process("ddpm.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "2",
                   "--fid", "4", "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "FID" in r.stdout and "4 samples" in r.stdout
    assert len(os.listdir(os.path.join(out, "generated"))) == 4  # max(--num-samples, --fid) images
