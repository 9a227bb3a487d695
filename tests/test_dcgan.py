"""dcgan.py: the networks, the game's losses, the quality check, and the script end to end."""
import copy
import csv
import math
import os

import pytest
import torch
import torch.nn as nn

import dcgan
from conftest import assert_one_line_error, run_script

TINY = ["--g-channels", "8", "--d-channels", "8", "--batch-size", "8", "--check-n", "16", "--device", "cpu"]


def tiny_nets(size=16, channels=3, width=8, seed=0):
    torch.manual_seed(seed)
    return dcgan.build_model(dcgan.Config(image_size=size, g_channels=width, d_channels=width), channels)


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
    z = torch.randn(5, 100)
    x = G(z)
    assert x.shape == (5, channels, size, size)
    assert x.abs().max() <= 1  # tanh output, the data's range
    assert D(x).shape == (5,)
    # no upsampling anywhere: every size change is a stride-2 (transposed) convolution
    assert not any(isinstance(m, nn.Upsample) for m in G.modules())
    start, _ = dcgan.layer_plan(size)
    assert G.net[0](z[:, :, None, None]).shape[-1] == start  # z is projected to start×start


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
    assert isinstance(D.net[1], nn.LeakyReLU) and D.net[1].negative_slope == 0.2
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
    fake = G(torch.randn(32, 100)).detach()
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
    z = torch.randn(32, 100)
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


def test_generate_is_reproducible_and_independent_of_the_batch():
    G, _ = tiny_nets(16, 3)
    G.train()
    cfg = dcgan.Config(batch_size=8, latent=100)
    one = dcgan.generate(G, cfg, 10, None, torch.device("cpu"), torch.Generator().manual_seed(3))
    two = dcgan.generate(G, dcgan.Config(batch_size=3), 10, None, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert one.shape == (10, 3, 16, 16) and torch.allclose(one, two, atol=1e-6)  # eval-mode BatchNorm
    assert G.training  # the caller's mode is restored


def test_the_quality_checks_batch_statistics_mode_normalises_each_batch_and_leaves_g_alone():
    """batch_statistics=True (what the check uses): each batch's images are normalised with that batch's
    own BatchNorm statistics, so they depend on the batch size, and G's running statistics do not move."""
    G, _ = tiny_nets(16, 3)
    G.eval()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    cfg = dcgan.Config(batch_size=8, latent=100)
    gen = lambda size: dcgan.generate(G, dcgan.Config(batch_size=size), 10, None, torch.device("cpu"),  # noqa: E731
                                      torch.Generator().manual_seed(3), batch_statistics=True)
    whole, split = gen(10), gen(5)
    assert not torch.allclose(whole, split, atol=1e-3)  # the batch's statistics, not the running ones
    for i in range(0, 10, 5):  # = G in training mode on each batch of 5
        z = torch.randn(10, cfg.latent, generator=torch.Generator().manual_seed(3))[i:i + 5]
        expected = copy.deepcopy(G).train()(z)
        assert torch.allclose(split[i:i + 5], expected, atol=1e-6)
    assert not G.training and all(torch.equal(v, before[k]) for k, v in G.state_dict().items())


# --------------------------------------------------------------------------------------------
# 3. The quality check
# --------------------------------------------------------------------------------------------
def test_frechet_distance_against_closed_forms():
    # diagonal covariances: d² = ‖μ₁ − μ₂‖² + Σ (σ₁ᵢ − σ₂ᵢ)²
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    assert dcgan.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected.item(), rel=1e-9)
    # full, non-commuting covariances: tr (Σ₁Σ₂)^½ from the eigenvalues of the product itself
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    sigma1, sigma2 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    cross = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0).sqrt().sum()
    expected = mu.square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    got = dcgan.frechet_distance(mu, sigma1, torch.zeros(6, dtype=torch.float64), sigma2)
    assert got == pytest.approx(expected.item(), rel=1e-8)
    assert dcgan.frechet_distance(mu, sigma1, mu, sigma1) == pytest.approx(0.0, abs=1e-8)


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
    torch.manual_seed(123)  # φ must not depend on the global seed
    phi = dcgan.feature_net(1)
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(phi.parameters(), dcgan.feature_net(1).parameters()))
    cpu = torch.device("cpu")
    reference = dcgan.feature_stats(phi, strokes(600, 0), cpu)

    def fd(images):
        return dcgan.frechet_distance(*dcgan.feature_stats(phi, images, cpu), *reference)
    same = fd(strokes(600, 1))  # other images from the same law
    blurred = fd(torch.nn.functional.avg_pool2d(strokes(600, 1), 3, 1, 1))
    noisy = fd((strokes(600, 1) + 0.5 * torch.randn(600, 1, 28, 28)).clamp(-1, 1))
    collapsed = fd(strokes(600, 1)[:3].repeat(200, 1, 1, 1))  # three images, 200 copies each
    assert same < 0.5 * min(blurred, noisy, collapsed), (same, blurred, noisy, collapsed)


# --------------------------------------------------------------------------------------------
# 4. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_ckpt_best_grids_and_metrics_then_samples(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_script("dcgan.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", "--check-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "d_fake" in r.stdout and "img/s" in r.stdout
    for f in ("config.json", "ckpt.pt", "best.pt", "metrics.csv", "quality.csv", "progression.png",
              "samples/step_0000002.png", "samples/step_0000004.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in ("loss_d", "loss_g"))
        assert all(0 < float(row[k]) < 1 for k in ("d_real", "d_fake"))
    checks = list(csv.DictReader(open(os.path.join(out, "quality.csv"))))
    assert [int(c["step"]) for c in checks] == [2, 4]
    best = min(checks, key=lambda c: float(c["value"]))
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"generator", "discriminator", "optimizer_g", "optimizer_d",
                                                 "rng_cpu", "config", "best_value", "best_step"}
    assert state["script"] == "dcgan"  # loading checks the writer first
    best_state = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert best_state["step"] == state["best_step"] == int(best["step"])
    assert best_state["best_value"] == pytest.approx(float(best["value"]), abs=1e-3)

    r = run_script("dcgan.py", "--sample", "--ckpt", os.path.join(out, "best.pt"), "--num-samples", "5",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    pngs = sorted(os.listdir(os.path.join(out, "generated")))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    assert Image.open(os.path.join(out, "generated", pngs[0])).size == (16, 16)


def test_resume_continues_exactly_at_the_saved_step(tmp_path, tiny_npy, capsys):
    """Six steps in one go = three steps, a stop, and three more after --resume (bit for bit)."""
    common = dict(dataset=tiny_npy, g_channels=8, d_channels=8, device="cpu", batch_size=4, log_every=1,
                  sample_every=100, check_every=2, check_n=16)
    dcgan.train(dcgan.Config(out=str(tmp_path / "a"), steps=6, **common))
    dcgan.train(dcgan.Config(out=str(tmp_path / "b"), steps=3, **common))
    dcgan.train(dcgan.Config(out=str(tmp_path / "b"), steps=6, resume=True, **common))
    assert "at step 3" in capsys.readouterr().out
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 6
    for key in ("generator", "discriminator"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert [r[key] for r in rows_b] == [r[key] for r in rows_a]
    # checks at 2, 3 (the end of the first part), 4, 6; the same values where both runs checked
    checks_a = {c["step"]: c["value"] for c in csv.DictReader(open(tmp_path / "a" / "quality.csv"))}
    checks_b = {c["step"]: c["value"] for c in csv.DictReader(open(tmp_path / "b" / "quality.csv"))}
    assert list(checks_b) == ["2", "3", "4", "6"] and all(checks_b[s] == checks_a[s] for s in ("2", "4", "6"))


def test_training_refuses_to_overwrite_a_run(tmp_path, tiny_npy):
    args = ["dcgan.py", "--dataset", tiny_npy, "--out", str(tmp_path / "run"), "--steps", "1", *TINY]
    assert run_script(*args).returncode == 0
    assert_one_line_error(run_script(*args), "--resume")


@pytest.mark.parametrize("args,words", [
    (["--check", "inception"], ["--check", "proxy"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--check-n", "1"], ["--check-n"]),
    (["--beta1", "1.5"], ["--beta1"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--dataset", "no/such/folder"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--sample", "--ckpt", "missing/best.pt"], ["missing/best.pt"]),
])
def test_bad_flags_give_one_clear_line(args, words):
    """In-process (fast): each stops with sys.exit(one line); test_plumbing.py checks that such a line
    reaches the terminal alone, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        dcgan.main(dcgan.parse_args(args))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_files_and_sizes_give_one_clear_line(tmp_path, tiny_npy):
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("dcgan.py", "--sample", "--ckpt", str(broken)), "cannot read checkpoint")
    assert_one_line_error(run_script("dcgan.py", "--dataset", tiny_npy, "--image-size", "6", "--out",
                                     str(tmp_path / "r"), *TINY), "image size 6", "--image-size")


def test_fid_flag_scores_samples_of_best_pt(tmp_path, tiny_npy):
    """--fid N in --sample mode: N images scored by fid.py (random Inception: offline, numbers meaningless)."""
    out = str(tmp_path / "run")
    assert run_script("dcgan.py", "--dataset", tiny_npy, "--out", out, "--steps", "2", "--check-every", "1",
                      *TINY).returncode == 0
    r = run_script("dcgan.py", "--sample", "--ckpt", os.path.join(out, "best.pt"), "--num-samples", "2",
                   "--fid", "4", "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "FID" in r.stdout
    rows = open(os.path.join(out, "fid.csv")).read().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[1] == "4"
