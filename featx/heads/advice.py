"""Advice: which of the four transfer-learning scenarios a dataset is in, measured rather than guessed.

Size: training images per class (``LARGE_PER_CLASS`` or more is large). Similarity to the backbone's
pretraining data: a class-balanced sample of the training images goes through the backbone once, at the
taps ``--layer auto`` names (the last few blocks and the pooled features), and a logistic regression probes
each tap by cross-validation (the same head, selection and tap rule as ``fit-head --layer auto``). When an
earlier tap beats the last one by more than the rule's tie (one standard error), the data is "different"
(scenario 3 or 4); the margin and its paired 95% interval say how clearly.

The BatchNorm shift stays as a diagnostic: at every BatchNorm layer the per-channel mean of its input is
compared with the running mean the pretrained weights carry, in units of the running standard deviation,
averaged over channels and layers (hymenoptera 0.16, cats_dogs 0.20, 8x8 digits 0.39 on efficientnet_lite0).
It used to decide, and on held-out X-rays, leaves and hand signs it guessed wrong three times out of three.
"""
from __future__ import annotations

import shlex

import numpy as np

from featx import data as data_mod
from featx.extraction.backbones import create_backbone, resolve_backbone
from featx.devices import device_name
from featx.errors import FeatxError, listed
from featx.extraction.runner import iter_features, split_taps
from .registry import make_head
from featx.extraction.runtimes import resolve_runtime
from .selection import choose_tap

LARGE_PER_CLASS = 1000
PROBE_IMAGES = 600  # the sample the taps are probed on: up to this many training images, class-balanced ...
PROBE_PER_CLASS = 4  # ... but at least this many a class (256 classes: 1,024 images)
SHIFT_SAMPLE = 64  # images the BatchNorm shift is measured on
FEW_IMAGES = 5  # classes with fewer training images than this get a warning
SHIFT_BACKBONE = "efficientnet_lite0"  # measures the shift for backbones without BatchNorm (weights ship with featx)

SCENARIOS = {
    1: "small & similar: linear classifier on last-layer features",
    2: "large & similar: fine-tune the top blocks",
    3: "small & different: linear classifier on earlier-layer features",
    4: "large & different: fine-tune everything (pretrained init still helps)",
}


def training_warnings(classes: list, counts) -> list[str]:
    """What advise says of classes with few training images, and of those with none."""
    few = [c for c, n in zip(classes, counts) if 0 < n < FEW_IMAGES]
    none = [c for c, n in zip(classes, counts) if n == 0]
    return ([f"{len(few)} classes have fewer than {FEW_IMAGES} training images ({listed(few)}): figures on them are "
             "noisy, and fine-tuning will overfit; prefer a linear head"] if few else []) + \
        ([f"no training image for {listed(none)}: no head can predict {'it' if len(none) == 1 else 'them'}; add "
          "training images"] if none else [])


def batchnorm_layers(net) -> list:
    import torch  # here: auto reads SCENARIOS from this module on a re-run that needs no network

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
        for _ in iter_features(net, files, device_name(device), 32, 0, progress=False):
            pass
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    for name, m in layers:
        if name not in sums:  # after the deepest tap: the forward pass stopped before it
            continue
        total, count = sums[name]
        mean, running_mean, running_var = (total / count).cpu(), m.running_mean.cpu(), m.running_var.cpu()
        per_layer.append(((mean - running_mean).abs() / (running_var + m.eps).sqrt()).mean().item())
    return float(np.mean(per_layer)), per_layer


def probe_sample(labels: np.ndarray, classes: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(rows, images a class): a seeded class-balanced sample of ``PROBE_IMAGES`` (at least ``PROBE_PER_CLASS``
    a class), every image of a smaller class."""
    per_class = max(PROBE_PER_CLASS, PROBE_IMAGES // max(classes, 1))
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(classes)]
    return np.sort(np.concatenate(rows)), per_class


def advise(data: str, backbone: str = "efficientnet_lite0", data_root: str | None = None, device: str = "auto",
           layer: str = "auto", cache_dir: str = "cache", progress: bool = False) -> dict:
    """Measure the dataset's size and which tap of ``backbone`` a linear head does best on (``layer``: auto,
    or the taps to compare), and recommend a scenario with the commands that reach the measured score."""
    ds = data_mod.load(data, data_root)
    spec, layers, _ = resolve_backbone(backbone, layer)
    if len(layers) < 2:
        raise FeatxError(f"--layer {layer} names one tap: advise compares several (use auto, or a list)")
    split = "train" if "train" in ds.split_names() else None
    train = np.array([i for i, s in enumerate(ds.splits) if s == split]) if split else np.arange(len(ds))
    counts = np.bincount(ds.labels[train], minlength=len(ds.classes))
    per_class = float(counts.mean())
    warnings = training_warnings(ds.classes, counts)
    rows, sample_per_class = probe_sample(ds.labels[train], len(ds.classes))
    rows = train[rows]
    files = [ds.root / ds.paths[i] for i in rows]
    net = create_backbone(spec.name, layers)
    dev = device_name(device)
    runtime = resolve_runtime("auto", dev, net.precision)
    found = [None] * len(files)
    for indices, feats, _ in iter_features(net, files, dev, progress=progress, runtime=runtime, cache_dir=cache_dir,
                                           desc=f"advise {spec.name}"):
        for i, row in zip(indices, feats):
            found[i] = row
    kept = [i for i, row in enumerate(found) if row is not None]
    if len({int(ds.labels[rows[i]]) for i in kept}) < 2:
        raise FeatxError(f"{ds.root} has fewer than two classes with readable training images: advise compares "
                         "classifiers, which need two")
    y = ds.labels[rows[kept]]
    per_tap = split_taps(np.stack([found[i] for i in kept]), net.tap_dims())
    heads = [make_head("logreg").fit(X, y) for X in per_tap]
    chosen, taps = choose_tap(layers, heads)
    shift_net = net
    if not batchnorm_layers(net):  # vgg, convnext: no running statistics to compare with
        warnings.append(f"{spec.name} has no BatchNorm layers, so the shift was measured with {SHIFT_BACKBONE}")
        shift_net = create_backbone(SHIFT_BACKBONE, "logits")
    shift_rows = np.random.default_rng(0).permutation(kept)[:SHIFT_SAMPLE]
    shift, _ = batchnorm_shift(shift_net, [files[i] for i in shift_rows], device)
    large, different = per_class >= LARGE_PER_CLASS, chosen < len(layers) - 1
    scenario = {(False, False): 1, (True, False): 2, (False, True): 3, (True, True): 4}[(large, different)]
    base = shlex.join(["--backbone", spec.name, "--data", str(data)] + (["--data-root", data_root] if data_root else []))
    top = ",".join(list(spec.blocks)[-2:])
    probe = [f"featx extract {base} --layer {layers[chosen]}", "featx fit-head --clf logreg"]
    commands = {1: probe, 3: probe,
                2: probe + [f"featx finetune --unfreeze {top}"],
                4: [f"featx finetune {base} --unfreeze all"]}[scenario]
    return {"scenario": scenario, "verdict": SCENARIOS[scenario], "images_per_class": round(per_class, 1),
            "size": "large" if large else "small", "similarity": "different" if different else "similar",
            "backbone": spec.name, **taps,
            "probe": {"images": len(kept), "per_class": sample_per_class, "head": "logreg",
                      "selection": heads[chosen].selected_["selection"]},
            "shift": round(shift, 4), "shift_backbone": shift_net.spec.name, "warnings": warnings,
            "thresholds": {"large_per_class": LARGE_PER_CLASS}, "commands": commands}
