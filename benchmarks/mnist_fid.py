"""MNIST-FID: sample quality on MNIST, measured in the feature space of a small digit classifier.

Inception FID (fid.py) is the number papers report, but it needs ImageNet weights and sees
28x28 digits through a network made for 299x299 photographs. For ranking models side by side
on MNIST, on a CPU, a classifier that knows digits is a sharper ruler: we train a small LeNet
once (its weights ship as benchmarks/mnist_fid_lenet.pt, 1 MB, so that everyone measures with the
same ruler), take its 128-d penultimate features, and compute the Fréchet distance (fid.frechet_distance) between generated images and
the 10,000 MNIST test images.

NOT comparable with Inception FID figures from papers, and only comparable with itself at equal
n (the estimate is biased upwards at small n): real training images score about 2 at n = 2000.

usage:
  python benchmarks/mnist_fid.py FOLDER_OF_PNGS [--data-root data]
  import mnist_fid; mnist_fid.score(images, data_root)   # images: (N, 1, 28, 28) in [-1, 1]
"""
import argparse
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for fid.py
import fid  # noqa: E402


class LeNet(nn.Module):
    """Three conv/pool stages, 28 -> 14 -> 7 -> 3, then a 128-d feature layer and 10 logits."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 128, 3, 3)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 9, 128), nn.ReLU())  # (B, 128)
        self.logits = nn.Linear(128, 10)

    def forward(self, x):  # x: (B, 1, 28, 28) in [0, 1]
        return self.logits(self.features(self.convs(x)))


def mnist(data_root: str, train: bool):
    """MNIST as (N, 1, 28, 28) floats in [0, 1] and labels; downloaded by torchvision if needed."""
    import torchvision
    try:
        ds = torchvision.datasets.MNIST(data_root, train=train, download=not os.path.isdir(
            os.path.join(data_root, "MNIST", "raw")))
    except Exception as e:
        sys.exit(f"mnist_fid: cannot load MNIST from {data_root} ({type(e).__name__}); put the four "
                 f"*-idx?-ubyte files in {os.path.join(data_root, 'MNIST', 'raw')}/")
    return ds.data.float().div(255).unsqueeze(1), ds.targets


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_fid_lenet.pt")  # the ruler, committed


def classifier(data_root: str) -> LeNet:
    """The LeNet whose features are the ruler. Its weights ship with the repository (mnist_fid_lenet.pt, trained
    once by the code below), so that every machine measures with the same ruler: training it again gives
    slightly different weights (multi-threaded float sums are not bit-reproducible), so slightly different
    numbers. Without that file it is trained once (2 epochs, Adam, seed 0) and cached in benchmarks/.cache/."""
    path = SHIPPED if os.path.exists(SHIPPED) else \
        os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "mnist_fid_lenet.pt")
    net = LeNet()
    if os.path.exists(path):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"mnist_fid: {SHIPPED} is missing: training the feature classifier (cached as {path}); its numbers "
          "will differ slightly from the shipped ruler's", file=sys.stderr)
    torch.manual_seed(0)
    x, y = mnist(data_root, train=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    x_test, y_test = mnist(data_root, train=False)
    with torch.no_grad():
        accuracy = (torch.cat([net(b).argmax(1) for b in x_test.split(1000)]) == y_test).float().mean()
    print(f"mnist_fid: classifier test accuracy {accuracy:.4f}", file=sys.stderr)
    torch.save(net.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return net.eval()


@torch.no_grad()
def stats(net: LeNet, x: torch.Tensor):
    """Mean and covariance (float64) of the 128-d features of images x in [0, 1]."""
    f = torch.cat([net.features(net.convs(b)) for b in x.split(500)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def score(images: torch.Tensor, data_root: str = "data") -> float:
    """MNIST-FID of images (N, 1, 28, 28) in [-1, 1] against the MNIST test set."""
    if images.dim() != 4 or images.shape[1:] != (1, 28, 28) or len(images) < 2:
        sys.exit(f"mnist_fid: need at least 2 images of shape (1, 28, 28), got {tuple(images.shape)}")
    net = classifier(data_root)
    reference = mnist(data_root, train=False)[0]
    return fid.frechet_distance(*stats(net, (images.float() * 0.5 + 0.5).clamp(0, 1)), *stats(net, reference))


def strokes(images: torch.Tensor) -> tuple:
    """(ink, grey): the fraction of pixels that are ink (x > 0) and of pixels that are neither paper nor
    ink (|x| < 0.8, the edges of strokes), for images in [-1, 1]. MNIST's test set: 13.4 % and 8.6 %.
    More ink than that is bolder digits, more grey is blurrier ones; the FID sees both, but not which."""
    x = images.float()
    return (x > 0).float().mean().item(), (x.abs() < 0.8).float().mean().item()


@torch.no_grad()
def classes(images: torch.Tensor, data_root: str = "data") -> torch.Tensor:
    """The digit the same classifier sees in each image (N, 1, 28, 28) in [-1, 1]: (N,) in 0..9."""
    net = classifier(data_root)
    return torch.cat([net((b.float() * 0.5 + 0.5).clamp(0, 1)).argmax(1) for b in images.split(500)])


def load_folder(folder: str):
    """The PNGs of a folder as (N, 1, H, W) in [-1, 1], and the class each was asked for if the file names
    say it (NNNNNN_classK.png, as a class-conditional ddpm.py/ddim.py --sample writes them), else None."""
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
    if len(files) < 2:
        sys.exit(f"mnist_fid: {folder} must be a folder holding at least 2 .png images")
    pixels = np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("L")) for f in files])
    asked = [re.search(r"_class(\d+)\.png$", f) for f in files]
    labels = torch.tensor([int(m.group(1)) for m in asked]) if all(asked) else None
    return torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1), labels  # (N, 1, H, W) in [-1, 1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder of generated 28x28 PNGs")
    parser.add_argument("--data-root", default="data", help="where torchvision keeps MNIST")
    args = parser.parse_args()
    images, asked = load_folder(args.folder)
    print(f"MNIST-FID {score(images, args.data_root):.2f}  (n = {len(images)}, LeNet features, "
          f"vs the 10k MNIST test images; not comparable with Inception FID)")
    ink, grey = strokes(images)
    real_ink, real_grey = strokes(mnist(args.data_root, train=False)[0] * 2 - 1)
    print(f"ink (pixels > 0) {100 * ink:.2f}%, grey (|pixel| < 0.8) {100 * grey:.2f}%; the MNIST test set: "
          f"{100 * real_ink:.2f}% and {100 * real_grey:.2f}% (more ink: bolder digits; more grey: blurrier)")
    seen = classes(images, args.data_root)
    print("classes seen by the classifier: " + " ".join(f"{k}: {n}" for k, n in
                                                         enumerate(torch.bincount(seen, minlength=10).tolist())))
    if asked is not None:
        print(f"the classifier sees the asked digit in {100 * (seen == asked).float().mean():.1f}% of the images "
              f"(its accuracy on the MNIST test set: 98.7%)")
