"""ddim.py: the sampler against closed forms and against ddpm.py, inversion, and the script end to end."""
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import ddim
import ddpm
from conftest import ROOT, assert_one_line_error, run_in_process, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ddim_vs_ddpm  # noqa: E402

TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none", "--timesteps", "10",
        "--device", "cpu", "--batch-size", "8", "--warmup", "1"]


# --------------------------------------------------------------------------------------------
# 1. The sub-sequence τ
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 5, 10, 37, 200, 1000])
def test_tau_is_strictly_increasing_in_range_and_of_length_S(T):
    for skip in ("uniform", "quadratic"):
        for S in range(1, T + 1):
            tau = ddim.timestep_sequence(T, S, skip)
            assert len(tau) == S and tau[0] == 0 and tau[-1] <= T - 1, (skip, S, tau)
            assert all(a < b for a, b in zip(tau, tau[1:])), (skip, S, tau)
        assert ddim.timestep_sequence(T, T, skip) == list(range(T))  # S = T: every step, as DDPM


@pytest.mark.parametrize("T", [1, 2, 5, 10, 37, 200, 1000])
def test_trailing_tau_ends_at_the_last_step_and_matches_lin_et_al(T):
    for S in range(1, T + 1):
        tau = ddim.timestep_sequence(T, S, "trailing")
        assert len(tau) == S and tau[-1] == T - 1 and tau[0] >= 0, (S, tau)
        assert all(a < b for a, b in zip(tau, tau[1:])), (S, tau)
        # Lin et al. (Table 2) and diffusers' "trailing": np.round(np.arange(T, 0, -T / S)) - 1, top down,
        # wherever that float arithmetic neither meets a half (where it rounds by its rounding error) nor
        # makes an extra step (np.arange's float steps can give S + 1 values)
        theirs = np.arange(T, 0, -T / S)
        if len(theirs) == S and not any((2 * k * T) % S == 0 and (k * T) % S for k in range(1, S + 1)):
            assert tau == sorted((np.round(theirs) - 1).astype(int).tolist()), (S, tau)
    assert ddim.timestep_sequence(T, T, "trailing") == list(range(T))


def test_trailing_tau_rounds_where_lin_et_al_round_when_S_does_not_divide_T():
    tau = ddim.timestep_sequence(100, 30, "trailing")  # (i+1)·T/S = 3.33, 6.67, 10, 13.33, 16.67, …
    assert tau[:5] == [2, 6, 9, 12, 16] and tau[-1] == 99  # ⌊·⌋ − 1 would give 2, 5, 9, 12, 15
    assert ddim.timestep_sequence(100, 40, "trailing")[:4] == [2, 4, 7, 9]  # 2.5 → 3, 5, 7.5 → 8, 10: halves up


def test_tau_matches_the_ddim_code():
    for T in (200, 1000):
        for S in (10, 20, 50, 100):
            if T % S == 0:  # the DDIM code: seq = range(0, T, T // S)
                assert ddim.timestep_sequence(T, S, "uniform") == list(range(0, T, T // S))
            # the DDIM code: seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
            theirs = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
            ours = ddim.timestep_sequence(T, S, "quadratic")
            assert ours[-1] == theirs[-1] == int(0.8 * T)
            changed = [i for i in range(S) if ours[i] != theirs[i]]
            if len(set(theirs)) == S:  # no repeated step in the code's τ: ours is the same
                assert changed == []
            else:  # where the code repeats steps near t = 0, ours counts 0, 1, 2, … until it catches up
                k = len(changed)
                assert changed == list(range(1, k + 1)) and ours[:k + 1] == list(range(k + 1))
                assert any(theirs[i] == theirs[i - 1] for i in changed) and all(ours[i] > theirs[i] for i in changed)
    assert [int(s) for s in np.linspace(0, np.sqrt(800), 50) ** 2][:5] == [0, 0, 1, 2, 5]  # the repeat we fix
    assert ddim.timestep_sequence(1000, 50, "quadratic")[:5] == [0, 1, 2, 3, 5]
    assert ddim.timestep_sequence(1000, 7, "uniform") == [0, 142, 285, 428, 571, 714, 857]  # ⌊i·T/S⌋
    with pytest.raises(ValueError):
        ddim.timestep_sequence(10, 11)
    with pytest.raises(ValueError):
        ddim.timestep_sequence(10, 5, "cubic")


# --------------------------------------------------------------------------------------------
# 2. The sampler against closed forms
# --------------------------------------------------------------------------------------------
def point_eps_model(c, betas):
    """The exact ε-predictor when the data is the single point x_0 = c: ε = (x_t − √ᾱ_t c) / √(1−ᾱ_t)."""
    alpha_bar = torch.cumprod(1 - betas, 0)

    def eps_model(x, t):
        a = alpha_bar[t].float()[:, None, None, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()
    return eps_model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_single_point_data_is_returned_for_any_S(schedule):
    betas = ddim.make_betas(schedule, 1000)
    c = torch.tensor([0.7, -0.2, 0.0, -1.0]).reshape(1, 1, 2, 2)
    model = point_eps_model(c, betas)
    for skip in ("uniform", "quadratic"):
        for S in (1, 2, 7, 50, 1000):
            for eta in (0.0, 0.5, 1.0):
                x = ddim.sample(model, (16, 1, 2, 2), betas, S, eta, skip, torch.Generator().manual_seed(S))
                assert torch.allclose(x, c.expand_as(x), atol=2e-3), (skip, S, eta, (x - c).abs().max())


def test_S_equals_T_and_eta_1_is_the_ddpm_posterior_step():
    """σ_t² = β̃_t and mean √ᾱ_{t−1}x̂_0 + √(1−ᾱ_{t−1}−β̃_t)·ε_θ = μ̃_t(x_t, x̂_0): step by step, the same
    z's giving the same x's as ddpm.py's Algorithm 2 with σ² = β̃."""
    T = 40
    betas = ddim.make_betas("linear", T)
    eps_model = lambda x, t: torch.sin(3 * x) + 0.1 * t[:, None, None, None]  # noqa: E731  any fixed function
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    chain = {}
    got = ddim.sample(eps_model, x_T.shape, betas, T, 1.0, "uniform", torch.Generator().manual_seed(5), x_T=x_T,
                      on_step=lambda t, x, x0: chain.update({t: (x.clone(), x0.clone())}))
    # each step, checked against ddpm.py's posterior q(x_{t−1} | x_t, x̂_0) and the z's of the generator
    g = torch.Generator().manual_seed(5)
    for t in reversed(range(1, T)):
        x_t, x0_pred = chain[t]
        mean, var = ddpm.q_posterior(x0_pred, x_t, t, betas)  # var = β̃_t
        z = torch.randn(x_t.shape, generator=g)
        assert torch.allclose(chain[t - 1][0], mean + math.sqrt(var) * z, atol=1e-5), t
    # the whole chain against ddpm.sample: same x_T, same generator seed
    expected = ddpm.sample(eps_model, x_T.shape, betas, torch.Generator().manual_seed(5), x_T=x_T,
                           var="beta_tilde", clip_x0=False)
    assert torch.allclose(got, expected, atol=1e-5)
    # clipped too: DDIM takes ε from the clipped x̂_0, so its step is the posterior mean at the clipped x̂_0
    clipped = ddim.sample(eps_model, x_T.shape, betas, T, 1.0, "uniform", torch.Generator().manual_seed(5), x_T=x_T,
                          clip_x0=True)
    expected = ddpm.sample(eps_model, x_T.shape, betas, torch.Generator().manual_seed(5), x_T=x_T,
                           var="beta_tilde", clip_x0=True)
    assert torch.allclose(clipped, expected, atol=1e-5) and not torch.allclose(clipped, got, atol=1e-2)


def tiny_unet(seed=0):
    """A small U-Net with a random (not zero) output layer, so that ε_θ is a nontrivial function."""
    torch.manual_seed(seed)
    model = ddim.build_model(ddim.Config(image_size=8, channels=8, channel_mult="1,2", num_res_blocks=1,
                                         attn_res="none", dropout=0.0), 1)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    return model.eval()


def test_eta_zero_same_x_T_gives_the_same_image():
    model, betas = tiny_unet(), ddim.make_betas("cosine", 50)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ddim.sample(model, x_T.shape, betas, 10, 0.0, generator=torch.Generator().manual_seed(1), x_T=x_T)
    b = ddim.sample(model, x_T.shape, betas, 10, 0.0, generator=torch.Generator().manual_seed(2), x_T=x_T)
    assert torch.equal(a, b)  # no randomness beyond x_T
    c = ddim.sample(model, x_T.shape, betas, 10, 1.0, generator=torch.Generator().manual_seed(1), x_T=x_T)
    d = ddim.sample(model, x_T.shape, betas, 10, 1.0, generator=torch.Generator().manual_seed(2), x_T=x_T)
    assert not torch.allclose(c, d, atol=1e-3)  # η = 1 draws fresh noise
    e = ddim.sample(model, x_T.shape, betas, 10, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(e, a)  # without x_T, the generator's first draw is x_T


def test_clipping_keeps_predicted_x0_in_range_and_is_on_by_default():
    betas = ddim.make_betas("linear", 20)
    for clip in (False, True):
        seen = []
        ddim.sample(lambda x, t: -5 * x, (2, 1, 4, 4), betas, 5, generator=torch.Generator().manual_seed(0),
                    clip_x0=clip, on_step=lambda t, x, x0: seen.append(x0.abs().max().item()))
        assert len(seen) == 5 and (max(seen) <= 1.0) == clip
    assert ddim.Config().clip_x0 is True  # measured: docs/ddim.md


def gaussian_eps_model(mu, s, betas):
    """The exact ε-predictor for data x_0 ~ N(mu, s²) per pixel (see test_ddpm.py)."""
    alpha_bar = torch.cumprod(1 - betas, 0)

    def eps_model(x, t):
        a = alpha_bar[t].float()[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps_model


def test_inversion_then_generation_reproduces_the_input():
    """Gaussian data N(mu, s²): the exact ODE keeps each pixel's standard score z = (x_0 − mu)/s, so it
    maps x_0 to x_t = √ᾱ_t mu + √(ᾱ_t s² + 1 − ᾱ_t) · z; DDIM's Euler steps approach that as S grows."""
    mu, s = 0.3, 0.5
    betas = ddim.make_betas("cosine", 1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    model = gaussian_eps_model(mu, s, betas)
    x0 = mu + s * torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    latent_error, error, mse = {}, {}, {}
    for S in (10, 100, 1000):
        x_T = ddim.invert(model, x0, betas, S)
        a = alpha_bar[ddim.timestep_sequence(1000, S)[-1]].item()  # ᾱ at the last step of τ
        exact = math.sqrt(a) * mu + math.sqrt(a * s ** 2 + 1 - a) * (x0 - mu) / s
        latent_error[S] = (x_T - exact).abs().max().item()
        x_rec = ddim.sample(model, x0.shape, betas, S, 0.0, x_T=x_T)
        error[S], mse[S] = (x_rec - x0).abs().max().item(), (x_rec - x0).pow(2).mean().item()
    assert latent_error[1000] < 0.01 and latent_error[100] < 0.05, latent_error
    assert error[1000] < 0.01 and error[100] < 0.1 and mse[100] < 1e-3, (error, mse)
    assert error[10] > 5 * error[100] > 25 * error[1000], error  # first order: error ∝ 1/S
    x_T = ddim.invert(model, x0, betas, 1000)  # the whole chain: the latent is N(0, 1) and (x_0 − mu)/s
    assert x_T.mean().item() == pytest.approx(0, abs=0.03) and x_T.std().item() == pytest.approx(1, abs=0.03)
    assert torch.allclose(x_T, (x0 - mu) / s, atol=0.01)


def test_invert_mode_decodes_along_the_ode_it_encoded_with(tmp_path, monkeypatch, capsys):
    """--invert with the exact ε of Gaussian data N(0.3, 0.5²), a sixth of it outside [-1, 1]: the round trip
    must return x_0 up to the ODE's discretisation error, vanishing as S grows. A decoder that clips x̂_0
    (the sampler's default) leaves the ODE: it cannot return the pixels beyond ±1, at any S."""
    mu, s, betas = 0.3, 0.5, ddim.make_betas("cosine", 1000)
    exact = gaussian_eps_model(mu, s, betas)

    class Exact(torch.nn.Module):  # the network that load_for_sampling would return
        def forward(self, x, t, y=None):
            return exact(x, t)
    x0 = mu + s * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert (x0.abs() > 1).float().mean() > 0.05
    cfg = ddim.Config(ckpt="exact", schedule="cosine", timesteps=1000, device="cpu", out=str(tmp_path))
    monkeypatch.setattr(ddim, "load_for_sampling", lambda c: (Exact(), c, (1, 4, 4), str(tmp_path)))
    monkeypatch.setattr(ddim, "get_data", lambda c: (x0, None))
    errors = {}
    for S in (20, 200, 1000):
        ddim.invert_mode(ddim.dataclasses.replace(cfg, sample_steps=S))
        errors[S] = float(re.search(r"mean squared ([0-9.e-]+)", capsys.readouterr().out).group(1))
    assert errors[1000] < 1e-5 and errors[200] < errors[20] / 10, errors
    _, back = ddim.round_trip(exact, x0, betas, 200)
    assert torch.allclose(back, x0, atol=0.02)


def test_slerp_ends_and_stays_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    assert torch.allclose(ddim.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(ddim.slerp(a, b, 1.0), b, atol=1e-5)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(ddim.slerp(u, v, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))  # the arc's midpoint
    # two N(0, I) draws are nearly orthogonal: lerp's middle has norm ≈ √(d/2), slerp's stays ≈ √d
    mid = ddim.slerp(a, b, 0.5).norm().item()
    assert mid == pytest.approx(math.sqrt(768), rel=0.1) and (a + b).norm().item() / 2 < 0.8 * mid


# --------------------------------------------------------------------------------------------
# 3. The script end to end, on a checkpoint written by ddpm.py
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory):
    """A 2-step ddpm.py run on 24 random 16x16 RGB images (T = 10): its ckpt.pt."""
    folder = tmp_path_factory.mktemp("ddpm_run")
    np.save(folder / "tiny.npy", np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    ddpm.train(ddpm.Config(dataset=str(folder / "tiny.npy"), out=str(folder), steps=2, channels=8, schedule="cosine",
                           channel_mult="1,2", num_res_blocks=1, attn_res="none", timesteps=10, device="cpu",
                           batch_size=4, log_every=1, sample_every=100, ema_decay=0.5, warmup=1))
    return str(folder / "ckpt.pt")


def test_ddpm_checkpoint_loads_and_sample_mode_writes_pngs(ddpm_ckpt, tmp_path):
    model, cfg, shape, out = ddim.load_for_sampling(ddim.Config(ckpt=ddpm_ckpt))
    reference, _, _, _ = ddpm.load_for_sampling(ddpm.Config(ckpt=ddpm_ckpt))
    assert shape == (3, 16, 16) and cfg.timesteps == 10 and out.endswith("ddim-samples")
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # on the real network too, S = T with η = 1 is ddpm.py's sampler with σ² = β̃ (unclipped)
    torch.nn.init.normal_(model.out[-1].weight, std=0.01)  # trained 2 steps: make ε_θ clearly nonzero
    a = ddim.generate(model, ddim.dataclasses.replace(cfg, sample_steps=10, eta=1.0, clip_x0=False), 3, shape,
                      torch.device("cpu"), torch.Generator().manual_seed(0))
    b = ddpm.generate(model, ddpm.dataclasses.replace(ddpm.Config(**{k: getattr(cfg, k) for k in ddpm.ARCH_FIELDS}),
                                                      var="beta_tilde", clip_x0=False), 3, shape,
                      torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    out = str(tmp_path / "sampled")
    r = run_in_process("ddim.py", "--sample", "--ckpt", ddpm_ckpt, "--sample-steps", "5", "--eta", "0",
                   "--num-samples", "5", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}.png" for i in range(5)]
    assert os.path.isfile(os.path.join(out, "generated_grid.png"))


def test_invert_and_interpolate_modes(ddpm_ckpt, tmp_path, capsys):
    from PIL import Image
    out = str(tmp_path / "modes")
    errors = {}  # a (nearly untrained) network: the round trip is tight below the top step, t = T − 1, where
    for skip in ("uniform", "trailing"):  # the capped β = 0.999 multiplies the ODE's one-step mismatch by ~30
        ddim.main(ddim.parse_args(["--invert", "--ckpt", ddpm_ckpt, "--sample-steps", "5", "--skip", skip,
                                   "--device", "cpu", "--out", out]))
        errors[skip] = float(re.search(r"mean squared ([0-9.]+)", capsys.readouterr().out).group(1))
    assert errors["uniform"] < 1e-3 < errors["trailing"], errors
    assert Image.open(os.path.join(out, "invert.png")).size == (2 + 8 * 18, 2 + 3 * 18)  # 3 rows of 8
    ddim.main(ddim.parse_args(["--interpolate", "--ckpt", ddpm_ckpt, "--sample-steps", "3", "--device", "cpu",
                               "--out", out]))
    assert Image.open(os.path.join(out, "interpolate.png")).size == (2 + 10 * 18, 2 + 4 * 18)  # 4 rows of 10


def test_ddim_trains_on_its_own(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_in_process("ddim.py", "--dataset", tiny_npy, "--out", out, "--steps", "2", "--sample-every", "2",
                   "--log-every", "1", "--sample-steps", "4", *TINY)
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "ckpt.pt", "metrics.csv", "samples/step_0000002.png"):
        assert os.path.isfile(os.path.join(out, f)), f


@pytest.mark.parametrize("args,words", [
    (["--sample-steps", "11"], ["--sample-steps 11", "--timesteps 10"]),
    (["--sample-steps", "0"], ["--sample-steps"]),
    (["--eta", "1.5"], ["--eta"]),
    (["--skip", "cubic"], ["--skip", "quadratic"]),
    (["--invert"], ["--invert", "--ckpt"]),
    (["--interpolate"], ["--interpolate", "--ckpt"]),
])
def test_bad_flags_give_one_clear_line(args, words, tiny_npy, capsys):
    with pytest.raises(SystemExit) as e:
        ddim.main(ddim.parse_args(["--dataset", tiny_npy, *TINY, *args]))
    message = str(e.value)
    assert message.startswith("ddim: ") and "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_sample_steps_for_a_checkpoint_is_one_line(ddpm_ckpt):
    assert_one_line_error(run_in_process("ddim.py", "--sample", "--ckpt", ddpm_ckpt, "--device", "cpu"),
                          "--sample-steps 50", "T = 10")


# --------------------------------------------------------------------------------------------
# 4. The benchmark end to end (tiny), and its quality hook
# --------------------------------------------------------------------------------------------
def test_benchmark_runs_and_prints_the_table(ddpm_ckpt, tmp_path):
    out = str(tmp_path / "bench")
    r = run_script("benchmarks/ddim_vs_ddpm.py", "--ckpt", ddpm_ckpt, "--num-samples", "4", "--batch-size", "4",
                   "--ddim-steps", "2,5,20", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| D")]
    assert len(rows) == 5 and rows[0].startswith("| DDPM") and "skipping DDIM S = 20" in r.stdout, r.stdout
    cells = [row.strip("|").split("|") for row in rows]
    assert [int(c[1]) for c in cells] == [10, 2, 2, 5, 5]  # network calls per image
    assert float(cells[0][4]) == 1.0 and all(c[6].strip() == "n/a" for c in cells)
    assert "machine: CPU" in r.stdout and "command: python benchmarks/ddim_vs_ddpm.py" in r.stdout
    assert f"{ddpm_ckpt} (step 2, " in r.stdout and "cosine schedule, T = 10)" in r.stdout  # what the checkpoint holds
    for folder in ("ddpm-T10", "ddim-S2-eta0", "ddim-S2-eta1", "ddim-S5-eta0", "ddim-S5-eta1"):
        assert len(os.listdir(os.path.join(out, folder))) == 4, folder
    from PIL import Image
    with Image.open(os.path.join(out, "comparison.png")) as image:  # 4 images of each of the 5 settings, 8 a row
        assert image.size == (2 + 8 * 18, 2 + 3 * 18)
    # --var beta_tilde: DDPM samples with σ² = β̃ (same seed, so different images prove the flag is used)
    r = run_script("benchmarks/ddim_vs_ddpm.py", "--ckpt", ddpm_ckpt, "--num-samples", "4", "--batch-size", "4",
                   "--ddim-steps", "2", "--etas", "1", "--device", "cpu", "--out", out + "_bt", "--var", "beta_tilde")
    assert r.returncode == 0, r.stderr
    assert "| DDPM (σ² = β̃, clipped x̂₀) |" in r.stdout, r.stdout
    first = [Image.open(os.path.join(d, "ddpm-T10", "000000.png")).tobytes() for d in (out, out + "_bt")]
    assert first[0] != first[1]


def test_benchmark_scores_mnist_with_mnist_fid(monkeypatch):
    args = ddim_vs_ddpm.parse_args(["--ckpt", __file__, "--data-root", "somewhere"])
    calls = []
    fake = types.SimpleNamespace(score=lambda images, data_root: calls.append((images.shape, data_root)) or 1.5)
    monkeypatch.setitem(sys.modules, "mnist_fid", fake)
    name, measure = ddim_vs_ddpm.quality_measure("mnist", args)
    assert "MNIST-FID" in name and measure(torch.zeros(4, 1, 28, 28)) == 1.5
    assert calls == [((4, 1, 28, 28), "somewhere")]
    monkeypatch.setitem(sys.modules, "mnist_fid", None)  # the module missing: no score, and say so
    name, measure = ddim_vs_ddpm.quality_measure("mnist", args)
    assert measure is None and "n/a" in name
    assert ddim_vs_ddpm.quality_measure("cifar10", args)[1] is None  # FID only with --fid-weights


def test_tradeoff_figure_keeps_every_point_inside_its_frame(tmp_path):
    # The highest FID (45.98) lies above the last round tick below it (40): the y axis must reach past it,
    # or the η = 0 line leaves the plot through its top edge (y < 50, the frame's top in pixels).
    rows = [("DDPM (σ² = β̃, clipped x̂₀)", 100, 1.0, "13.66")]
    for S, fids in ((10, (45.98, 27.21)), (20, (27.19, 13.21)), (50, (21.07, 11.20))):
        rows += [(f"DDIM η = {eta:g}, trailing τ, clipped x̂₀", S, 1.0, f"{fid}") for eta, fid in zip((0, 1), fids)]
    path = str(tmp_path / "tradeoff.png")
    ddim_vs_ddpm.tradeoff_figure(rows, [0.0, 1.0], path, "MNIST-FID", "test")
    from PIL import Image
    import compare
    image = Image.open(path).convert("RGB")
    color, (W, H) = tuple(compare.COLORS[0]), image.size  # the η = 0 line's colour
    ys = [y for y in range(H) for x in range(W) if image.getpixel((x, y)) == color]
    assert ys and min(ys) >= 50, (min(ys) if ys else None)
