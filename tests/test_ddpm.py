"""ddpm.py: the math against closed forms, the network, and the script end to end."""
import csv
import dataclasses
import math
import os
import socket

import pytest
import torch

import ddpm
from conftest import HAVE_MNIST, MNIST_ROOT, assert_one_line_error, needs_mnist, run_script

TINY = ["--channels", "32", "--channel-mult", "1,2", "--num-res-blocks", "1", "--timesteps", "10",
        "--device", "cpu", "--batch-size", "8"]


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
def test_paper_cifar10_network_has_35_7M_parameters():
    model = ddpm.UNet(3, 32)  # the defaults for 32x32 RGB
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) < 0.2e6, n


@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1), (16, 3), (16, 1)])
def test_unet_shapes_and_identity_start(size, channels):
    model = ddpm.UNet(channels, size, channels=32, num_res_blocks=1)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert out.abs().max() == 0  # the output convolution starts at zero: ε̂ = 0 before training


def test_unet_rejects_sizes_it_cannot_halve():
    with pytest.raises(SystemExit, match="cannot be halved"):
        ddpm.UNet(1, 28, channel_mult="1,2,2,2")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ddpm.UNet(1, 16, channels=32, channel_mult="1,2", num_res_blocks=1, dropout=0.0)
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
    r = run_script("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout
    for f in ("config.json", "ckpt.pt", "metrics.csv", "progression.png", "samples/step_0000002.png",
              "samples/step_0000004.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(math.isfinite(float(r["loss"])) for r in rows)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"model", "ema", "optimizer", "rng_cpu", "config"}
    from PIL import Image
    assert Image.open(os.path.join(out, "progression.png")).height == 2 * (2 + 16 + 2)  # one row (with its padding) per grid

    r = run_script("ddpm.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    pngs = sorted(os.listdir(os.path.join(out, "generated")))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(os.path.join(out, "generated", pngs[0])).size == (16, 16)

    r = run_script("ddpm.py", "--visualize", "--ckpt", os.path.join(out, "ckpt.pt"), "--dataset", tiny_npy,
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "forward.png")) and os.path.isfile(os.path.join(out, "reverse.png"))


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_npy):
    """Six steps in one go = three steps, a stop, and three more after --resume (bit for bit)."""
    common = dict(dataset=tiny_npy, channels=32, channel_mult="1,2", num_res_blocks=1, timesteps=10,
                  device="cpu", batch_size=4, log_every=1, sample_every=100, warmup=3)
    ddpm.train(ddpm.Config(out=str(tmp_path / "a"), steps=6, **common))
    ddpm.train(ddpm.Config(out=str(tmp_path / "b"), steps=3, **common))
    ddpm.train(ddpm.Config(out=str(tmp_path / "b"), steps=6, resume=True, **common))
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


def test_training_refuses_to_overwrite_a_run(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    args = ["ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY]
    assert run_script(*args).returncode == 0
    assert_one_line_error(run_script(*args), "--resume")
    # a checkpoint without the training state (an older version's) is refused in one line, not a KeyError
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    del state["rng_batches"]
    torch.save(state, os.path.join(out, "ckpt.pt"))
    assert_one_line_error(run_script(*args, "--resume", "--steps", "2"), "rng_batches", "--out")


@pytest.mark.parametrize("args,words", [
    (["--schedule", "quadratic"], ["--schedule", "linear"]),
    (["--steps", "ten"], ["--steps"]),
    (["--timesteps", "0"], ["--timesteps"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--dataset", "no/such/folder"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
    (["--ema-decay", "1.5"], ["--ema-decay"]),
])
def test_bad_flags_give_one_clear_line(args, words):
    assert_one_line_error(run_script("ddpm.py", *args), *words)


def test_bad_files_give_one_clear_line(tmp_path):
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("ddpm.py", "--sample", "--ckpt", str(broken)), "cannot read checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_script("ddpm.py", "--dataset", str(empty)), "no .png")
    (tmp_path / "bad.npy").write_bytes(b"junk")
    assert_one_line_error(run_script("ddpm.py", "--dataset", str(tmp_path / "bad.npy")), "cannot read")
    bad_shape = tmp_path / "shape.npy"
    import numpy as np
    np.save(bad_shape, np.zeros((4, 5, 16, 16), dtype=np.uint8))
    assert_one_line_error(run_script("ddpm.py", "--dataset", str(bad_shape), *TINY), "grey or RGB")


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


def test_image_folder_and_npy_load_into_minus_one_one(tmp_path):
    import numpy as np
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 255 * (i % 2), dtype=np.uint8)).save(folder / f"{i}.png")
    x, labels = ddpm.get_data(ddpm.Config(dataset=str(folder), image_size=16))
    assert x.shape == (3, 3, 16, 16) and x.min() == -1 and x.max() == 1 and labels is None
    np.save(tmp_path / "f.npy", np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8).astype(np.float32))
    y, _ = ddpm.get_data(ddpm.Config(dataset=str(tmp_path / "f.npy")))
    assert y.shape == (2, 1, 8, 8) and y.min().item() == -1 and y.max().item() == 1


@needs_mnist
def test_real_mnist_loads():
    x, y = ddpm.get_data(ddpm.Config(dataset="mnist", data_root=MNIST_ROOT))
    assert x.shape == (60000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    assert y.shape == (60000,) and set(y.tolist()) == set(range(10))  # the labels, for --class-cond
    assert -0.8 < x.mean().item() < -0.7  # MNIST is mostly black background



def test_ema_follows_its_warm_up_formula(tmp_path, tiny_npy):
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + step)/(10 + step)): 0.1, then 2/11."""
    cfg = ddpm.Config(dataset=tiny_npy, channels=32, channel_mult="1,2", num_res_blocks=1, timesteps=10,
                      device="cpu", batch_size=4, steps=1, warmup=1, lr=1e-3, sample_every=100,
                      out=str(tmp_path / "run"))
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
    """lr(s) = lr · min(1, (s + 1)/warmup) · [½(1 + cos(π s / steps)) with --lr-decay cosine];
    metrics.csv logs, after step s, the rate the next step will use: lr(s)."""
    cfg = ddpm.Config(dataset=tiny_npy, channels=32, channel_mult="1,2", num_res_blocks=1, timesteps=10,
                      device="cpu", batch_size=4, steps=6, warmup=3, lr=1e-3, lr_decay=decay, log_every=1,
                      sample_every=100, out=str(tmp_path / "run"))
    ddpm.train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    for r in rows:
        s = int(r["step"])
        want = 1e-3 * min(1.0, (s + 1) / 3) * (0.5 + 0.5 * math.cos(math.pi * s / 6) if decay == "cosine" else 1)
        assert float(r["lr"]) == pytest.approx(want, rel=1e-3, abs=1e-9), (s, r["lr"])
    assert float(rows[-1]["lr"]) == (0 if decay == "cosine" else 1e-3)


def test_fid_flag_scores_samples_against_the_training_set(tmp_path, tiny_npy):
    """--fid N generates N images and scores them with fid.py (random Inception: offline, meaningless
    numbers, but the whole path runs), printing the value and appending it to fid.csv."""
    out = str(tmp_path / "run")
    assert run_script("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY).returncode == 0
    r = run_script("ddpm.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "2",
                   "--fid", "4", "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "FID" in r.stdout and "timesteps=10" in r.stdout
    rows = list(csv.DictReader(open(os.path.join(out, "fid.csv"))))
    assert len(rows) == 1 and rows[0]["n"] == "4" and math.isfinite(float(rows[0]["fid"]))
    assert len(os.listdir(os.path.join(out, "generated"))) == 4  # max(--num-samples, --fid) images
