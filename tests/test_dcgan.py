"""dcgan.py: the networks, the game's losses and step, the quality check, and the script end to end."""
import copy
import csv
import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import dcgan
import fid
from conftest import run_in_process

TINY = ["--g-channels", "8", "--d-channels", "8", "--batch-size", "8", "--check-n", "16", "--device", "cpu"]


def tiny_nets(size=16, channels=3, width=8, seed=0):
    torch.manual_seed(seed)
    return dcgan.build_model(dcgan.Config(image_size=size, g_channels=width, d_channels=width), channels)


def tiny_config(dataset, out, **changes) -> dcgan.Config:
    """A run of a few steps on tiny nets, for the in-process tests of train()."""
    return dcgan.Config(**{**dict(dataset=dataset, out=str(out), g_channels=8, d_channels=8, batch_size=4, steps=4,
                                  log_every=1, sample_every=100, ckpt_every=100, check_every=2, check_n=16,
                                  device="cpu"), **changes})


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# 1. The networks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,plan", [(32, (4, 3)), (28, (7, 2)), (16, (4, 2)), (64, (4, 4))])
def test_layer_plan_starts_small_and_doubles_to_the_image_size(size, plan):
    start, doublings = dcgan.layer_plan(size)
    assert (start, doublings) == plan and start * 2 ** doublings == size


@pytest.mark.parametrize("size,channels", [(16, 1), (16, 3), (28, 1), (28, 3), (32, 1), (32, 3)])
def test_shapes_at_native_sizes(size, channels):
    G, D = tiny_nets(size, channels)
    z = torch.randn(5, 100, 1, 1)
    x = G(z)
    assert x.shape == (5, channels, size, size)
    assert x.abs().max() <= 1  # tanh output, the data's range
    assert D(x).shape == (5,)
    # no upsampling anywhere: every size change is a stride-2 (transposed) convolution
    assert not any(isinstance(m, nn.Upsample) for m in G.modules())
    start, _ = dcgan.layer_plan(size)
    assert G[0](z).shape[-1] == start  # z is projected to start×start


def test_paper_32px_networks_have_the_expected_layers_and_size():
    """Radford et al.'s 64 px nets minus their 1024-channel layer: G 512→256→128→3, D 128→256→512→1."""
    G, D = dcgan.build_model(dcgan.Config(image_size=32), 3)
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in g_convs] == [512, 256, 128, 3]
    assert [m.out_channels for m in d_convs] == [128, 256, 512, 1]
    # BatchNorm everywhere except G's output and D's input (Radford et al. Sec. 3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 2
    assert isinstance(D[1], nn.LeakyReLU) and D[1].negative_slope == 0.2
    assert isinstance(G[-1], nn.Tanh) and not any(isinstance(m, nn.Sigmoid) for m in D.modules())
    n_g = 100 * 512 * 16 + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 3 * 16 + 2 * (512 + 256 + 128)
    n_d = 3 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 1 * 16 + 2 * (256 + 512)
    assert sum(p.numel() for p in G.parameters()) == n_g
    assert sum(p.numel() for p in D.parameters()) == n_d


def test_initialisation_statistics():
    torch.manual_seed(0)
    G, D = dcgan.build_model(dcgan.Config(image_size=32), 3)
    for net in (G, D):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                w = m.weight
                assert m.bias is None
                if w.numel() >= 10_000:  # large enough for tight statistics
                    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.03)
                else:
                    assert w.std().item() == pytest.approx(0.02, rel=0.3)
            elif isinstance(m, nn.BatchNorm2d):
                assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.3)
                assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_bad_image_size_is_one_clear_line():
    with pytest.raises(SystemExit, match="image size 27"):
        dcgan.layer_plan(27)


# --------------------------------------------------------------------------------------------
# 2. The game: losses against closed forms, one step of each player
# --------------------------------------------------------------------------------------------
def test_losses_are_the_minimax_terms_and_stay_finite():
    real_logits, fake_logits = torch.tensor([2.0, -1.0, 100.0]), torch.tensor([0.5, -3.0, -100.0])
    D = lambda x: x  # noqa: E731  a "discriminator" that returns its input as the logit
    sig = torch.sigmoid
    loss, lr, lf = dcgan.discriminator_loss(D, real_logits, fake_logits)
    # −[log D(x) + log(1 − D(G(z)))] and −log D(G(z)), straight from the probabilities
    expected = -(sig(real_logits).log().mean() + (1 - sig(fake_logits)).log().mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected = -sig(fake_logits[:2]).log().mean()
    assert dcgan.generator_loss(D, fake_logits[:2]).item() == pytest.approx(expected.item(), rel=1e-5)
    # logits far out: −log σ(−200) = 200 exactly, where log(sigmoid()) would give inf
    assert dcgan.generator_loss(D, torch.tensor([-200.0])).item() == pytest.approx(200.0)


def test_one_discriminator_step_lowers_its_loss_on_a_fixed_batch():
    G, D = tiny_nets(16, 3, seed=1)
    real = torch.rand(32, 3, 16, 16) * 2 - 1
    fake = G(torch.randn(32, 100, 1, 1)).detach()
    optimizer = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    before, _, _ = dcgan.discriminator_loss(D, real, fake)
    optimizer.zero_grad()
    before.backward()
    # Adam's first step moves every weight by lr·sign(g): to first order the loss drops by lr·‖g‖₁
    predicted_drop = 2e-4 * sum(p.grad.abs().sum() for p in D.parameters()).item()
    optimizer.step()
    with torch.no_grad():
        after, _, _ = dcgan.discriminator_loss(D, real, fake)
    assert after.item() < before.item()
    assert before.item() - after.item() == pytest.approx(predicted_drop, rel=0.3)


def test_one_generator_step_raises_D_of_G_of_z():
    G, D = tiny_nets(16, 3, seed=2)
    z = torch.randn(32, 100, 1, 1)
    D.requires_grad_(False)  # as in training: G's step moves G only
    d_weights = [p.clone() for p in D.parameters()]
    optimizer = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def d_of_g_z():
        with torch.no_grad():
            return torch.sigmoid(D(G(z))).mean().item()
    before = d_of_g_z()
    loss = dcgan.generator_loss(D, G(z))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert d_of_g_z() > before
    assert all(torch.equal(a, b) for a, b in zip(d_weights, D.parameters()))


@pytest.mark.parametrize("bf16", [False, True])
def test_game_step_updates_D_on_its_loss_alone_then_G_with_D_frozen(bf16):
    """D's gradient after a step is that of D's loss alone: G's step left D frozen. The precision asked for
    is the one G runs in."""
    G, D = tiny_nets(16, 3, seed=3)
    real, z = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, 100, 1, 1)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # the gradient D's step should have used
        loss_d = dcgan.discriminator_loss(D0, real, G0(z).detach())[0]
    loss_d.backward()
    dtypes = []
    G.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999)) for net in (G, D))
    values = dcgan.game_step(G, D, opt_g, opt_d, real, z, bf16)
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32]
    for p, p0 in zip(D.parameters(), D0.parameters()):
        assert p.requires_grad and torch.allclose(p.grad, p0.grad, atol=1e-6)
    assert all(p.grad is not None for p in G.parameters())
    assert not all(torch.equal(p, p0) for p, p0 in zip(G.parameters(), G0.parameters()))  # G moved
    assert values.shape == (4,) and values.dtype == torch.float32 and values.isfinite().all()
    assert values[0].item() == pytest.approx(loss_d.item(), rel=1e-5) and 0 < values[2] < 1 and 0 < values[3] < 1


def test_generate_is_reproducible_independent_of_the_batch_and_leaves_G_training():
    G, _ = tiny_nets(16, 3)
    cfg = dcgan.Config(batch_size=8, latent=100)
    one = dcgan.generate(G, cfg, 10, torch.device("cpu"), torch.Generator().manual_seed(3))
    two = dcgan.generate(G, dcgan.Config(batch_size=3), 10, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert one.shape == (10, 3, 16, 16) and torch.allclose(one, two, atol=1e-6)  # eval-mode BatchNorm
    assert G.training  # back in training mode, as the loop needs


def test_the_quality_checks_batch_statistics_mode_normalises_each_batch_and_leaves_g_alone():
    """batch_statistics=True (what the check uses): each batch's images are normalised with that batch's
    own BatchNorm statistics, so they depend on the batch size, and G's running statistics do not move."""
    G, _ = tiny_nets(16, 3)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    gen = lambda size: dcgan.generate(G, dcgan.Config(batch_size=size), 10, torch.device("cpu"),  # noqa: E731
                                      torch.Generator().manual_seed(3), batch_statistics=True)
    whole, split = gen(10), gen(5)
    assert not torch.allclose(whole, split, atol=1e-3)  # the batch's statistics, not the running ones
    for i in range(0, 10, 5):  # = G in training mode on each batch of 5
        z = torch.randn(10, 100, 1, 1, generator=torch.Generator().manual_seed(3))[i:i + 5]
        expected = copy.deepcopy(G).train()(z)
        assert torch.allclose(split[i:i + 5], expected, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in G.state_dict().items())


# --------------------------------------------------------------------------------------------
# 3. The quality check
# --------------------------------------------------------------------------------------------
def test_frechet_distance_against_closed_forms():
    """fid.py's frechet_distance, which the proxy uses."""
    # diagonal covariances: d² = ‖μ₁ − μ₂‖² + Σ (σ₁ᵢ − σ₂ᵢ)²
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(s1) - np.sqrt(s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # full, non-commuting covariances: tr (Σ₁Σ₂)^½ from the eigenvalues of the product itself
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma1, sigma2 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    cross = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0).sqrt().sum()
    expected = mu.square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    mu, sigma1, sigma2 = mu.numpy(), sigma1.numpy(), sigma2.numpy()
    assert fid.frechet_distance(mu, sigma1, 0 * mu, sigma2) == pytest.approx(expected.item(), rel=1e-8)
    assert fid.frechet_distance(mu, sigma1, mu, sigma1) == pytest.approx(0.0, abs=1e-8)


def strokes(n, seed):
    """n 28x28 grey images of random bright bars on black, in [-1, 1]: a stand-in for digits."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 28, 28)
    for i in range(n):
        for _ in range(3):
            r, c = torch.randint(4, 22, (2,), generator=g).tolist()
            if torch.rand(1, generator=g).item() < 0.5:
                x[i, 0, r:r + 2, c - 4:c + 5] = 1
            else:
                x[i, 0, r - 4:r + 5, c:c + 2] = 1
    return x


def test_proxy_is_fixed_and_ranks_degradations():
    cpu, reference = torch.device("cpu"), strokes(600, 0)
    torch.manual_seed(123)  # φ must not depend on the global seed
    score = dcgan.proxy(reference, cpu)
    torch.manual_seed(456)
    assert dcgan.proxy(reference, cpu)(strokes(50, 7)) == score(strokes(50, 7))
    assert score(reference) == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    other = strokes(600, 1)  # other images from the same law
    same = score(other)
    blurred = score(torch.nn.functional.avg_pool2d(other, 3, 1, 1))
    noisy = score((other + 0.5 * torch.randn(600, 1, 28, 28)).clamp(-1, 1))
    collapsed = score(other[:3].repeat(200, 1, 1, 1))  # three images, 200 copies each
    assert same < 0.5 * min(blurred, noisy, collapsed), (same, blurred, noisy, collapsed)


# --------------------------------------------------------------------------------------------
# 4. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_ckpt_best_grids_and_metrics_then_samples(tmp_path, tiny_npy, capsys):
    out = str(tmp_path / "run")
    r = run_in_process("dcgan.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", "--check-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "d_fake" in r.stdout and "img/s" in r.stdout
    for f in ("config.json", "ckpt.pt", "best.pt", "metrics.csv", "quality.csv",
              "samples/step_0000002.png", "samples/step_0000004.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    metrics = rows(os.path.join(out, "metrics.csv"))
    assert list(metrics[0]) == ["step", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "elapsed_s"]
    assert [int(r["step"]) for r in metrics] == [2, 4]
    for row in metrics:
        assert all(math.isfinite(float(row[k])) for k in ("loss_d", "loss_g"))
        assert all(0 < float(row[k]) < 1 for k in ("d_real", "d_fake"))
    checks = rows(os.path.join(out, "quality.csv"))
    assert [int(c["step"]) for c in checks] == [2, 4]
    best = min(checks, key=lambda c: float(c["proxy"]))
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"generator", "discriminator", "optimizer_g", "optimizer_d",
                                                 "rng_cpu", "config", "best_value", "best_step", "checks"}
    assert state["script"] == "dcgan"  # loading checks the writer first
    assert state["optimizer_g"]["param_groups"][0]["betas"] == (0.5, 0.999)  # the paper's Adam
    best_state = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert best_state["step"] == state["best_step"] == int(best["step"])
    assert best_state["best_value"] == pytest.approx(float(best["proxy"]))

    dcgan.main(dcgan.parse_args(["--sample", "--ckpt", os.path.join(out, "best.pt"), "--num-samples", "5",
                                 "--device", "cpu"]))  # (in-process: a second start of python costs seconds)
    assert "img/s" in capsys.readouterr().out
    pngs = sorted(os.listdir(os.path.join(out, "generated")))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    assert Image.open(os.path.join(out, "generated", pngs[0])).size == (16, 16)
    assert os.path.isfile(os.path.join(out, "generated_grid.png"))


def test_sigterm_saves_and_resume_continues_bit_for_bit(tmp_path, tiny_npy, monkeypatch, capsys):
    """Six steps in one go = a SIGTERM at step 3 (a checkpoint, then the end) and --resume: the same weights,
    optimisers, random state, best generator, log and checks. best.pt resumes too."""
    dcgan.train(tiny_config(tiny_npy, tmp_path / "a", steps=6))
    log_line, handlers = dcgan.log_line, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def log_then_signal(run, step, cfg, **values):  # a real SIGTERM, caught by catch_stop_signals()
        log_line(run, step, cfg, **values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(dcgan, "log_line", log_then_signal)
    try:
        with pytest.raises(SystemExit, match="stopped by SIGTERM at step 3"):
            dcgan.train(tiny_config(tiny_npy, tmp_path / "b", steps=6))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    monkeypatch.setattr(dcgan, "log_line", log_line)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    dcgan.train(tiny_config(tiny_npy, tmp_path / "b", steps=6, resume=True))
    assert "resumed at step 3" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("a", "b"))
    assert b["step"] == 6 and torch.equal(a["rng_cpu"], b["rng_cpu"])
    for key in ("generator", "discriminator"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    for key in ("optimizer_g", "optimizer_d"):
        for i, s in a[key]["state"].items():
            assert all(torch.equal(s[k], b[key]["state"][i][k]) for k in s), key
    assert (a["best_value"], a["best_step"], a["checks"]) == (b["best_value"], b["best_step"], b["checks"])
    for name in ("metrics.csv", "quality.csv"):
        got, expected = rows(tmp_path / "b" / name), rows(tmp_path / "a" / name)
        assert [{k: r[k] for k in r if k not in ("images_per_s", "elapsed_s")} for r in got] == \
            [{k: r[k] for k in r if k not in ("images_per_s", "elapsed_s")} for r in expected], name
    assert [r["step"] for r in rows(tmp_path / "a" / "quality.csv")] == ["2", "4", "6"]
    # best.pt holds all a run needs: it resumes (into a new folder) at its own step
    best_step = a["best_step"]
    dcgan.train(tiny_config(tiny_npy, tmp_path / "c", steps=7, resume=True, ckpt=str(tmp_path / "a" / "best.pt")))
    assert f"resumed at step {best_step}" in capsys.readouterr().out
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["step"] == 7


@pytest.mark.parametrize("every,words", [(dict(ckpt_every=1), "weights are NaN"),
                                         (dict(check_every=1), "samples are NaN")])
def test_a_diverged_generator_is_never_saved(tmp_path, tiny_npy, monkeypatch, every, words):
    """NaN weights (here: a NaN generator loss) stop the run with one line before a checkpoint or a
    quality check could keep them."""
    loss = dcgan.generator_loss
    monkeypatch.setattr(dcgan, "generator_loss", lambda D, fake: loss(D, fake) * math.nan)
    cfg = tiny_config(tiny_npy, tmp_path / "run", **{**dict(log_every=100, check_every=100), **every})
    with pytest.raises(SystemExit, match=words) as stop:
        dcgan.train(cfg)
    assert "\n" not in str(stop.value.code) and "diverged by step 1" in str(stop.value.code)
    assert not any(os.path.exists(tmp_path / "run" / f) for f in ("ckpt.pt", "best.pt"))


def test_compile_wraps_both_networks(tmp_path, tiny_npy, monkeypatch):
    """--compile hands G and D to torch.compile (stubbed here: a real compile takes minutes on 2 cores)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net: compiled.append(net) or net)
    dcgan.train(tiny_config(tiny_npy, tmp_path / "run", steps=1, compile=True))
    assert [type(net) for net in compiled] == [nn.Sequential, nn.Sequential]
    assert isinstance(compiled[0][-1], nn.Tanh) and isinstance(compiled[1][-1], nn.Flatten)


def test_training_refuses_to_overwrite_a_run(tmp_path, tiny_npy):
    dcgan.train(tiny_config(tiny_npy, tmp_path / "run", steps=1))
    with pytest.raises(SystemExit, match="--resume"):
        dcgan.train(tiny_config(tiny_npy, tmp_path / "run", steps=1))


def previous_version_checkpoint(path, dataset):
    """A checkpoint as the previous dcgan.py wrote it: its layers in G.net and D.net, no checks, its own
    config fields (beta2, check, ...) and a log_sums entry."""
    G, D = tiny_nets(16, 3, seed=5)
    config = dict(dataclasses.asdict(dcgan.Config()), dataset=dataset, image_size=16, g_channels=8, d_channels=8,
                  beta2=0.999)
    del config["recipe"]
    torch.save({"generator": {"net." + k: v for k, v in G.state_dict().items()},
                "discriminator": {"net." + k: v for k, v in D.state_dict().items()},
                "optimizer_g": torch.optim.Adam(G.parameters()).state_dict(),
                "optimizer_d": torch.optim.Adam(D.parameters()).state_dict(), "best_value": 0.5, "best_step": 2,
                "config": config, "step": 2, "script": "dcgan", "log_sums": (None, 0),
                "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.empty(0)}, path)
    return G


def test_checkpoints_of_the_previous_version_still_sample(tmp_path, tiny_npy):
    G = previous_version_checkpoint(tmp_path / "best.pt", tiny_npy)
    dcgan.main(dcgan.parse_args(["--sample", "--ckpt", str(tmp_path / "best.pt"), "--num-samples", "3",
                                 "--device", "cpu"]))
    assert sorted(os.listdir(tmp_path / "generated")) == ["000000.png", "000001.png", "000002.png"]
    assert os.path.isfile(tmp_path / "generated_grid.png")
    expected = dcgan.generate(G, dcgan.Config(), 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    from PIL import Image
    first = np.asarray(Image.open(tmp_path / "generated" / "000000.png"))
    assert np.abs(first / 255 - (expected[0] * 0.5 + 0.5).permute(1, 2, 0).numpy()).max() < 1 / 255 + 1e-6
    # resuming one is refused in one line: it has no quality-check history
    with pytest.raises(SystemExit, match="lacks checks"):
        dcgan.train(tiny_config(tiny_npy, tmp_path / "new", resume=True, ckpt=str(tmp_path / "best.pt")))


def test_fid_flag_scores_samples_against_the_training_set(tmp_path, capsys):
    """--fid N in --sample mode: N images scored by fid.py against the checkpoint's training set (4 images, for
    speed) with a random Inception network: offline, and the numbers mean nothing."""
    np.save(tmp_path / "four.npy", np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8))
    previous_version_checkpoint(tmp_path / "ckpt.pt", str(tmp_path / "four.npy"))
    dcgan.main(dcgan.parse_args(["--sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "2", "--fid", "4",
                                 "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "FID" in out and "4 samples" in out
    assert len(os.listdir(tmp_path / "generated")) == 4  # max(--num-samples, --fid) images


def test_the_mnist_recipe_is_compare_pys_cpu_preset_and_flags_given_win():
    cfg = dcgan.parse_args(["--recipe", "mnist", "--steps", "10"])
    assert (cfg.dataset, cfg.g_channels, cfg.d_channels, cfg.check_every, cfg.ckpt_every, cfg.sample_every,
            cfg.precision, cfg.device) == ("mnist", 64, 64, 250, 500, 500, "bf16", "cpu")
    assert cfg.steps == 10 and dcgan.parse_args(["--recipe", "mnist"]).steps == 6000
    assert dcgan.parse_args([]) == dcgan.Config()  # without a recipe: the paper's CIFAR-10 setting


@pytest.mark.parametrize("args,words", [
    (["--check", "inception"], ["--check", "proxy"]),
    (["--recipe", "cifar"], ["--recipe", "mnist"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--lr", "nan"], ["--lr"]),
    (["--check-n", "1"], ["--check-n"]),
    (["--beta1", "1.5"], ["--beta1"]),
    (["--beta1", "1"], ["--beta1 < 1"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--dataset", "no/such/folder"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--sample", "--ckpt", "missing/best.pt"], ["missing/best.pt"]),
])
def test_bad_flags_give_one_clear_line(args, words, tmp_path, monkeypatch):
    """In-process (fast): each stops with sys.exit(one line), in tmp_path (a run folder may be made)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        dcgan.main(dcgan.parse_args(args))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_files_and_sizes_give_one_clear_line(tmp_path, tiny_npy):
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*ckpt.pt"):
        dcgan.main(dcgan.parse_args(["--sample", "--ckpt", str(broken)]))
    with pytest.raises(SystemExit, match="image size 6 .* --image-size"):
        dcgan.train(tiny_config(tiny_npy, tmp_path / "r", image_size=6))
