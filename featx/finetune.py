"""Stage 3: unfreeze named top blocks of a backbone and fine-tune it end to end with a head.

Frozen blocks keep ``requires_grad=False`` *and* stay in eval mode, so their BatchNorm statistics
never move (the Keras fine-tuning lesson). The head may start from a stage-2 model (logreg/svm folded
into one linear layer, or the MLP), which is the point of staging, or from rows of the backbone's own
ImageNet classifier. Every epoch writes a checkpoint; ``resume=True`` continues after a kill. The best epoch by val accuracy is saved as a featx model file
that ``predict`` and ``evaluate`` use like any stage-2 model.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from tqdm import tqdm

from . import data as data_mod
from . import report
from .backbones import Backbone, create_backbone
from .errors import FeatxError
from .extract import ImageFiles, collate, default_workers, resolve_device
from .heads import LinearHead, MLPHead, load_head, mlp_arrays
from .model import MODEL_NAME, load_model, load_predictor, save_model

AUGMENTATIONS = ("none", "light", "strong")


def augmentation(net: Backbone, preset: str):
    """PIL -> uint8 tensor. ``light``: random resized crop + flip; ``strong``: + rotation, zoom, shift,
    shear and colour (seed S3's Keras ImageDataGenerator settings)."""
    pre = net.preprocess
    interp = InterpolationMode(pre.interpolation)
    if preset == "none":
        return pre.transform()
    if preset not in AUGMENTATIONS:
        raise FeatxError(f"unknown augmentation '{preset}': use none, light or strong")
    steps = [T.RandomResizedCrop(pre.input_size, scale=(0.5 if preset == "strong" else 0.08, 1.0),
                                 interpolation=interp, antialias=True), T.RandomHorizontalFlip()]
    if preset == "strong":
        steps += [T.RandomAffine(degrees=40, translate=(0.2, 0.2), scale=(0.7, 1.3), shear=20, interpolation=interp),
                  T.ColorJitter(0.3, 0.3, 0.3, 0.05)]
    return T.Compose([*steps, T.PILToTensor()])


class Standardise(nn.Module):
    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.scale


class FineTuneNet(nn.Module):
    """Backbone (pooled features) -> head; takes uint8 images, returns logits."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.trainable_blocks: list = []

    def forward(self, images):
        return self.head(self.backbone(images).float())

    def train(self, mode: bool = True):
        """Only unfrozen blocks (and the head) enter training mode; frozen BatchNorm stays in eval."""
        super().train(False)
        if mode:
            self.head.train()
            for name, module in self.backbone.model.named_modules():
                if in_blocks(name, self.backbone, self.trainable_blocks):
                    module.train()
        self.training = mode
        return self


def in_blocks(module_name: str, net: Backbone, blocks: list) -> bool:
    prefixes = [p for b in blocks for p in net.spec.blocks[b]]
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def parse_unfreeze(unfreeze: str, net: Backbone) -> list:
    names = list(net.spec.blocks)
    if unfreeze == "all":
        return names
    if unfreeze in ("none", ""):
        return []
    if unfreeze.startswith("top:"):  # the last N blocks, whatever this backbone calls them
        count = unfreeze[4:]
        if not count.isdigit() or not 1 <= int(count) <= len(names):
            raise FeatxError(f"--unfreeze {unfreeze}: use top:N with N from 1 to {len(names)} for {net.spec.name}")
        return names[-int(count):]
    asked = [b.strip() for b in unfreeze.split(",") if b.strip()]
    unknown = [b for b in asked if b not in names]
    if unknown:
        raise FeatxError(f"{net.spec.name} has no block {', '.join(unknown)}: choose from {', '.join(names)}, "
                         f"all, none or top:N")
    return asked


def head_from_model(path: str, net: Backbone, classes: list) -> nn.Module:
    """A stage-2 head as a torch module: logreg/svm folded into one Linear, or the MLP with its scaler."""
    tensors, manifest = load_model(path)
    if manifest["identity"] != net.identity():
        raise FeatxError(f"{path} was fitted on features of {manifest['identity']['backbone']}:"
                         f"{manifest['identity']['layer']} with other weights or preprocessing than this backbone: "
                         "fit the head on this backbone's default layer first")
    if manifest["classes"] != classes:
        raise FeatxError(f"{path} knows classes {manifest['classes']}, the dataset has {classes}: fit it on this data")
    head = load_head({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, manifest["head"])
    if isinstance(head, MLPHead):
        return nn.Sequential(Standardise(head.mean_, head.scale_), head.net_)
    if not isinstance(head, LinearHead) or len(head.classes_) != len(classes):
        raise FeatxError(f"{path} holds a {manifest['head']['kind']} head trained on a subset of the classes: "
                         "warm-start from fit-head --clf logreg or mlp")
    W = head.coef_ / head.scale_
    b = head.intercept_ - W @ head.mean_
    if W.shape[0] == 1:  # binary svm: one decision column -> two logits with the same difference
        W, b = np.vstack([-W / 2, W / 2]), np.r_[-b / 2, b / 2]
    linear = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(W))
        linear.bias.copy_(torch.as_tensor(b))
    return linear


def imagenet_categories() -> list[str]:
    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def head_from_imagenet(rows: str, net: Backbone, classes: list) -> nn.Linear:
    """A head whose rows start as the backbone's own ImageNet classifier rows (seed S0's exercise:
    hotdog is ImageNet class 934). ``rows`` is ``imagenet:`` then one entry per dataset class, in class
    order: an ImageNet index, a category name, or ``-`` for a fresh (Xavier) row."""
    usage = (f"--head {rows}: give one ImageNet class per dataset class ({', '.join(classes)}), as an index, "
             "a category name or - for a fresh row, e.g. imagenet:ant,bee or imagenet:934,-")
    entries = [e.strip() for e in rows.split(":", 1)[1].split(",")]
    if len(entries) != len(classes) or not all(entries):
        raise FeatxError(usage)
    classifier = net.model.get_submodule(net.spec.classifier)
    if not isinstance(classifier, nn.Linear) or classifier.in_features != net.spec.feature_dim:
        raise FeatxError(f"{net.spec.name}'s ImageNet classifier is not one linear layer on its pooled features, "
                         "so it cannot seed a head: use --head FILE from fit-head, or no --head")
    names = [n.lower() for n in imagenet_categories()] if classifier.out_features == 1000 else []
    picked = []
    for entry in entries:
        if entry == "-":
            picked.append(None)
        elif entry.isdigit() and int(entry) < classifier.out_features:
            picked.append(int(entry))
        elif names.count(entry.lower()) == 1:
            picked.append(names.index(entry.lower()))
        else:
            raise FeatxError(f"{usage} ('{entry}' is not an index below {classifier.out_features}"
                             f"{' or a unique ImageNet category name' if names else ''})")
    head = nn.Linear(classifier.in_features, len(classes))
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        for row, source in enumerate(picked):
            if source is not None:
                head.weight[row] = classifier.weight[source]
                head.bias[row] = classifier.bias[source] if classifier.bias is not None else 0.0
    return head


def export_head(head: nn.Module, classes: list) -> tuple[dict, dict]:
    """Arrays and config in the stage-2 head format, so predict/evaluate load fine-tuned models alike."""
    n = len(classes)
    if isinstance(head, nn.Linear):
        d = head.in_features
        arrays = {"mean": np.zeros(d), "scale": np.ones(d), "coef": head.weight.detach().cpu().double().numpy(),
                  "intercept": head.bias.detach().cpu().double().numpy(), "classes": np.arange(n)}
        return arrays, {"kind": "logreg", "selected": {}}
    scaler, mlp = head[0], head[1]
    arrays = {**mlp_arrays(scaler.mean.cpu().numpy(), scaler.scale.cpu().numpy(), mlp.state_dict()),
              "classes": np.arange(n)}
    return arrays, {"kind": "mlp", "selected": {}}


def state_sha256(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_finetuned(path: Path, net: FineTuneNet, classes: list, manifest: dict) -> Path:
    state = net.backbone.model.state_dict()
    sha = state_sha256(state)
    arrays, config = export_head(net.head, classes)
    identity = {**net.backbone.identity(), "weights": f"finetuned:{sha[:12]}", "weights_sha256": sha}
    tensors = {**{f"backbone.{k}": v.detach().cpu().numpy() for k, v in state.items()},
               **{f"head.{k}": v for k, v in arrays.items()}}
    return save_model(path, tensors, {**manifest, "kind": "finetuned", "head": config, "classes": classes,
                                      "identity": identity, "preprocess": net.backbone.preprocess.__dict__,
                                      "weights_file": None})


def loader(files, transform, draft, batch_size, workers, shuffle, device, seed) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ImageFiles(files, transform, draft), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda", generator=g)


def run_epoch(net, batches, labels, device, optimizer=None, bar=None) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    loss_fn = nn.CrossEntropyLoss()
    total, correct, count = 0.0, 0, 0
    use_amp = device.type == "cuda"
    for indices, images, _failures in batches:
        if images is None:
            continue
        x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(labels[indices], device=device)
        with torch.set_grad_enabled(optimizer is not None), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
            loss = loss_fn(logits.float(), y)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
        if bar is not None:
            bar.update(len(indices))
            bar.set_postfix(loss=f"{total / count:.3f}", acc=f"{correct / count:.3f}")
    return total / max(count, 1), correct / max(count, 1)


def finetune(backbone: str = "efficientnet_lite0", data: str = "digits", unfreeze: str = "none", *,
             data_root: str | None = None, epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
             backbone_lr_scale: float = 0.1, optimizer: str = "adamw", schedule: str = "cosine",
             step_size: int = 7, weight_decay: float = 1e-4, augment: str = "light", head: str | None = None,
             from_scratch: bool = False, patience: int | None = None, resume: bool = False,
             out: str | os.PathLike | None = None, device: str = "auto", workers: int | None = None,
             weights: str | None = None, input_size: int | None = None, seed: int = 0,
             progress: bool = True) -> dict:
    """Fine-tune ``unfreeze`` blocks (comma-separated, ``all`` or ``none``) plus a head on ``data``."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    ds = data_mod.load(data, data_root)
    if "train" not in ds.split_names() or "val" not in ds.split_names():
        raise FeatxError(f"{ds.root} needs train and val splits to fine-tune (it has {', '.join(ds.split_names())})")
    net_b = create_backbone(backbone, None, weights, pretrained=not from_scratch, input_size=input_size)
    blocks = list(net_b.spec.blocks) if from_scratch else parse_unfreeze(unfreeze, net_b)
    out = Path(out or Path("runs") / f"{ds.name}__{net_b.spec.name}__finetune_{'scratch' if from_scratch else unfreeze}")
    out.mkdir(parents=True, exist_ok=True)
    if head and not from_scratch and str(head).startswith("imagenet:"):
        head_module = head_from_imagenet(str(head), net_b, ds.classes)
    elif head and not from_scratch:
        head_module = head_from_model(head, net_b, ds.classes)
    else:
        head_module = nn.Linear(net_b.spec.feature_dim, len(ds.classes))
        nn.init.xavier_uniform_(head_module.weight)  # seed S0's Xavier-initialised output layer
        nn.init.zeros_(head_module.bias)
    net = FineTuneNet(net_b, head_module)
    net.trainable_blocks = blocks
    for p in net_b.model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(net.head.parameters()), "lr": lr}]
    for block in blocks:
        params = net_b.block_parameters(block)
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": lr * (1.0 if from_scratch else backbone_lr_scale)})
    net = net.to(dev).to(memory_format=torch.channels_last)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    else:
        raise FeatxError(f"unknown optimizer '{optimizer}': use sgd or adamw")
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    elif schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)
    else:
        raise FeatxError(f"unknown schedule '{schedule}': use cosine or step")

    config = {"backbone": net_b.spec.name, "data": str(ds.root), "unfreeze": blocks, "from_scratch": from_scratch,
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
              "optimizer": optimizer, "schedule": schedule, "augment": augment, "seed": seed,
              "head": str(head) if head else None}
    checkpoint = out / "checkpoint.pt"
    history, best, start_epoch = [], -1.0, 0
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=dev, weights_only=True)
        saved = json.loads(state["config"])
        if {k: v for k, v in saved.items() if k != "epochs"} != {k: v for k, v in config.items() if k != "epochs"}:
            raise FeatxError(f"{checkpoint} was written by a different finetune setup: rerun without --resume "
                             "or with the same options")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best, start_epoch = json.loads(state["history"]), float(state["best"]), int(state["epoch"]) + 1
        torch.set_rng_state(state["rng"])
    elif checkpoint.exists():
        raise FeatxError(f"{out} already holds a fine-tuning run: pass --resume to continue it or --out elsewhere")

    subsets = {s: ds.subset(s) for s in ds.split_names()}
    files = {s: [ds.root / p for p in paths] for s, (paths, _) in subsets.items()}
    labels = {s: y for s, (_, y) in subsets.items()}
    workers = default_workers(dev) if workers is None else workers
    draft = net_b.preprocess.resize_size
    eval_tf = net_b.preprocess.transform()
    train_tf = augmentation(net_b, augment)
    since_best = 0
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        batches = loader(files["train"], train_tf, draft, batch_size, workers, True, dev, seed + epoch)
        with tqdm(total=len(files["train"]), unit="img", file=sys.stderr, disable=not progress,
                  desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True) as bar:
            net.train()
            train_loss, train_acc = run_epoch(net, batches, labels["train"], dev, opt, bar=bar)
        sched.step()
        train_seconds = time.perf_counter() - started
        net.eval()
        val_batches = loader(files["val"], eval_tf, draft, batch_size, workers, False, dev, 0)
        with torch.inference_mode():
            val_loss, val_acc = run_epoch(net, val_batches, labels["val"], dev)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
               "val_accuracy": val_acc, "train_img_per_s": len(files["train"]) / train_seconds,
               "lr": opt.param_groups[0]["lr"]}
        history.append(row)
        if progress:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {train_acc:.4f}, val loss {val_loss:.4f} "
                  f"acc {val_acc:.4f}", file=sys.stderr)
        if val_acc > best:
            best, since_best = val_acc, 0
            save_finetuned(out / MODEL_NAME, net, ds.classes, {"dataset": ds.name, "finetune": config,
                                                                "epoch": epoch + 1})
        else:
            since_best += 1
        write_history(out / "history.csv", history)
        tmp = checkpoint.with_name("checkpoint.pt.tmp")
        torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": best, "history": json.dumps(history), "config": json.dumps(config),
                    "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, checkpoint)
        if patience is not None and since_best >= patience:
            break

    best_net = load_predictor(out / MODEL_NAME)
    metrics = {}
    for split in ("val", "test"):
        if split in files:
            proba, _ = best_net.proba(files[split], device, batch_size, workers)
            paths = ds.subset(split)[0]
            ok = ~np.isnan(proba).any(1)
            metrics[split] = report.classification_metrics(labels[split][ok], proba[ok], ds.classes,
                                                           np.asarray(paths)[ok])
    result = {**metrics, "history": history, "best_epoch": int(np.argmax([h["val_accuracy"] for h in history])) + 1,
              "unfreeze": blocks, "model": str(out / MODEL_NAME), "trainable_params": trainable(net),
              "total_params": used_params(net)}
    report.write_report(out, result, ds.classes)
    report.plot_curves(history, out / "curves")
    return result


def trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def used_params(net: FineTuneNet) -> int:
    """Parameters on the path from image to logits (the backbone's ImageNet classifier is not)."""
    classifier = net.backbone.spec.classifier
    return sum(p.numel() for n, p in net.named_parameters()
               if not n.startswith(f"backbone.model.{classifier}."))


def write_history(path: Path, history: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
