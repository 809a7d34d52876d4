"""Shared test material: a tiny CNN registered as a featx backbone, and synthetic image folders."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import featx
from featx.extraction.backbones import BackboneSpec, Preprocess, Tap, Weights

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, delay: float = 0.0):
        super().__init__()
        self.delay = delay  # seconds per forward, to stand in for a big network in kill tests
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        time.sleep(self.delay)
        return self.fc(self.flatten(self.pool(self.block2(self.block1(self.stem(x))))))


def save_tiny_weights(path: Path) -> Path:
    torch.manual_seed(0)
    net = TinyNet()
    for m in net.modules():  # non-trivial BN statistics, so "unchanged" checks mean something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return path


def register_tiny(weights: Path, name: str = "tiny", delay: float = 0.0) -> BackboneSpec:
    spec = BackboneSpec(
        name=name, family="tiny", build=partial(TinyNet, delay=delay), weights=Weights("file", str(weights)),
        preprocess=Preprocess(32, 32, "bilinear"), feature_dim=32,
        taps={"block1": Tap("block1", "gap"), "block2": Tap("block2", "gap"), "pool": Tap("fc", "input")},
        default_tap="pool", blocks={"stem": ["stem"], "block1": ["block1"], "block2": ["block2"]}, classifier="fc")
    return featx.register_backbone(spec)


def forked_cli(argv: list, weights: Path, delay: float = 0.0, stdout: Path | None = None, env: dict | None = None,
               before=None, daemon: bool = True, stderr: Path | None = None) -> multiprocessing.Process:
    """``featx <argv>`` in a forked copy of this process, with the tiny network registered (``delay`` seconds
    per forward): a separate process to kill or to race, started in milliseconds because torch and featx are
    already imported (a fresh interpreter spends about 3 s of CPU on them). Its exit code is the command's;
    ``stdout`` receives what it prints, ``env`` is set in it and ``before()`` runs in it first. It runs torch on
    one thread: a test comparing its numbers with this process's uses the ``one_torch_thread`` fixture."""
    process = multiprocessing.get_context("fork").Process(target=run_forked_cli, daemon=daemon,
                                                          args=(argv, weights, delay, stdout, env or {}, before,
                                                                stderr))
    process.start()
    return process


def run_forked_cli(argv, weights, delay, stdout, env, before, stderr=None):
    from featx.cli import main

    torch.set_num_threads(1)  # an OpenMP pool does not survive fork; torch's DataLoader workers do the same
    os.environ.update(env)
    register_tiny(weights, delay=delay)
    if before:
        before()
    if stdout:
        sys.stdout = open(stdout, "w")
    if stderr:
        sys.stderr = open(stderr, "w")
    main([str(a) for a in argv])


def colour_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """Class 0 is reddish, class 1 bluish, class 2 greenish: separable by any feature extractor."""
    base = np.zeros((size, size, 3), np.float32)
    base[..., label % 3] = 180
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_dataset(root: Path, per_class: dict | None = None, classes=("a", "b"), fmt: str = "JPEG",
                 seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/<i>.jpg``; per_class maps split -> images per class."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "val": 3, "test": 3}
    for split, n in per_class.items():
        for label, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour_image(label, rng).save(folder / f"{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    return root


def make_grain_dataset(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Two classes told apart by low-level statistics only: smooth random colour scenes with fine pixel noise
    of standard deviation 6 ("calm") or 9 ("grainy"). Pooled ImageNet features are nearly blind to it (lite0:
    0.75 in cross-validation), its early blocks are not (block5: 1.0)."""
    rng = np.random.default_rng(seed)
    for label, sigma in (("calm", 6), ("grainy", 9)):
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scene = Image.fromarray(rng.uniform(40, 215, (4, 4, 3)).astype(np.uint8)).resize((96, 96), Image.BICUBIC)
            pixels = np.asarray(scene, np.float32) + rng.normal(0, sigma, (96, 96, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def linked_subset(root: Path, out: Path, relative_paths) -> Path:
    """A dataset folder of symlinks to some of ``root``'s files, under the same relative paths (real images
    for a shorter test, never copied)."""
    for rel in relative_paths:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).symlink_to(root / rel)
    return out


class TinyVGG(nn.Module):
    """VGG16's layout (conv blocks 2-2-3-3-3 with max-pools, classifier fc6-relu-dropout-fc7-relu-dropout-fc8)
    at a few channels, so VGG16's registry entry (blocks, taps) applies to it unchanged."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width, convs in ((4, 2), (4, 2), (8, 3), (8, 3), (8, 3)):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 16), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(16, 1000))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def register_tiny_vgg16(folder: Path) -> BackboneSpec:
    """Stand in for vgg16 (whose random weights alone are 528 MB): VGG16's own spec, a tiny network."""
    from dataclasses import replace

    from featx.extraction import backbones

    torch.manual_seed(0)
    torch.save(TinyVGG().state_dict(), folder / "tiny_vgg16.pth")
    real = backbones.get_spec("vgg16")
    return replace(real, build=TinyVGG, weights=Weights("file", str(folder / "tiny_vgg16.pth")),
                   preprocess=Preprocess(32, 32, "bilinear"), feature_dim=16)
