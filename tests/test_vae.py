"""vae.py: the ELBO's terms against independent computations, the network and the sampler, and the script
end to end (files, sampling, reconstructing, exact resume, the previous version's checkpoints, bad flags)."""
import csv
import math
import os
import re

import numpy as np
import pytest
import torch

import vae
from conftest import MNIST_ROOT, assert_one_line_error, needs_mnist, run_in_process, run_script

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
    _, nll, _ = vae.vae_loss(model, x)
    nll.sum().backward()  # the reconstruction term alone: its only path to the encoder is z
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
        return vae.vae_loss(model, x, 1.0, torch.Generator().manual_seed(1))[0].item()  # the same ε each time
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
    loss_1, nll_1, kl = vae.vae_loss(model, x, 1.0, torch.Generator().manual_seed(3))
    loss_4, nll_4, _ = vae.vae_loss(model, x, 4.0, torch.Generator().manual_seed(3))
    assert torch.equal(nll_1, nll_4)  # the reconstruction term is untouched by β
    assert loss_4.item() - loss_1.item() == pytest.approx(3 * kl.mean().item(), abs=1e-3)
    assert kl.mean().item() > 3


def test_network_shapes_and_halvings():
    for size, hidden in ((28, (32, 7, 7)), (32, (64, 4, 4)), (16, (32, 4, 4))):
        model = vae.VAE(3, size, latent=5, channels=8)
        assert model.hidden == hidden
        out, mu, logvar = model(torch.zeros(2, 3, size, size), torch.zeros(2, 5))
        assert out.shape == (2, 3, size, size) and mu.shape == logvar.shape == (2, 5)


# --------------------------------------------------------------------------------------------
# 2. The held-out −ELBO and the sampler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_held_out_elbo_in_nats_and_bits_per_dim(likelihood, capsys):
    """The printed test −ELBO is the mean of −log p(x|z) + KL over the test images with one ε each (from the
    seed), in batches; bits/dim = −ELBO / (C·H·W · ln 2). The Gaussian decoder's −log p(x|z) is that of a
    probability of 8-bit pixels (≥ 0): its bits/dim bound −log₂ p(x)."""
    torch.manual_seed(0)
    cfg = vae.Config(latent=4, channels=4, likelihood=likelihood, batch_size=3, device="cpu")
    model = vae.VAE(3, 8, latent=4, channels=4, likelihood=likelihood)
    model.to_stats.bias.data[:4] = 1.0  # μ ≈ 1: a KL of about 2 nats, well above the printed precision
    test = ((torch.rand(7, 3, 8, 8) * 255).round() / 127.5 - 1)  # 8-bit pixels in [-1, 1]
    vae.held_out_elbo(model, cfg, test, torch.device("cpu"))
    printed = [float(v) for v in re.findall(r"-?\d+\.\d+", capsys.readouterr().out)]
    neg_elbo, nll, kl, bits = printed[:4]
    generator, terms = torch.Generator().manual_seed(cfg.seed), []
    for x in test.split(3):  # the same ε, drawn in the same batches
        terms.append(torch.stack(vae.vae_loss(model.eval(), x, 1.0, generator)[1:], 1))
    expected = torch.cat(terms).double().mean(0)  # (−log p(x|z), KL)
    assert nll == pytest.approx(expected[0].item(), abs=0.01) and kl == pytest.approx(expected[1].item(), abs=0.01)
    assert neg_elbo == pytest.approx(nll + kl, abs=0.02)
    assert bits == pytest.approx(neg_elbo / (3 * 8 * 8 * math.log(2)), rel=1e-3)
    assert nll > 0 and kl > 0  # (a cross-entropy, or −log of a probability, is ≥ 0; so is a KL)


def test_decoder_mean_reconstructions_and_interpolation_rows():
    """decode() shows E[x|z] (sigmoid of the Bernoulli logits, in [-1, 1]); a reconstruction decodes μ(x);
    interpolation row i runs from image i to image i + 1 (the last to the first) through their codes: its
    second and second-to-last images are the two reconstructions."""
    torch.manual_seed(0)
    model, cfg, cpu = vae.VAE(1, 8, latent=3, channels=4).eval(), vae.Config(batch_size=2), torch.device("cpu")
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    z = torch.randn(5, 3)
    assert torch.allclose(vae.decode(model, cfg, z, cpu), torch.sigmoid(model.decode(z)) * 2 - 1, atol=1e-6)
    recon = vae.reconstruct(model, cfg, images, cpu)
    assert torch.allclose(recon, vae.decode(model, cfg, model.encode(images)[0], cpu), atol=1e-6)
    rows = vae.interpolate(model, cfg, images, cpu).view(3, 10, 1, 8, 8)  # a, 8 decoded codes, b
    assert torch.equal(rows[:, 0], images) and torch.equal(rows[:, -1], images.roll(-1, 0))
    assert torch.allclose(rows[:, 1], recon, atol=1e-5) and torch.allclose(rows[:, -2], recon.roll(-1, 0), atol=1e-5)
    assert rows.abs().max() <= 1


# --------------------------------------------------------------------------------------------
# 3. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_its_files_then_samples_and_reconstructs(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_in_process("vae.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "test −ELBO" in r.stdout
    assert "44 images + 4 to test" in r.stdout  # the last 10% of a .npy file (48 images) are held out
    for f in ("config.json", "ckpt.pt", "metrics.csv", "samples/step_0000002.png", "samples/step_0000004.png",
              "interpolation.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:  # β = 1: the loss is the reconstruction term plus the KL
        assert float(row["loss"]) == pytest.approx(float(row["reconstruction"]) + float(row["kl"]), rel=1e-4)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and set(state) >= {"model", "optimizer", "rng_cpu", "config"} and state["script"] == "vae"
    from PIL import Image
    assert Image.open(os.path.join(out, "interpolation.png")).size == (2 + 10 * 18, 2 + 4 * 18)  # 4 test images

    r = run_in_process("vae.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(os.path.join(out, "generated", "000000.png")).size == (16, 16)
    assert os.path.isfile(os.path.join(out, "generated_grid.png"))
    r = run_in_process("vae.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                   "--num-samples", "50", "--device", "cpu")  # more than the test split holds: all 4 of it
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "reconstructed"))) == [f"{i:06d}.png" for i in range(4)]
    assert os.path.isfile(os.path.join(out, "reconstructed_grid.png"))


def test_fid_flag_scores_prior_samples(tmp_path, tiny_npy, capsys):
    """--sample --fid N: N prior samples scored by fid.py against the training set (a random Inception:
    offline, the number meaningless, its path through the script the same)."""
    np.save(tiny_npy, np.load(tiny_npy)[:8])  # a small reference set: Inception is slow on a CPU
    vae.train(vae.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=1, channels=8, latent=4, device="cpu"))
    vae.main(vae.parse_args(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--num-samples", "2", "--fid",
                             "4", "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path)]))
    assert len(os.listdir(tmp_path / "run" / "generated")) == 4  # max(--num-samples, --fid) images
    assert re.search(r"FID -?\d+\.\d+ \(4 samples vs .*sprites\.npy", capsys.readouterr().out)


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
    for k, v in a["optimizer"]["state"].items():  # Adam's moments and step counts
        assert all(torch.equal(v[s], b["optimizer"]["state"][k][s]) for s in v), k
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    assert a["model"]["log_sigma"].item() != math.log(0.1)  # σ moved from its start


OLD_CONFIG = dict(  # the config of a checkpoint written by the previous vae.py (its fields, as it saved them)
    dataset="x.npy", data_root="data", image_size=16, latent=4, channels=8, likelihood="gaussian", sigma=0.1,
    learn_sigma=True, beta=1.0, steps=2, batch_size=8, lr=1e-3, out="", device="cpu", precision="auto",
    compile=False, seed=0, log_every=100, sample_every=2000, ckpt_every=2000, resume=False, ckpt="", sample=False,
    reconstruct=False, num_samples=64, fid=0, fid_weights="")


def test_a_checkpoint_of_the_previous_version_still_samples(tmp_path):
    """The previous version saved {model, optimizer, step, config, script, rng_cpu, rng_cuda, log_sums}, with
    the same network: --sample reads it, into its folder."""
    model = vae.VAE(3, 16, latent=4, channels=8, likelihood="gaussian")
    optimizer = torch.optim.Adam(model.parameters())
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=2, config=OLD_CONFIG,
                    script="vae", rng_cpu=torch.get_rng_state(), rng_cuda=torch.empty(0), log_sums=(None, 0)),
               tmp_path / "ckpt.pt")
    vae.main(vae.parse_args(["--sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "3"]))
    assert sorted(os.listdir(tmp_path / "generated")) == ["000000.png", "000001.png", "000002.png"]
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))  # --sample's z (seed 0): the saved weights
    from PIL import Image
    first = torch.tensor(np.asarray(Image.open(tmp_path / "generated" / "000000.png")), dtype=torch.float)  # (H, W, 3)
    expected = (vae.decode(model.eval(), vae.Config(), z, torch.device("cpu"))[0] * 0.5 + 0.5) * 255  # (3, H, W)
    assert torch.allclose(first, expected.permute(1, 2, 0), atol=1)


@pytest.mark.parametrize("args,words", [
    (["--likelihood", "poisson"], ["--likelihood", "gaussian"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--sigma", "0"], ["--sigma"]),
    (["--beta", "-1"], ["--beta"]),
    (["--dataset", "no/such/folder", "--out", "{tmp}"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--reconstruct"], ["--sample"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
])
def test_bad_flags_give_one_clear_line(args, words, tmp_path):
    """In-process (fast): each stops with sys.exit(one line). One of them also from the command line, where
    the line reaches stderr alone, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        vae.main(vae.parse_args([a.replace("{tmp}", str(tmp_path / "run")) for a in args]))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    if args[0] == "--sigma":
        assert_one_line_error(run_script("vae.py", *args), *words)


@needs_mnist
def test_real_mnist_test_split():
    cfg = vae.Config(dataset="mnist", data_root=MNIST_ROOT)
    train, test = vae.get_test_data(cfg, vae.get_data(cfg)[0])
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert test.min() == -1 and test.max() == 1 and not torch.equal(train[:100], test[:100])
