"""vaegan.py: each loss against an independent computation, what goes through the discriminator together,
which network each loss reaches, the networks' shapes, and the script end to end (files, sampling, exact
resume, the previous version's checkpoints, one-line errors)."""
import csv
import math
import os
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import vaegan
from conftest import assert_one_line_error, run_in_process, run_script

TINY = ["--channels", "4", "--d-channels", "4", "--latent", "3", "--device", "cpu", "--batch-size", "8"]
NETWORKS = ("encoder", "decoder", "discriminator")


def tiny_batch(seed=0, size=16, channels=1, n=6, latent=3):
    """A tiny model (weights large enough that no loss is ≈ 0) and a fixed batch x, ε, z_p."""
    torch.manual_seed(seed)
    model = vaegan.build_model(vaegan.Config(image_size=size, latent=latent, channels=4, d_channels=4, d_dense=8),
                               channels)
    for p in model.parameters():  # DCGAN's N(0, 0.02) would make every logit ≈ 0; spread them out
        p.data.normal_(0, 0.3)
    x = torch.rand(n, channels, size, size) * 2 - 1
    return model, x, torch.randn(n, latent), torch.randn(n, latent)


# --------------------------------------------------------------------------------------------
# 1. Each loss term against an independent computation
# --------------------------------------------------------------------------------------------
def test_every_loss_term_on_a_fixed_batch():
    """Recompute L_prior (torch.distributions' KL), L_llike and both GAN losses from the networks' parts, in
    float64, sending through D what the script sends: x and x̃ as one batch for Dis_l (the authors' code), and
    x, x̃ and x_p each as its own batch for the logits (DCGAN's way). D has BatchNorm (in training mode here):
    other batches give other numbers."""
    model, x, eps, z_p = tiny_batch()
    model.train()
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=1)
        z = mu + (0.5 * logvar).exp() * eps
        x_recon, x_prior = model.decoder(torch.cat([z, z_p])).split(len(x))  # BatchNorm: one batch, as in training
        f_real, f_recon = model.discriminator.body(torch.cat([x, x_recon])).split(len(x))
        l_real, l_recon, l_prior = (model.discriminator(v).flatten() for v in (x, x_recon, x_prior))
        alone, joined = model.discriminator.body(x), model.discriminator(torch.cat([x, x_recon, x_prior])).flatten()
    assert (alone - f_real).abs().max() > 1e-3  # (Dis_l(x) depends on its batch: the batching is tested here,
    assert (joined[:len(x)] - l_real).abs().max() > 1e-3  # and so do the logits)
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    # L_llike = −log N(Dis_l(x) | Dis_l(x̃), I) without its constant ½·D·log 2π
    f_real, f_recon = f_real.flatten(1).double(), f_recon.flatten(1).double()
    dims = f_real.shape[1]
    llike = (-torch.distributions.Normal(f_recon, 1.0).log_prob(f_real).sum(1) - 0.5 * dims * math.log(2 * math.pi))
    D = lambda logit: 1 / (1 + torch.exp(-logit.double()))  # noqa: E731  D = σ(logit), straight from the definition
    gan_discriminator = -(D(l_real).log().mean() + (1 - D(l_recon)).log().mean() + (1 - D(l_prior)).log().mean())
    gan_decoder = -(D(l_recon).log().mean() + D(l_prior).log().mean())
    for name, expected in (("prior", kl), ("llike", llike.mean()), ("gan_discriminator", gan_discriminator),
                           ("gan_decoder", gan_decoder), ("d_real", D(l_real).mean()), ("d_recon", D(l_recon).mean()),
                           ("d_prior", D(l_prior).mean())):
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-5), name
    assert losses["llike"].item() > 1 and losses["prior"].item() > 0.1  # far from 0: the comparison means something


class BatchNormD(nn.Module):
    """A stand-in discriminator whose feature layer comes after a BatchNorm, as Dis_l does, with 1x1 convolutions
    before it: a constant channel offset of the image reaches the BatchNorm as a constant per channel."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def forward(self, x):
        return self.head(self.body(x)).flatten()  # the logits


class Fixed(nn.Module):
    """A stand-in decoder that returns the same images (x̃, then x_p) whatever the codes."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def forward(self, z):
        return self.images


def test_llike_sees_a_channel_offset_between_reconstructions_and_images():
    """x̃ = x + c, c a constant per channel: reconstructions visibly off. Sent through D apart (as this script did
    before), x and x̃ were each normalised by BatchNorm with their own batch's statistics, which subtract c away:
    Dis_l(x̃) = Dis_l(x) and L_llike ≈ 0. In one batch, as the authors' code sends them, L_llike sees c."""
    model, x, eps, z_p = tiny_batch(seed=5, channels=3)
    offset = torch.tensor([0.5, -0.3, 0.2]).view(1, 3, 1, 1)
    model.discriminator, model.decoder = BatchNormD(3), Fixed(torch.cat([x + offset, x]))
    model.train()
    assert vaegan.vaegan_losses(model, x, eps, z_p)["llike"].item() > 1
    model.decoder = Fixed(torch.cat([x, x]))  # a perfect reconstruction: nothing to see
    assert vaegan.vaegan_losses(model, x, eps, z_p)["llike"].item() == 0


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
# 2. Each loss reaches exactly the networks it is meant to update (Algorithm 1's routing)
# --------------------------------------------------------------------------------------------
TOUCHES = {"prior": {"encoder"}, "llike": {"encoder", "decoder"}, "gan_decoder": {"decoder"},
           "gan_discriminator": {"discriminator"}}


def grads(model):
    return {name: [p.grad for p in model[name].parameters()] for name in NETWORKS}


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
    to_discriminator = torch.autograd.grad(losses["llike"], list(model.discriminator.body.parameters()))  # Dis_l's
    assert sum(g.abs().sum() for g in to_encoder) > 0 and sum(g.abs().sum() for g in to_discriminator) > 0


def test_gradients_are_the_weighted_sums_of_algorithm_1():
    model, x, eps, z_p = tiny_batch(seed=3)
    gamma, adv = 0.7, 0.3
    losses = vaegan.vaegan_losses(model, x, eps, z_p)
    vaegan.set_gradients(model, losses, gamma, adv)
    got = grads(model)

    def grad_of(loss, name):
        return torch.autograd.grad(loss, list(model[name].parameters()), retain_graph=True)
    expected = {"encoder": [a + b for a, b in zip(grad_of(losses["prior"], "encoder"),
                                                  grad_of(losses["llike"], "encoder"))],
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
@pytest.mark.parametrize("size,channels,side", [(16, 3, 4), (28, 1, 7), (32, 3, 4)])
def test_shapes(size, channels, side):
    model = vaegan.build_model(vaegan.Config(image_size=size, latent=5, channels=4, d_channels=4), channels).eval()
    x = torch.rand(2, channels, size, size) * 2 - 1
    assert model.encoder(x).shape == (2, 10)  # μ and log σ², side by side
    out = model.decoder(torch.randn(2, 5))
    assert out.shape == x.shape and out.abs().max() <= 1  # tanh: the data's range
    halvings = {16: 2, 28: 2, 32: 3}[size]
    assert model.discriminator(x).shape == (2, 1)
    assert model.discriminator.body(x).shape == (2, 4 * 2 ** (halvings - 1), side, side)  # Dis_l
    norms = [m for m in model.discriminator.body if isinstance(m, nn.BatchNorm2d)]
    # BatchNorm after every strided convolution but the first, none on Dis_l (read before the head's BatchNorm)
    assert len(norms) == halvings - 1 and isinstance(model.discriminator.head[0], nn.BatchNorm2d)


def test_the_encoder_narrows_its_last_map_and_d_dense_sets_the_discriminators_dense_layer():
    """The 28 px networks of the MNIST recipe: the encoder's Linear reads a 4x narrower map; --d-dense N puts a
    dense layer of N units between Dis_l and the logit (0: none, the logit a convolution of Dis_l)."""
    model = vaegan.build_model(vaegan.Config(image_size=28), 1)
    assert model.encoder.to_stats.in_features * 4 == 128 * 7 * 7
    dense = [m for m in model.discriminator.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(128 * 7 * 7, 512), (512, 1)]
    none = vaegan.build_model(vaegan.Config(image_size=28, d_dense=0), 1).discriminator.head
    assert not any(isinstance(m, nn.Linear) for m in none) and none(torch.randn(2, 128, 7, 7)).shape == (2, 1, 1, 1)


def test_bad_image_size_is_one_clear_line():
    with pytest.raises(SystemExit, match="image size 27"):
        vaegan.layer_plan(27, 64)


# --------------------------------------------------------------------------------------------
# 4. The script end to end
# --------------------------------------------------------------------------------------------
def test_tiny_run_leaves_its_files_then_samples_and_reconstructs(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    r = run_in_process("vaegan.py", "--dataset", tiny_npy, "--out", out, "--steps", "4", "--log-every", "2",
                   "--sample-every", "2", "--ckpt-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step       4/4" in r.stdout and "img/s" in r.stdout and "44 images + 4 to test" in r.stdout
    for f in ("config.json", "ckpt.pt", "metrics.csv", "samples/step_0000002.png", "samples/step_0000004.png",
              "reconstructions.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0])[:8] == ["step", "prior", "llike", "gan_decoder", "gan_discriminator", "d_real", "d_recon",
                                 "d_prior"]
    for row in rows:
        assert float(row["prior"]) >= 0 and float(row["llike"]) >= 0 and float(row["gan_discriminator"]) > 0
        assert all(0 < float(row[c]) < 1 for c in ("d_real", "d_recon", "d_prior"))
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] == 4 and state["script"] == "vaegan" and {"model", "optimizer", "rng_cpu"} <= set(state)

    r = run_in_process("vaegan.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--num-samples", "5",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    assert Image.open(os.path.join(out, "generated", "000000.png")).size == (16, 16)
    r = run_in_process("vaegan.py", "--sample", "--reconstruct", "--ckpt", os.path.join(out, "ckpt.pt"),
                   "--num-samples", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "reconstructed"))) == [f"{i:06d}.png" for i in range(3)]
    assert os.path.isfile(os.path.join(out, "reconstructed_grid.png"))


def test_fid_flag_scores_reconstructions(tmp_path, tiny_npy, capsys):
    """--sample --reconstruct --fid N: the reconstructions of N test images scored by fid.py against the
    training set (a random Inception: offline, the number meaningless, its path through the script the same)."""
    vaegan.train(vaegan.Config(dataset=tiny_npy, out=str(tmp_path / "run"), steps=1, channels=4, d_channels=4,
                               latent=3, device="cpu"))
    vaegan.main(vaegan.parse_args(["--sample", "--reconstruct", "--ckpt", str(tmp_path / "run" / "ckpt.pt"),
                                   "--num-samples", "2", "--fid", "4", "--fid-weights", "random", "--device", "cpu"]))
    assert len(os.listdir(tmp_path / "run" / "reconstructed")) == 4  # the whole test split of 48 images
    assert re.search(r"FID -?\d+\.\d+ \(4 samples vs .*sprites\.npy", capsys.readouterr().out)


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
    for k, v in a["optimizer"]["state"].items():  # Adam's moments and step counts
        assert all(torch.equal(v[s], b["optimizer"]["state"][k][s]) for s in v), k
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in rows_b] == [str(i) for i in range(1, 7)]
    for column in ("prior", "llike", "gan_decoder", "gan_discriminator", "d_real"):
        assert [r[column] for r in rows_b] == [r[column] for r in rows_a], column
    init = vaegan.build_model(vaegan.Config(image_size=16, channels=4, d_channels=4, latent=3), 3)
    assert not torch.equal(a["model"]["decoder.net.0.weight"], init.state_dict()["decoder.net.0.weight"])


OLD_CONFIG = dict(  # the config of a checkpoint written by the previous vaegan.py with arch larsen (its fields)
    dataset="x.npy", data_root="data", image_size=16, latent=3, channels=4, d_channels=4, d_dense=8,
    arch="larsen", gamma=1e-3, feature_sigma=1.0, adv_weight=0.1, steps=2, batch_size=8, lr=2e-4, beta1=0.5,
    out="", device="cpu", precision="auto", compile=False, seed=0, log_every=100, sample_every=2000,
    ckpt_every=2000, resume=False, ckpt="", sample=False, reconstruct=False, num_samples=64, fid=0, fid_weights="")


def test_a_checkpoint_of_the_previous_version_still_samples(tmp_path):
    """The previous version (arch larsen) saved {model, optimizer, step, config, script, rng_cpu, rng_cuda,
    log_sums}, its networks under the same names: --sample reads it, the weights it holds, into its folder."""
    model, _, _, _ = tiny_batch(channels=3, latent=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:  # running statistics of the previous version's training, not the init's
        state[k] += 0.1 if "running_var" in k else 0
    torch.save(dict(model=state, optimizer=torch.optim.Adam(model.parameters()).state_dict(), step=2,
                    config=OLD_CONFIG, script="vaegan", rng_cpu=torch.get_rng_state(), rng_cuda=torch.empty(0),
                    log_sums=(None, 0)), tmp_path / "ckpt.pt")
    vaegan.main(vaegan.parse_args(["--sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "3"]))
    assert sorted(os.listdir(tmp_path / "generated")) == ["000000.png", "000001.png", "000002.png"]
    model.load_state_dict(state)
    z = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))  # --sample's z (seed 0)
    import numpy as np
    from PIL import Image
    first = torch.tensor(np.asarray(Image.open(tmp_path / "generated" / "000000.png")), dtype=torch.float)
    expected = (vaegan.decode(model.eval(), vaegan.Config(), z, torch.device("cpu"))[0] * 0.5 + 0.5) * 255
    assert torch.allclose(first, expected.permute(1, 2, 0), atol=1)
    state["decoder.net.0.weight"] = state["decoder.net.0.weight"][:, :2]  # other networks (as --arch v1's were)
    torch.save(dict(model=state, config=OLD_CONFIG, script="vaegan"), tmp_path / "v1.pt")
    assert_one_line_error(run_in_process("vaegan.py", "--sample", "--ckpt", tmp_path / "v1.pt"), "other networks")


@pytest.mark.parametrize("args,words", [
    (["--gamma", "-1"], ["--gamma"]),
    (["--adv-weight", "-0.1"], ["--adv-weight"]),
    (["--feature-sigma", "0"], ["--feature-sigma"]),
    (["--beta1", "1.5"], ["--beta1"]),
    (["--steps", "ten"], ["--steps"]),
    (["--latent", "0"], ["--latent"]),
    (["--dataset", "no/such/folder", "--out", "{tmp}"], ["no/such/folder"]),
    (["--sample"], ["--ckpt"]),
    (["--reconstruct"], ["--sample"]),
    (["--sample", "--ckpt", "missing/ckpt.pt"], ["missing/ckpt.pt"]),
])
def test_bad_flags_stop_with_one_line(args, words, tmp_path):
    """In-process (fast): every bad input ends in sys.exit(one line). One also from the command line, where
    the line reaches stderr alone, without a traceback."""
    with pytest.raises(SystemExit) as stop:
        vaegan.main(vaegan.parse_args([a.replace("{tmp}", str(tmp_path / "run")) for a in args]))
    message = str(stop.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    if args[0] == "--feature-sigma":
        assert_one_line_error(run_script("vaegan.py", *args), *words)
