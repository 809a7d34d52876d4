"""Advice: which of the four transfer-learning scenarios a dataset is in, measured rather than guessed.

Size: training images per class (``LARGE_PER_CLASS`` or more is large). Shift from the backbone's
pretraining data: a sample of the images goes through the backbone, and at every BatchNorm layer
the per-channel mean of its input is compared with the running mean the pretrained weights carry,
in units of the running standard deviation; the shift is the average over channels and layers.
Images like ImageNet's give 0.15-0.20 on efficientnet_lite0 (hymenoptera 0.16, cats_dogs 0.20);
8x8 grey digits give 0.39. ``SHIFT_THRESHOLD`` sits between.
"""
from __future__ import annotations

import numpy as np
import torch

from . import data as data_mod
from .backbones import create_backbone, get_spec
from .devices import resolve_device
from .extraction import iter_features

LARGE_PER_CLASS = 1000
SHIFT_THRESHOLD = 0.3
SAMPLE = 64
FEW_IMAGES = 5  # classes with fewer training images than this get a warning
SHIFT_BACKBONE = "efficientnet_lite0"  # measures the shift for backbones without BatchNorm (weights ship with featx)

SCENARIOS = {
    1: "small & similar: linear classifier on last-layer features",
    2: "large & similar: fine-tune the top blocks",
    3: "small & different: linear classifier on earlier-layer features",
    4: "large & different: fine-tune everything (pretrained init still helps)",
}


def batchnorm_layers(net) -> list:
    return [(n, m) for n, m in net.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def batchnorm_shift(net, files: list, device: str = "auto") -> tuple[float, list]:
    """Mean standardised distance between the data's BN-input means and the pretrained running means."""
    layers = batchnorm_layers(net)
    sums: dict = {}

    def hook(name):
        def grab(module, args):
            x = args[0].detach().float()
            total, count = sums.get(name, (0, 0))
            sums[name] = (total + x.sum((0, 2, 3)), count + x.shape[0] * x.shape[2] * x.shape[3])
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        for _ in iter_features(net, files, resolve_device(device), 32, 0, progress=False):
            pass
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    for name, m in layers:
        total, count = sums[name]
        mean, running_mean, running_var = (total / count).cpu(), m.running_mean.cpu(), m.running_var.cpu()
        per_layer.append(((mean - running_mean).abs() / (running_var + m.eps).sqrt()).mean().item())
    return float(np.mean(per_layer)), per_layer


def advise(data: str, backbone: str = "efficientnet_lite0", data_root: str | None = None,
           device: str = "auto") -> dict:
    ds = data_mod.load(data, data_root)
    split = "train" if "train" in ds.split_names() else None
    labels = ds.subset(split)[1] if split else ds.labels
    per_class = float(np.bincount(labels, minlength=len(ds.classes)).mean())
    counts = np.bincount(labels, minlength=len(ds.classes))
    few = [c for c, n in zip(ds.classes, counts) if n < FEW_IMAGES]
    warnings = [f"{len(few)} classes have fewer than {FEW_IMAGES} training images ({', '.join(few[:8])}"
                f"{' ...' if len(few) > 8 else ''}): figures on them are noisy, and fine-tuning will overfit; "
                "prefer a linear head"] if few else []
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ds), size=min(SAMPLE, len(ds)), replace=False)
    net = create_backbone(backbone, "logits")
    if not batchnorm_layers(net):  # vgg, convnext: no running statistics to compare with
        warnings.append(f"{backbone} has no BatchNorm layers, so the shift was measured with {SHIFT_BACKBONE}")
        net = create_backbone(SHIFT_BACKBONE, "logits")
    shift, _ = batchnorm_shift(net, [ds.root / ds.paths[i] for i in sample], device)
    large, different = per_class >= LARGE_PER_CLASS, shift >= SHIFT_THRESHOLD
    scenario = {(False, False): 1, (True, False): 2, (False, True): 3, (True, True): 4}[(large, different)]
    spec = get_spec(backbone)
    taps = [t for t in spec.taps if t not in (spec.default_tap, "logits")]
    early = taps[int(len(taps) * 0.6)] if taps else spec.default_tap
    top = ",".join(list(spec.blocks)[-2:])
    base = f"--backbone {spec.name} --data {data}" + (f" --data-root {data_root}" if data_root else "")
    commands = {
        1: [f"featx extract {base}", f"featx fit-head --clf logreg {base}"],
        2: [f"featx fit-head --clf logreg {base} --out runs/head",
            f"featx finetune {base} --unfreeze {top} --head runs/head/model.featx"],
        3: [f"featx extract {base} --layer {early}", f"featx fit-head --clf logreg {base} --layer {early}"],
        4: [f"featx finetune {base} --unfreeze all"],
    }[scenario]
    return {"scenario": scenario, "verdict": SCENARIOS[scenario], "images_per_class": round(per_class, 1),
            "size": "large" if large else "small", "shift": round(shift, 4), "shift_backbone": net.spec.name,
            "warnings": warnings,
            "similarity": "different" if different else "similar", "thresholds": {
                "large_per_class": LARGE_PER_CLASS, "shift": SHIFT_THRESHOLD}, "backbone": spec.name,
            "commands": commands}
