"""timm backbones: any timm model as a featx backbone (``timm:<name>``), with taps from its feature_info
and blocks that partition every parameter on the path from image to features."""
from __future__ import annotations

import torch
from torch import nn

from featx.errors import FeatxError
from .specs import BackboneSpec, Preprocess, Tap, Weights, with_logits


def timm_spec(name: str) -> BackboneSpec:
    """Any timm model: taps from its ``feature_info``, blocks that partition every parameter on the path
    from image to features, preprocessing from its pretrained config. The probe is built on the ``meta``
    device, so this costs no memory or time whatever the model's size."""
    import timm

    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise FeatxError(f"timm has no model '{name}': see timm.list_models() for names")
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=probe)
    size = cfg["input_size"][-1]
    pre = Preprocess(size, int(size / cfg["crop_pct"]), cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    info = getattr(probe, "feature_info", [])
    stages = [stage["module"] for stage in info]
    taps = {f"stage{i}": Tap(stage["module"], "gap", stage.get("num_chs")) for i, stage in enumerate(info, 1)}
    classifier = probe.default_cfg.get("classifier", "classifier")
    head = probe.get_submodule(classifier)
    dim = head.in_features if isinstance(head, nn.Linear) else probe.num_features
    taps["pool"] = Tap(classifier, "input", dim)
    return with_logits(BackboneSpec(f"timm:{name}", "timm", lambda: timm.create_model(name, pretrained=False),
                                    Weights("timm", name), pre, dim, taps, "pool",
                                    partition_blocks(probe, stages, classifier), classifier,
                                    auto_taps=(*(f"stage{i}" for i in range(max(1, len(stages) - 2), len(stages))),
                                               "pool")))  # the last stage averaged is about the pool


def partition_blocks(model: nn.Module, boundaries: list[str], classifier: str) -> dict[str, list[str]]:
    """Blocks ``stage1``...``stageN`` ending at each boundary module (in forward order), then ``head`` for
    what follows the last one, so that every parameter but the ImageNet classifier's is in exactly one
    block. Blocks without parameters are folded into the next one."""
    units = []

    def walk(prefix: str, module: nn.Module) -> None:
        units.extend(f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False))
        for child, sub in module.named_children():
            path = prefix + child
            if any(target.startswith(path + ".") for target in (*boundaries, classifier)):
                walk(path + ".", sub)  # a container holding a boundary or the classifier: split it
            elif path != classifier:
                units.append(path)

    walk("", model)
    names = [n for n, _ in model.named_parameters()]

    def has_parameters(group: list[str]) -> bool:
        return any(n == u or n.startswith(u + ".") for u in group for n in names)

    blocks, current = {}, []
    for unit in units:
        current.append(unit)
        if unit in boundaries and has_parameters(current):
            blocks[f"stage{boundaries.index(unit) + 1}"], current = current, []
    if has_parameters(current):
        blocks["head"] = current
    elif current and blocks:
        blocks[list(blocks)[-1]] += current
    return blocks
