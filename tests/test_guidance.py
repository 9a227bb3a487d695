"""Class-conditional DDPM/DDIM with classifier-free guidance (Ho & Salimans 2022): the label drop, the
guided ε against its formula, the samplers driven by the exact ε of a two-class Gaussian law, and the
scripts end to end on a small labelled .npy."""
import csv
import math
import os

import numpy as np
import pytest
import torch

import ddim
import ddpm
from conftest import assert_one_line_error, run_in_process

TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "none",
        "--timesteps", "10", "--device", "cpu", "--batch-size", "6", "--dropout", "0"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """36 16x16 grey images of three classes (dark, mid, bright) and their labels as one-hot rows,
    the way the 16x16 Sprites set ships them."""
    folder = tmp_path_factory.mktemp("labelled")
    y = np.arange(36) % 3
    images = (np.random.default_rng(0).integers(0, 40, (36, 16, 16)) + 100 * y[:, None, None]).astype(np.uint8)
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", np.eye(3)[y])
    return str(folder / "images.npy"), str(folder / "labels.npy")


# --------------------------------------------------------------------------------------------
# 1. Training: the label is replaced by ∅ with probability --p-uncond, from the batch generator
# --------------------------------------------------------------------------------------------
def test_label_drop_rate_is_p_uncond_and_reproducible():
    data, labels = torch.zeros(100, 1, 4, 4), torch.arange(100) % 10
    cfg = ddpm.Config(class_cond=True, num_classes=10, p_uncond=0.2, batch_size=20_000, timesteps=10)
    _, _, _, y = ddpm.draw_batch(data, labels, cfg, torch.Generator().manual_seed(0))
    dropped = (y == 10).float().mean().item()
    assert abs(dropped - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 20_000)  # within 4 binomial standard deviations
    _, _, _, again = ddpm.draw_batch(data, labels, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    kept = y != 10  # the others keep their image's label: image i has label i % 10, as its pixels would say
    assert kept.sum() > 0 and ((y[kept] >= 0) & (y[kept] < 10)).all()


def test_unconditional_batches_are_unchanged_by_the_feature():
    """Without --class-cond, draw_batch draws exactly the numbers it drew before labels existed."""
    data = torch.randn(50, 1, 4, 4)
    cfg = ddpm.Config(dataset="mnist", batch_size=8, timesteps=10)  # (cifar10 would also draw flips)
    x0, t, eps, y = ddpm.draw_batch(data, None, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 50, (8,), generator=g)
    assert y is None and torch.equal(x0, data[i]) and torch.equal(t, torch.randint(0, 10, (8,), generator=g))
    assert torch.equal(eps, torch.randn(x0.shape, generator=g))


def test_unconditional_unet_is_unchanged_and_conditional_adds_one_embedding():
    plain = ddpm.build_model(ddpm.Config(image_size=16, channels=16, channel_mult="1,2", num_res_blocks=1), 1)
    cond = ddpm.build_model(ddpm.Config(image_size=16, channels=16, channel_mult="1,2", num_res_blocks=1,
                                        class_cond=True, num_classes=10), 1)
    extra = set(cond.state_dict()) - set(plain.state_dict())
    assert extra == {"label_emb.weight"} and cond.state_dict()["label_emb.weight"].shape == (11, 64)
    assert "label_emb" not in "".join(plain.state_dict())  # old checkpoints keep loading


# --------------------------------------------------------------------------------------------
# 2. The guided ε (Eq. 6), and the samplers driven by the exact ε of a two-class Gaussian law
# --------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """A stand-in network: ε(x, t, y) = x · (y + 1) + t, and it counts its calls and batch sizes."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(len(x))
        return x * (y.float() + 1)[:, None, None, None] + t.float()[:, None, None, None]


def test_guided_eps_is_eq_6_in_one_call_and_w_zero_is_the_conditional_model():
    net, x, t, y = Recorder(), torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 1])
    w = 1.5
    got = ddpm.guided(net, y, w)(x, t)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))  # ∅ is label K = 3
    assert torch.allclose(got, (1 + w) * cond - w * uncond)
    assert net.calls[0] == 8  # one call, on the batch twice over
    net.calls.clear()
    assert torch.equal(ddpm.guided(net, y, 0.0)(x, t), net(x, t, y)) and net.calls == [4, 4]


MU, S = (-0.6, 0.6), 0.25  # two classes per pixel: N(−0.6, 0.25²) and N(0.6, 0.25²), equally likely


def exact_eps(betas):
    """The exact ε of the two-class law: for class c, x_t | c ~ N(√ᾱ μ_c, v), v = ᾱ s² + 1 − ᾱ, so
    E[ε | x_t, c] = √(1−ᾱ) (x_t − √ᾱ μ_c) / v; unconditionally, the posterior mix of the two by p(c | x_t)."""
    alpha_bar = torch.cumprod(1 - betas, 0)

    def model(x, t, y):
        a = alpha_bar[t].float()[:, None, None, None]
        v = a * S ** 2 + 1 - a
        per_class = [(1 - a).sqrt() * (x - a.sqrt() * mu) / v for mu in MU]  # ε given class 0, class 1
        logp = torch.stack([-(x - a.sqrt() * mu) ** 2 / (2 * v) for mu in MU])  # log N up to the same constant
        posterior = torch.softmax(logp, 0)  # p(c | x_t), per pixel
        uncond = posterior[0] * per_class[0] + posterior[1] * per_class[1]
        yy = y[:, None, None, None]
        return torch.where(yy == 2, uncond, torch.where(yy == 0, per_class[0], per_class[1]))
    model.num_classes = 2
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_exact_gaussian_classes_are_returned_at_w_zero_and_pushed_apart_by_guidance(sampler):
    betas = ddpm.make_betas("cosine", 200)
    model, shape = exact_eps(betas), (3000, 1, 1, 2)
    means, stds = {}, {}
    for w in (0.0, 1.0, 3.0):
        for c in (0, 1):
            eps_model = ddpm.guided(model, torch.full((shape[0],), c), w)
            g = torch.Generator().manual_seed(c)
            if sampler == "ddpm":
                x = ddpm.sample(eps_model, shape, betas, g, var="beta_tilde", clip_x0=False)
            else:  # DDIM, η = 1 on every step: the same posterior steps
                x = ddim.sample(eps_model, shape, betas, 200, 1.0, "uniform", g)
            means[w, c], stds[w, c] = x.mean().item(), x.std().item()
    for c in (0, 1):  # w = 0: each class's own law
        assert means[0.0, c] == pytest.approx(MU[c], abs=0.02) and stds[0.0, c] == pytest.approx(S, rel=0.05)
    # w > 0 samples p(x|c)·p(c|x)^w-like: away from the other class, more so for larger w, and narrower
    assert means[3.0, 0] < means[1.0, 0] < means[0.0, 0] - 0.01
    assert means[3.0, 1] > means[1.0, 1] > means[0.0, 1] + 0.01
    assert stds[3.0, 0] < stds[0.0, 0] and stds[3.0, 1] < stds[0.0, 1]


# --------------------------------------------------------------------------------------------
# 3. The scripts end to end
# --------------------------------------------------------------------------------------------
def test_class_conditional_run_samples_a_chosen_class_and_one_row_per_class(tmp_path, labelled):
    images, labels = labelled
    out = str(tmp_path / "run")
    r = run_in_process("ddpm.py", "--dataset", images, "--labels", labels, "--class-cond", "--out", out,
                   "--steps", "2", "--sample-every", "2", *TINY)
    assert r.returncode == 0, r.stderr
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["config"]["class_cond"] and state["config"]["num_classes"] == 3 and state["script"] == "ddpm"
    from PIL import Image
    assert Image.open(os.path.join(out, "samples", "step_0000002.png")).height == 3 * (16 + 2) + 2  # a row a class
    ckpt = os.path.join(out, "ckpt.pt")
    r = run_in_process("ddpm.py", "--sample", "--ckpt", ckpt, "--num-samples", "4", "--label", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(out, "generated"))) == [f"{i:06d}_class1.png" for i in range(4)]
    r = run_in_process("ddim.py", "--sample", "--ckpt", ckpt, "--num-samples", "6", "--sample-steps", "3",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr  # ddim.py writes beside, not over, ddpm.py's samples
    assert sorted(os.listdir(os.path.join(out, "ddim-samples", "generated"))) == \
        [f"{i:06d}_class{i % 3}.png" for i in range(6)]
    assert len(os.listdir(os.path.join(out, "generated"))) == 4
    assert_one_line_error(run_in_process("ddpm.py", "--sample", "--ckpt", ckpt, "--label", "3", "--device", "cpu"),
                          "--label 3", "0..2")


def test_label_on_an_unconditional_checkpoint_is_one_line(tmp_path, tiny_npy):
    out = str(tmp_path / "run")
    assert run_in_process("ddpm.py", "--dataset", tiny_npy, "--out", out, "--steps", "1", *TINY).returncode == 0
    assert_one_line_error(run_in_process("ddpm.py", "--sample", "--ckpt", os.path.join(out, "ckpt.pt"),
                                     "--label", "1", "--device", "cpu"), "--label", "not class-conditional")
    assert_one_line_error(run_in_process("ddpm.py", "--dataset", tiny_npy, "--class-cond", "--out", str(tmp_path / "b"),
                                     "--steps", "1", *TINY), "--class-cond needs labels", "--labels")


def test_class_conditional_resume_is_exact(tmp_path, labelled):
    images, labels = labelled
    common = dict(dataset=images, labels=labels, class_cond=True, channels=8, channel_mult="1,2", num_res_blocks=1,
                  attn_res="none", timesteps=10, device="cpu", batch_size=6, log_every=1, sample_every=100,
                  dropout=0.0, warmup=2)
    ddpm.train(ddpm.Config(out=str(tmp_path / "a"), steps=4, **common))
    ddpm.train(ddpm.Config(out=str(tmp_path / "b"), steps=2, **common))
    ddpm.train(ddpm.Config(out=str(tmp_path / "b"), steps=4, resume=True, **common))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in "ab"]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_image_folder_with_one_subfolder_per_class_gives_labels(tmp_path):
    from PIL import Image
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(2 + k):
            Image.fromarray(np.full((8, 8), 100 * k, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    x, y = ddpm.get_data(ddpm.Config(dataset=str(tmp_path)))
    assert x.shape == (5, 1, 8, 8) and y.tolist() == [0, 0, 1, 1, 1]
