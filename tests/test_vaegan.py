"""vaegan.py: each loss against an independent computation, which network each loss reaches, the
networks' shapes, and the script end to end (files, sampling, exact resume, one-line errors)."""
import csv
import math
import os

import pytest
import torch

import vaegan
from conftest import assert_one_line_error, run_script

TINY = ["--channels", "4", "--d-channels", "4", "--latent", "3", "--device", "cpu", "--batch-size", "8"]
NETWORKS = ("encoder", "decoder", "discriminator")


def tiny_batch(seed=0, size=16, channels=1, n=6, latent=3):
    """A tiny model (weights large enough that no loss is ≈ 0) and a fixed batch x, ε, z_p."""
    torch.manual_seed(seed)
    model = vaegan.VAEGAN(channels, size, latent=latent, channels=4, d_channels=4)
    for p in model.parameters():  # DCGAN's N(0, 0.02) would make every logit ≈ 0; spread them out
        p.data.normal_(0, 0.3)
    x = torch.rand(n, channels, size, size) * 2 - 1
    return model, x, torch.randn(n, latent), torch.randn(n, latent)


# --------------------------------------------------------------------------------------------
# 1. Each loss term against an independent computation
# --------------------------------------------------------------------------------------------
def test_kl_equals_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(vaegan.kl_divergence(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1))
    assert vaegan.kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0  # q = p


def test_every_loss_term_on_a_fixed_batch():
    """Recompute L_prior, L_llike and both GAN losses from the networks' parts, in float64, with real, x̃ and
    x_p through D as three batches: D has BatchNorm (in training mode here), so a D that saw them as one
    batch would give other logits and features, and this test would fail."""
    model, x, eps, z_p = tiny_batch()
    model.train()
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        z = mu + (0.5 * logvar).exp() * eps
        x_recon, x_prior = model.decoder(torch.cat([z, z_p])).split(len(x))  # BatchNorm: one batch, as in training
        (l_real, f_real), (l_recon, f_recon), (l_prior, _) = (model.discriminator(v) for v in (x, x_recon, x_prior))
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    # L_llike = −log N(Dis_l(x) | Dis_l(x̃), I) without its constant ½·D·log 2π
    f_real, f_recon = f_real.flatten(1).double(), f_recon.flatten(1).double()
    dims = f_real.shape[1]
    llike = (-torch.distributions.Normal(f_recon, 1.0).log_prob(f_real).sum(1) - 0.5 * dims * math.log(2 * math.pi)).mean()
    D = lambda logit: 1 / (1 + torch.exp(-logit.double()))  # noqa: E731  D = σ(logit), straight from the definition
    gan_discriminator = -(D(l_real).log().mean() + (1 - D(l_recon)).log().mean() + (1 - D(l_prior)).log().mean())
    gan_decoder = -(D(l_recon).log().mean() + D(l_prior).log().mean())
    for name, expected in (("prior", kl), ("llike", llike), ("gan_discriminator", gan_discriminator),
                           ("gan_decoder", gan_decoder)):
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-5), name
    assert losses["llike"].item() > 1 and losses["prior"].item() > 0.1  # far from 0: the comparison means something
    expected_d = torch.stack([D(l).mean() for l in (l_real, l_recon, l_prior)]).float()
    assert torch.allclose(losses["probabilities"], expected_d, atol=1e-6)


def test_feature_loss_is_zero_for_a_perfect_reconstruction_and_half_the_squared_distance():
    a = torch.randn(3, 2, 4, 4)
    assert torch.equal(vaegan.feature_loss(a, a), torch.zeros(3))
    b = a.clone()
    b[1, 0, 0, 0] += 3.0
    assert torch.allclose(vaegan.feature_loss(a, b), torch.tensor([0.0, 4.5, 0.0]))


def test_feature_loss_with_sigma_is_the_gaussian_negative_log_likelihood():
    """--feature-sigma σ: L_llike = −log N(Dis_l(x) | Dis_l(x̃), σ² I) without its constant (it does not
    depend on the networks), checked against torch.distributions."""
    a, b = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for sigma in (0.5, 1.0, 3.0):
        nll = -torch.distributions.Normal(b.flatten(1), sigma).log_prob(a.flatten(1)).sum(1)
        constant = 32 * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        assert torch.allclose(vaegan.feature_loss(a, b, sigma), nll - constant)


# --------------------------------------------------------------------------------------------
# 2. Each loss reaches exactly the networks it is meant to update
# --------------------------------------------------------------------------------------------
TOUCHES = {"prior": {"encoder"}, "llike": {"encoder", "decoder"}, "gan_decoder": {"decoder"},
           "gan_discriminator": {"discriminator"}}


def grads(model):
    return {name: [p.grad for p in getattr(model, name).parameters()] for name in NETWORKS}


@pytest.mark.parametrize("term", sorted(TOUCHES))
def test_each_loss_alone_reaches_only_its_networks(term):
    model, x, eps, z_p = tiny_batch(seed=1)
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    only = {k: (v if k == term else 0 * v) for k, v in losses.items()}  # the others still in the graph, at weight 0
    vaegan.set_gradients(model, only, gamma=1.0, adv_weight=1.0)
    for name, gs in grads(model).items():
        assert all(g is not None for g in gs), name  # every network got its .grad set ...
        reached = sum(g.abs().sum().item() for g in gs) > 0
        assert reached == (name in TOUCHES[term]), (term, name)  # ... and only these are non-zero


def test_the_graph_connects_what_the_update_rules_keep_apart():
    """The routing test above would pass trivially if L_GAN could not reach the encoder or L_llike the
    discriminator at all. They can (through z, and through Dis_l); set_gradients just never asks."""
    model, x, eps, z_p = tiny_batch(seed=2)
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    to_encoder = torch.autograd.grad(losses["gan_decoder"], list(model.encoder.parameters()), retain_graph=True)
    to_discriminator = torch.autograd.grad(losses["llike"], list(model.discriminator.body.parameters()))  # Dis_l's layers
    assert sum(g.abs().sum() for g in to_encoder) > 0 and sum(g.abs().sum() for g in to_discriminator) > 0


def test_gradients_are_the_weighted_sums_of_algorithm_1():
    model, x, eps, z_p = tiny_batch(seed=3)
    gamma, adv = 0.7, 0.3
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    vaegan.set_gradients(model, losses, gamma, adv)
    got = grads(model)

    def grad_of(loss, name):
        return torch.autograd.grad(loss, list(getattr(model, name).parameters()), retain_graph=True)
    expected = {"encoder": [a + b for a, b in zip(grad_of(losses["prior"], "encoder"), grad_of(losses["llike"], "encoder"))],
                "decoder": [gamma * a + adv * b for a, b in zip(grad_of(losses["llike"], "decoder"),
                                                                grad_of(losses["gan_decoder"], "decoder"))],
                "discriminator": grad_of(losses["gan_discriminator"], "discriminator")}
    for name in NETWORKS:
        for g, e in zip(got[name], expected[name]):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item()), name  # float32 sums: order


def test_one_discriminator_update_lowers_its_loss_and_moves_no_other_network():
    model, x, eps, z_p = tiny_batch(seed=4)
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()  # fixed BatchNorm statistics: the same decoder outputs before and after
    loss_before = vaegan.vaegan_losses(model, x, eps, z_p)
    vaegan.set_gradients(model, loss_before, 1.0, 0.1)
    optimizer.step()
    loss_after = vaegan.vaegan_losses(model, x, eps, z_p)
    assert loss_after["gan_discriminator"] < loss_before["gan_discriminator"]
    for k, v in model.state_dict().items():
        if k.startswith("discriminator") and k not in dict(model.named_parameters()):
            continue  # BatchNorm's running statistics: in eval mode, untouched by design
        assert torch.equal(v, before[k]) == (not k.startswith("discriminator")), k


# --------------------------------------------------------------------------------------------
# 3. The networks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["larsen", "v1"])
@pytest.mark.parametrize("size,channels,side", [(16, 3, 4), (28, 1, 7), (32, 3, 4)])
def test_shapes(size, channels, side, arch):
    model = vaegan.VAEGAN(channels, size, latent=5, channels=4, d_channels=4, arch=arch).eval()
    x = torch.rand(2, channels, size, size) * 2 - 1
    mu, logvar = model.encoder(x)
    assert mu.shape == logvar.shape == (2, 5)
    out = model.decoder(mu)
    assert out.shape == x.shape and out.abs().max() <= 1  # tanh: the data's range
    logits, features = model.discriminator(x)
    halvings = {16: 2, 28: 2, 32: 3}[size]
    assert logits.shape == (2,) and features.shape == (2, 4 * 2 ** (halvings - 1), side, side)
    norms = [m for m in model.discriminator.body if isinstance(m, torch.nn.BatchNorm2d)]
    # larsen: BatchNorm after every strided convolution but the first, none on Dis_l (it is read before its
    # BatchNorm, which opens the head); v1: no BatchNorm at all
    assert len(norms) == ((halvings - 1) if arch == "larsen" else 0)
    assert isinstance(model.discriminator.head[0], torch.nn.BatchNorm2d) == (arch == "larsen")


def test_larsen_narrows_the_encoders_dense_layer_and_d_dense_sets_the_discriminators():
    """The 28 px networks of the MNIST recipe: the encoder's Linear reads a 4x narrower map; --d-dense N
    puts a dense layer of N units between Dis_l and the logit (0: none); the decoder is the same."""
    new, old = (vaegan.VAEGAN(1, 28, 128, 64, 64, arch=a) for a in ("larsen", "v1"))
    assert new.encoder.to_stats.in_features * 4 == old.encoder.to_stats.in_features == 128 * 7 * 7
    dense = [m for m in new.discriminator.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(128 * 7 * 7, 512), (512, 1)]
    none = vaegan.VAEGAN(1, 28, 128, 64, 64, arch="larsen", d_dense=0).discriminator.head
    assert not any(isinstance(m, torch.nn.Linear) for m in none) and none(torch.randn(2, 128, 7, 7)).shape == (2, 1, 1, 1)
    assert sum(p.numel() for p in new.decoder.parameters()) == sum(p.numel() for p in old.decoder.parameters())


def test_bad_image_size_is_one_clear_line():
    with pytest.raises(SystemExit, match="image size 27"):
        vaegan.layer_plan(27)


# --------------------------------------------------------------------------------------------
# 4. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_its_files_then_samples_and_reconstructs(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_script("vaegan.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "| 4 test images |" in r.stdout
    for f in ("config.json", "ckpt.pt", "metrics.csv", "progression.png", "samples/step_0000002.png",
              "samples/step_0000004.png", "reconstructions.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row in rows:
        assert float(row["prior"]) >= 0 and float(row["llike"]) >= 0 and float(row["gan_discriminator"]) > 0
        assert all(0 < float(row[c]) < 1 for c in ("d_real", "d_recon", "d_prior"))
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and state["script"] == "vaegan" and {"model", "optimizer", "rng_cpu"} <= set(state)

    r = run_script("vaegan.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    assert Image.open(os.path.join(out, "generated", "000000.png")).size == (16, 16)
    r = run_script("vaegan.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                   "--num-samples", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "reconstructed"))) == [f"{i:06d}.png" for i in range(3)]
    assert_one_line_error(run_script("vaegan.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                                     "--num-samples", "50", "--device", "cpu"), "only 4 test images")
    assert_one_line_error(run_script("vaegan.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY), "--resume")


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_npy):
    """Six steps in one go = three steps, a stop, and three more after --resume (bit for bit)."""
    common = dict(dataset=tiny_npy, channels=4, d_channels=4, latent=3, device="cpu", batch_size=4, log_every=1,
                  sample_every=100)
    vaegan.train(vaegan.Config(out=str(tmp_path / "a"), steps=6, **common))
    vaegan.train(vaegan.Config(out=str(tmp_path / "b"), steps=3, **common))
    vaegan.train(vaegan.Config(out=str(tmp_path / "b"), steps=6, resume=True, **common))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 6
    for name in a["model"]:  # all three networks, and BatchNorm's running statistics
        assert torch.equal(a["model"][name], b["model"][name]), name
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    for column in ("prior", "llike", "gan_decoder", "gan_discriminator", "d_real"):
        assert [r[column] for r in rows_b] == [r[column] for r in rows_a], column
    init = vaegan.build_model(vaegan.Config(image_size=16, channels=4, d_channels=4, latent=3), 3)
    assert not torch.equal(a["model"]["decoder.net.0.weight"], init.state_dict()["decoder.net.0.weight"])


def test_a_checkpoint_from_before_arch_samples_and_resumes_as_v1(tmp_path, tiny_npy):
    """Checkpoints written before --arch existed hold v1 networks and no "arch" in their config: they still
    sample, reconstruct and resume, as v1 (the default, larsen, could not load their weights)."""
    out = tmp_path / "old"
    common = dict(dataset=tiny_npy, channels=4, d_channels=4, latent=3, device="cpu", batch_size=4, sample_every=100)
    vaegan.train(vaegan.Config(out=str(out), steps=2, arch="v1", **common))
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for field in ("arch", "d_dense", "feature_sigma"):  # as an older vaegan.py wrote it: none of these fields
        del state["config"][field]
    torch.save(state, out / "ckpt.pt")
    model, cfg, shape, _ = vaegan.load_for_sampling(vaegan.Config(ckpt=str(out / "ckpt.pt")))
    assert cfg.arch == "v1" and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())
    for extra in ([], ["--reconstruct"]):
        r = run_script("vaegan.py", "--sample", *extra, "--ckpt", str(out / "ckpt.pt"), "--num-samples", "3",
                       "--device", "cpu")
        assert r.returncode == 0, r.stderr
    vaegan.train(vaegan.Config(out=str(out), steps=3, resume=True, **common))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("args,words", [
    (["--gamma", "-1"], ["--gamma"]),
    (["--adv-weight", "-0.1"], ["--adv-weight"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--dataset", "no/such/folder", "--out", "{tmp}"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--reconstruct"], ["--sample"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
])
def test_bad_flags_stop_with_one_line(args, words, tmp_path):
    """In-process (fast): every bad input ends in sys.exit(one line). The subprocess test below checks
    that such an exit reaches the user as one line on stderr, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        vaegan.main(vaegan.parse_args([a.replace("{tmp}", str(tmp_path)) for a in args]))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_checkpoint_and_bad_image_size_give_one_clear_line(tmp_path, tiny_npy):
    broken = tmp_path / "ckpt.pt"
    broken.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("vaegan.py", "--precision", "fp8"), "--precision")
    assert_one_line_error(run_script("vaegan.py", "--sample", "--ckpt", str(broken)), "cannot read checkpoint")
    assert_one_line_error(run_script("vaegan.py", "--dataset", tiny_npy, "--image-size", "27", "--out",
                                     str(tmp_path / "run"), *TINY), "image size 27")


def test_fid_flag_scores_prior_samples_and_reconstructions(tmp_path, tiny_npy):
    """--fid N in --sample mode, for prior samples and for --reconstruct: N images scored by fid.py (a
    random Inception: offline, numbers meaningless) and one fid.csv row each, naming which set it was."""
    out = str(tmp_path / "run")
    assert run_script("vaegan.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY).returncode == 0
    for extra in ([], ["--reconstruct"]):
        r = run_script("vaegan.py", "--sample", *extra, "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "2",
                       "--fid", "4", "--fid-weights", "random", "--device", "cpu", "--data-root", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert "FID" in r.stdout
    rows = list(csv.DictReader(open(os.path.join(out, "fid.csv"))))
    assert [r["n"] for r in rows] == ["4", "4"] and all(math.isfinite(float(r["fid"])) for r in rows)
    assert [r["sampler"].endswith(f"reconstruct={v}") for r, v in zip(rows, ("False", "True"))] == [True, True]
