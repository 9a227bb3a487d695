"""vae.py: the ELBO's terms against independent computations, the network, and the script end to end."""
import csv
import json
import math
import os

import pytest
import torch

import vae
from conftest import MNIST_ROOT, assert_one_line_error, needs_mnist, run_script

TINY = ["--channels", "8", "--latent", "4", "--device", "cpu", "--batch-size", "8"]


# --------------------------------------------------------------------------------------------
# 1. The objective against independent computations
# --------------------------------------------------------------------------------------------
def test_closed_form_kl_equals_a_monte_carlo_estimate():
    """KL(q ‖ p) = E_q[log q(z) − log p(z)], estimated with 400k draws and torch.distributions."""
    torch.manual_seed(0)
    mu = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.7, 0.3]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, 0.0, 0.0], [-1.2, 0.8, 0.0]], dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((400_000,))  # (S, 2, 3)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)  # (2,)
    closed = vae.kl_divergence(mu, logvar)
    assert closed[0].item() == 0  # q = p: no divergence
    assert closed[1].item() == pytest.approx(monte_carlo[1].item(), rel=0.01)
    assert torch.allclose(closed, torch.distributions.kl_divergence(q, p).sum(-1))


def test_bernoulli_term_equals_torch_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 5, 5) * 3
    binary = torch.randint(0, 2, (3, 1, 5, 5)).float()  # {0, 1}
    got = vae.bernoulli_log_likelihood(binary * 2 - 1, logits)  # the script's pixels live in [-1, 1]
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(binary).sum((1, 2, 3))
    assert torch.allclose(got, expected, atol=1e-5)
    grey = torch.rand(3, 1, 5, 5)  # grey levels: the cross-entropy Σ x log p + (1 − x) log(1 − p)
    p = torch.sigmoid(logits.double())
    cross_entropy = (grey * p.log() + (1 - grey) * (1 - p).log()).sum((1, 2, 3))
    assert torch.allclose(vae.bernoulli_log_likelihood(grey * 2 - 1, logits).double(), cross_entropy, atol=1e-4)


def normal_bin_mass(x, mean, sigma):
    """The same discretised Gaussian from torch.distributions' CDF, in float64 (end bins open)."""
    normal = torch.distributions.Normal(mean.double(), sigma)
    upper = torch.where(x > 0.999, 1.0, normal.cdf(x.double() + 1 / 255))
    lower = torch.where(x < -0.999, 0.0, normal.cdf(x.double() - 1 / 255))
    return upper - lower


def test_discretized_gaussian_equals_cdf_differences_and_sums_to_one():
    torch.manual_seed(0)
    levels = torch.arange(256) / 127.5 - 1  # every 8-bit value in [-1, 1]
    for sigma in (0.02, 0.1, 1.0):
        for mean in (-1.3, -0.2, 0.5, 1.0):
            x = levels.view(256, 1, 1, 1)
            log_p = vae.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.tensor(math.log(sigma)))
            assert log_p.exp().double().sum().item() == pytest.approx(1.0, abs=1e-5)  # a probability over 256 values
    x = levels[torch.randint(0, 256, (4, 3, 2, 2))]
    mean = x + torch.randn(4, 3, 2, 2) * 0.2  # within a few σ: the float64 CDF differences stay exact
    got = vae.discretized_gaussian_log_likelihood(x, mean, torch.tensor(math.log(0.1)))
    expected = normal_bin_mass(x, mean, 0.1).log().sum((1, 2, 3))
    assert torch.allclose(got.double(), expected, rtol=1e-4)


def test_discretized_gaussian_far_tails_are_finite_with_finite_gradients():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0]).view(4, 1, 1, 1)
    for offset in (-3.0, 3.0):  # the mean 30 σ below or above every pixel value
        mean = (x + offset).requires_grad_()
        log_sigma = torch.tensor(math.log(0.1), requires_grad=True)
        log_p = vae.discretized_gaussian_log_likelihood(x, mean, log_sigma)
        log_p.sum().backward()
        assert torch.isfinite(log_p).all() and torch.isfinite(mean.grad).all() and torch.isfinite(log_sigma.grad)
        # x = −0.5: the bin is 30 σ ± (1/255)/σ from the mean; its mass from math.erfc (exact in float64)
        tail = lambda t: 0.5 * math.erfc(t / math.sqrt(2))  # noqa: E731  1 − Φ(t)
        assert log_p[1].item() == pytest.approx(math.log(tail(30 - 1 / 25.5) - tail(30 + 1 / 25.5)), abs=0.01)
        inner = [1, 2, 3] if offset < 0 else [0, 1, 2]  # the end bin on the mean's side holds ≈ all the mass
        assert log_p[[i for i in range(4) if i not in inner]].item() == pytest.approx(0, abs=1e-6)
        # the gradient pulls each mean back towards its pixel, with a slope of about 30/σ = 300
        assert (mean.grad[inner] * -offset / 3).min() > 250


def test_reparameterised_gradient_is_the_true_gradient():
    """For f(z) = z², E_q[f] = μ² + σ²: its gradients are 2μ (for μ) and σ² (for log σ²). The
    reparameterisation z = μ + σ ε turns the average over ε into an unbiased estimate of both."""
    model = vae.VAE(1, 8, latent=2, channels=4)
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    logvar = torch.tensor([0.0, -1.0], requires_grad=True)
    model.encode = lambda x: (mu.expand(len(x), 2), logvar.expand(len(x), 2))
    model.decode = lambda z: z  # the "decoder" hands z back: out = z = μ + σ ε
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    z, _, _ = model(torch.zeros(200_000, 1, 8, 8), eps)
    (z ** 2).mean(0).sum().backward()
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.02)
    assert torch.allclose(logvar.grad, logvar.detach().exp(), atol=0.02)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_reconstruction_gradient_reaches_the_encoder(likelihood):
    torch.manual_seed(0)
    model = vae.VAE(1, 28, latent=8, channels=8, likelihood=likelihood)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    reconstruction, _ = vae.elbo_terms(model, x)
    reconstruction.sum().backward()  # the reconstruction term alone: its only path to the encoder is z
    for name in ("encoder.0.weight", "to_stats.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    logvar_rows = model.to_stats.weight.grad[8:]  # log σ² gets gradient only because z = μ + σ ε
    assert logvar_rows.abs().sum() > 0


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_a_few_steps_lower_the_negative_elbo_on_a_fixed_batch(likelihood):
    torch.manual_seed(0)
    model = vae.VAE(1, 16, latent=8, channels=8, likelihood=likelihood)
    x = -torch.ones(16, 1, 16, 16)  # a fixed batch: black, with a white 6x6 square in one of 4 places
    for i in range(16):
        row, col = 2 + 6 * (i % 2), 2 + 6 * (i // 2 % 2)
        x[i, :, row:row + 6, col:col + 6] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def neg_elbo():
        reconstruction, kl = vae.elbo_terms(model, x, torch.Generator().manual_seed(1))  # the same ε each time
        return (kl - reconstruction).mean().item()
    before = neg_elbo()
    for _ in range(30):
        loss, nll, kl = vae.vae_loss(model, x)
        assert loss.item() == pytest.approx((nll + kl).mean().item(), rel=1e-5)  # β = 1: the loss is −ELBO
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert neg_elbo() < 0.7 * before


def test_beta_weights_only_the_kl_term():
    model = vae.VAE(1, 8, latent=3, channels=4)
    model.to_stats.bias.data[:3] = 2.0  # μ ≈ 2: a KL of about 6 nats, far above float32 round-off
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    loss_1, nll, kl = vae.vae_loss(model, x, beta=1.0)
    torch.manual_seed(3)
    loss_4, _, _ = vae.vae_loss(model, x, beta=4.0)
    assert loss_4.item() - loss_1.item() == pytest.approx(3 * kl.mean().item(), abs=1e-3)
    assert kl.mean().item() > 3


def test_network_shapes_and_halvings():
    for size, hidden in ((28, (32, 7, 7)), (32, (64, 4, 4)), (16, (32, 4, 4))):
        model = vae.VAE(3, size, latent=5, channels=8)
        assert model.hidden == hidden
        out, mu, logvar = model(torch.zeros(2, 3, size, size), torch.zeros(2, 5))
        assert out.shape == (2, 3, size, size) and mu.shape == logvar.shape == (2, 5)


# --------------------------------------------------------------------------------------------
# 2. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_its_files_then_samples_and_reconstructs(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_script("vae.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout and "test −ELBO" in r.stdout
    assert "| 4 test images |" in r.stdout  # the last 10% of a .npy file (48 images) are held out
    for f in ("config.json", "ckpt.pt", "metrics.csv", "progression.png", "samples/step_0000002.png",
              "samples/step_0000004.png", "reconstructions.png", "interpolation.png", "test_elbo.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:  # β = 1: the loss is the reconstruction term plus the KL
        assert float(row["loss"]) == pytest.approx(float(row["reconstruction"]) + float(row["kl"]), rel=1e-4)
    result = json.load(open(os.path.join(out, "test_elbo.json")))
    assert result["step"] == 4 and result["images"] == 4
    assert result["neg_elbo"] == pytest.approx(result["reconstruction"] + result["kl"])
    assert result["bits_per_dim"] == pytest.approx(result["neg_elbo"] / (3 * 16 * 16 * math.log(2)))
    assert result["reconstruction"] > 0 and result["kl"] > 0  # a cross-entropy ≥ 0, and a KL ≥ 0
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"model", "optimizer", "rng_cpu", "config"} and state["script"] == "vae"
    from PIL import Image
    assert Image.open(os.path.join(out, "progression.png")).height == 2 * (2 + 16 + 2)  # a row per grid
    assert Image.open(os.path.join(out, "interpolation.png")).size == (2 + 10 * 18, 2 + 2 * 18)  # 2 pairs, 10 a row

    r = run_script("vae.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(os.path.join(out, "generated", "000000.png")).size == (16, 16)

    r = run_script("vae.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                   "--num-samples", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "reconstructed"))) == [f"{i:06d}.png" for i in range(3)]
    assert os.path.isfile(os.path.join(out, "reconstructed_grid.png"))
    r = run_script("vae.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                   "--num-samples", "50", "--device", "cpu")
    assert_one_line_error(r, "only 4 test images")


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_npy):
    """Six steps in one go = three steps, a stop, and three more after --resume (bit for bit)."""
    common = dict(dataset=tiny_npy, channels=8, latent=4, device="cpu", batch_size=4, log_every=1, sample_every=100,
                  likelihood="gaussian", learn_sigma=True)  # σ is learned: it must resume too
    vae.train(vae.Config(out=str(tmp_path / "a"), steps=6, **common))
    vae.train(vae.Config(out=str(tmp_path / "b"), steps=3, **common))
    vae.train(vae.Config(out=str(tmp_path / "b"), steps=6, resume=True, **common))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    assert json.load(open(tmp_path / "a" / "test_elbo.json")) == json.load(open(tmp_path / "b" / "test_elbo.json"))
    assert a["model"]["log_sigma"].item() != math.log(0.1)  # σ moved from its start


def test_training_refuses_to_overwrite_a_run(tmp_path, tiny_npy):
    args = ["vae.py", "--dataset", tiny_npy, "--out", str(tmp_path / "run"), "--steps", "1", *TINY]
    assert run_script(*args).returncode == 0
    assert_one_line_error(run_script(*args), "--resume")


@pytest.mark.parametrize("args,words", [
    (["--likelihood", "poisson"], ["--likelihood", "gaussian"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--sigma", "0"], ["--sigma"]),
    (["--beta", "-1"], ["--beta"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--dataset", "no/such/folder"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--reconstruct"], ["--sample"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
])
def test_bad_flags_give_one_clear_line(args, words):
    """In-process (fast): each stops with sys.exit(one line); test_plumbing.py checks that such a line
    reaches the terminal alone, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        vae.main(vae.parse_args(args))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_checkpoint_gives_one_clear_line(tmp_path):
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("vae.py", "--sample", "--ckpt", str(broken)), "cannot read checkpoint")


@needs_mnist
def test_real_mnist_test_split():
    cfg = vae.Config(dataset="mnist", data_root=MNIST_ROOT)
    train, test = vae.get_test_data(cfg, vae.get_data(cfg)[0])
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert test.min() == -1 and test.max() == 1 and not torch.equal(train[:100], test[:100])
