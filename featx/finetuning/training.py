"""Fine-tuning, stage 3: unfreeze named top blocks of a backbone and train them end to end with a head.

Frozen blocks keep ``requires_grad=False`` *and* stay in eval mode, so their BatchNorm statistics
never move (the Keras fine-tuning lesson), and their output for an image never changes: by default it is
computed once per image and view and the epochs train only the top part from it (``boundary.py``). The head
may start from a stage-2 model or ImageNet rows (``warmstart.py``). Every epoch writes a checkpoint;
``resume=True`` continues after a kill. The best epoch by val accuracy is saved as a featx model file that
``predict`` and ``evaluate`` use like any stage-2 model.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from tqdm import tqdm

from featx import data as data_mod
from . import boundary
from featx import provenance
from featx.report import metrics as report
from featx import workspace
from featx.extraction.backbones import create_backbone
from featx.extraction.network import Backbone
from featx.devices import (BatchLimit, EpochSampler, autocast, default_workers, make_loader, overlapped, resolve_device,
                      resolve_precision)
from featx.errors import FeatxError
from featx.files import REPORT_BYTES, make_folder, remove_stale_temporaries, room
from featx.heads.base import class_weights
from featx.extraction.images import ImageFiles, SeededImages, collate, path_keys
from .distributed import World, join_world, restarted
from .checkpoints import Progress, check_views, load_checkpoint, save_checkpoint
from featx.modelfile import MODEL_NAME, ModelFile, digest
from featx.serve.predictor import load_predictor
from .warmstart import choose_head, export_head, fine_tune_rows, starting_head

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


class EpochTagged:
    """A sampler whose indices come tagged with the epoch (``set_epoch``), for ``images.SeededImages``."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class FineTuneNet(nn.Module):
    """Backbone (pooled features) -> head; takes uint8 images, returns logits."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.trainable_blocks: list = []
        self.cut = None  # a ``boundary.Cut`` while training from the boundary cache: inputs are boundary rows

    def forward(self, images):
        features = self.backbone(images) if self.cut is None else self.cut.resume(self.backbone, images)
        return self.head(features.float())

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


def save_finetuned(path: Path, net: FineTuneNet, classes: list, info: dict) -> Path:
    state = {k: v.detach().cpu().numpy() for k, v in net.backbone.model.state_dict().items()}
    sha = digest("", state)
    arrays, config = export_head(net.head, classes)
    identity = replace(net.backbone.identity(), weights=f"finetuned:{sha[:12]}", weights_sha256=sha)
    return ModelFile(kind="finetuned", classes=classes, identity=identity, preprocess=net.backbone.preprocess.__dict__,
                     head_config=config, head_arrays=arrays, backbone_state=state, info=info).save(path)


class MicroBatches(BatchLimit):
    """A training step's images through forward and backward a part at a time once the device runs out of
    memory (``BatchLimit``), the gradients accumulated, so the step (and the effective batch) stays the same."""

    def step(self, net, images, y, loss_fn, optimizer, scaler, precision: str, device) -> tuple:
        """One optimizer step on (images, y): (logits, mean loss), both detached."""
        while True:
            optimizer.zero_grad(set_to_none=True)
            try:
                done = self.accumulate(net, images, y, loss_fn, scaler, precision, device)
            except torch.OutOfMemoryError:
                done = None  # leave the handler first: its traceback holds the failed attempt's activations
            if done is not None:
                break
            self.halve(self.limit or len(y), device, "one training image does not fit in the device's memory: use "
                       "a smaller --input-size, --unfreeze fewer blocks, or --device cpu",
                       lambda size, limit: f"out of device memory at {size} images a step: continued with {limit} "
                                           "at a time (gradients accumulated, same step)")
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        self.fits()
        return done

    def accumulate(self, net, images, y, loss_fn, scaler, precision: str, device) -> tuple:
        size, logits, total = self.limit or len(y), [], 0.0
        starts = list(range(0, len(y), size))
        for start in starts:
            end = min(start + size, len(y))
            last = start == starts[-1]
            # under DDP gradients are exchanged once, with the last part's backward
            with (contextlib.nullcontext() if last or not isinstance(net, DDP) else net.no_sync()), \
                    autocast(device, precision):
                out = net(channels_last(images[start:end]))
                loss = loss_fn(out.float(), y[start:end]) * ((end - start) / len(y))
            (loss if scaler is None else scaler.scale(loss)).backward()
            logits.append(out.detach())
            total += loss.detach()
        return torch.cat(logits), total


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images and boundary feature maps in channels_last; a boundary of pooled features as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def run_epoch(net, batches, labels, device, optimizer=None, bar=None, world: World = World(),
              class_weights: torch.Tensor | None = None, scaler=None,
              micro: MicroBatches | None = None) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy) over every process. Loss
    and hits add up on the device and are read once at the end (on a CPU every step, for the progress bar),
    so a GPU never waits for the host mid-epoch. Under DDP a process whose batch held no decodable image
    skips it and ``join`` keeps the others' gradient exchanges matched, so no process waits forever. Under
    fp16, ``scaler`` (a ``GradScaler``) scales the loss so small gradients do not flush to zero, and skips a
    step whose gradients overflowed. A training step that runs out of device memory is split (``micro``).
    The split persists across epochs in ``micro``."""
    micro = micro or MicroBatches()
    loss_fn = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.float().to(device))
    sums = torch.zeros(3, device=device)  # loss, hits, images
    precision = getattr(net, "module", net).backbone.precision
    with net.join() if isinstance(net, DDP) else contextlib.nullcontext():
        for indices, images, _failures in overlapped(batches, device):
            if images is None:
                continue
            y = torch.as_tensor(labels[indices], device=device)
            if optimizer is not None:
                logits, loss = micro.step(net, images, y, loss_fn, optimizer, scaler, precision, device)
            else:
                with torch.no_grad(), autocast(device, precision):
                    logits = net(channels_last(images))
                    loss = loss_fn(logits.float(), y)
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
            if bar is not None:
                bar.update(len(indices))
                if device.type == "cpu":
                    bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}",
                                    acc=f"{sums[1].item() / sums[2].item():.3f}")
    total, correct, count = world.sum(sums).tolist() if optimizer is not None else sums.tolist()
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise FeatxError(f"the {'training' if optimizer else 'validation'} loss became {mean}: the network "
                         "diverged, so lower --lr; the epochs finished before this one are kept")
    return mean, correct / max(count, 1)


def drops_last_batch(images: int, batch_size: int) -> bool:
    """Whether an epoch leaves out its last batch: only when that batch is a single image (a one-image step is
    noise, and BatchNorm in training mode cannot normalise one row). A few-shot set keeps every image: dropping
    any partial batch left 15 of 47 training images out of every epoch."""
    return images > batch_size and images % batch_size == 1


def training_setup(net: FineTuneNet, blocks: list, lr: float, lr_scale: float, optimizer: str, schedule: str,
                   epochs: int, step_size: int, weight_decay: float):
    """Freeze everything, then give the head and each unfrozen block a parameter group; build the
    optimizer and the learning-rate schedule."""
    for p in net.backbone.model.parameters():
        p.requires_grad_(False)
    net.trainable_blocks = blocks
    groups = [{"params": list(net.head.parameters()), "lr": lr}]
    for block in blocks:
        params = net.backbone.block_parameters(block)
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": lr * lr_scale})
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    else:
        raise FeatxError(f"unknown optimizer '{optimizer}': use sgd or adamw")
    if schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if schedule == "step":
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)
    raise FeatxError(f"unknown schedule '{schedule}': use cosine or step")


POSITIVE = {"epochs", "batch_size", "lr", "step_size", "patience", "views"}  # the rest must be >= 0


def check_options(**options) -> None:
    """Every numeric option finite and in range, before any work: one line naming the option."""
    for name, value in options.items():
        if value is None and name == "patience":
            continue
        low = "> 0" if name in POSITIVE else ">= 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (value <= 0 if name in POSITIVE else value < 0):
            raise FeatxError(f"--{name.replace('_', '-')} {value}: must be a finite number {low}")
        if name in ("epochs", "batch_size", "step_size", "patience", "views") and value != int(value):
            raise FeatxError(f"--{name.replace('_', '-')} {value}: must be a whole number")


def finetune(backbone: str | None = None, data: str | None = None, unfreeze: str = "none", *,
             data_root: str | None = None, epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
             backbone_lr_scale: float = 0.1, optimizer: str = "adamw", schedule: str = "cosine",
             step_size: int = 7, weight_decay: float = 1e-4, augment: str = "light", head: str | None = None,
             from_scratch: bool = False, patience: int | None = None, resume: bool = False,
             out: str | os.PathLike | None = None, device: str = "auto", workers: int | None = None,
             weights: str | None = None, input_size: int | None = None, precision: str | None = None,
             val_fraction: float = 0.15, seed: int = 0, cache_dir: str | os.PathLike = "cache",
             progress: bool = True, shuffle: bool = True, class_weight: str | None = None,
             boundary_cache: bool = True, views: int | None = None, boundary_cache_gb: float | None = None,
             runtime: str = "auto") -> dict:
    """Fine-tune ``unfreeze`` blocks (comma-separated, ``all`` or ``none``) plus a head on ``data``.

    The epoch is chosen on val; data without val/ gets a stable ``val_fraction`` of train instead. The
    result says which split chose the epoch (``selected_on``): its figures are optimistic, test's are not.
    With ``boundary_cache`` the frozen part below the unfrozen blocks runs once per image and view (``views``
    augmented views per training image), kept under ``cache_dir``/boundary within ``boundary_cache_gb``, and
    the epochs train from there (``boundary.py``); ``runtime`` runs that part as extraction's does.
    What is left out (None) comes from the last extraction in ``cache_dir``, and the head from the last
    fit-head there (``choose_head``).

    Under torchrun (``WORLD_SIZE`` > 1) each process trains on its share of every epoch with ``batch_size``
    images a step (the global batch is that times the processes), and rank 0 alone validates and writes;
    a restarted torchrun worker resumes from the checkpoint by itself (``distributed.py``)."""
    views = boundary.DEFAULT_VIEWS if views is None else views
    boundary_cache_gb = boundary.DEFAULT_GB if boundary_cache_gb is None else boundary_cache_gb
    check_options(epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale,
                  weight_decay=weight_decay, step_size=step_size, patience=patience, views=views,
                  boundary_cache_gb=boundary_cache_gb)
    run = Training(backbone, data, unfreeze, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
                   backbone_lr_scale=backbone_lr_scale, optimizer=optimizer, schedule=schedule, step_size=step_size,
                   weight_decay=weight_decay, augment=augment, head=head, from_scratch=from_scratch,
                   patience=patience, resume=resume, out=out, device=device, workers=workers, weights=weights,
                   input_size=input_size, precision=precision, val_fraction=val_fraction, seed=seed,
                   cache_dir=cache_dir, progress=progress, shuffle=shuffle, class_weight=class_weight,
                   boundary_cache=boundary_cache, views=views, boundary_cache_gb=boundary_cache_gb, runtime=runtime)
    for epoch in range(run.state.start_epoch, epochs):
        trained = run.epoch(epoch)
        if run.world.decide(lambda: run.close(epoch, trained), run.device):  # every rank waits for rank 0 here
            break
    return run.finish()


class Training:
    """A fine-tuning run as its named steps: building it (``__init__``: ``load_data``, ``build_network`` with its
    optimizer, ``prepare_boundary_cache``, ``make_loaders``, the progress of a resumed run), an ``epoch`` of
    training on every rank, then rank 0's ``close`` of it (``validate``, record, ``checkpoint``, patience), and
    ``finish`` (leave the process group, score, report). The ranks share one point per epoch, ``World.decide``
    around ``close``."""

    def __init__(self, backbone, data, unfreeze, *, data_root, epochs, batch_size, lr, backbone_lr_scale, optimizer,
                 schedule, step_size, weight_decay, augment, head, from_scratch, patience, resume, out, device,
                 workers, weights, input_size, precision, val_fraction, seed, cache_dir, progress, shuffle,
                 class_weight, boundary_cache, views, boundary_cache_gb, runtime):
        given = workspace.fill(cache_dir, "finetune", backbone=backbone, data=data, input_size=input_size,
                               precision=precision, weights=weights)
        torch.manual_seed(seed)
        dev = resolve_device(device)
        world = join_world(dev)
        self.world, self.device = world, world.device(dev)
        self.progress, resume = progress and world.main, resume or restarted()
        self.epochs, self.patience, self.batch_size, self.cache_dir, self.asked_device = \
            epochs, patience, batch_size, cache_dir, device
        ds = self.load_data(given["data"], data_root, val_fraction)
        net_b = create_backbone(given["backbone"], None, given["weights"], pretrained=not from_scratch,
                                input_size=given["input_size"],
                                precision=resolve_precision(given["precision"] or "auto", str(self.device)))
        head = None if from_scratch else choose_head(head, net_b, ds, cache_dir, quiet=not world.main)
        self.build_network(net_b, head, unfreeze, from_scratch, out, resume, lr, backbone_lr_scale, optimizer,
                           schedule, epochs, step_size, weight_decay)
        subsets = {s: ds.subset(s) for s in ds.split_names()}
        self.files = {s: [ds.root / p for p in paths] for s, (paths, _) in subsets.items()}
        self.labels = {s: y for s, (_, y) in subsets.items()}
        self.workers = default_workers(self.device) if workers is None else workers
        self.cache, self.cache_note = None, "boundary cache not used: --no-boundary-cache"
        if boundary_cache:
            self.prepare_boundary_cache(net_b, subsets, augment, views, epochs, seed, resume, boundary_cache_gb,
                                        runtime)
        if self.progress:
            print(f"featx: {self.cache_note}", file=sys.stderr)
        self.config = {"backbone": net_b.spec.name, "data": str(ds.root), "split": ds.split_source,
                       "unfreeze": self.blocks, "from_scratch": from_scratch, "epochs": epochs,
                       "batch_size": batch_size, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
                       "optimizer": optimizer, "schedule": schedule, "augment": augment, "seed": seed,
                       "head": str(head) if head else None, **({"class_weight": class_weight} if class_weight else {}),
                       # epoch e trains on view e mod views: another count is another run (uncached: a view an epoch);
                       # the first min(views, epochs) epochs are the same whatever the count, so --epochs may grow
                       **({"views": views} if self.cache and augment != "none" else {})}
        # fp16 needs its loss scaled (its range flushes small gradients to zero); bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(self.device.type) if net_b.precision == "fp16" else None
        self.state = load_checkpoint(self.checkpoint_path, self.net, self.opt, self.sched, self.config, self.scaler) \
            if self.checkpoint_path.exists() else Progress([])
        weights = class_weights(class_weight, self.labels["train"], ds.classes)
        self.class_weights = None if weights is None else torch.as_tensor(weights)
        self.make_loaders(net_b, subsets, augment, batch_size, shuffle, seed)
        self.model = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if world.distributed else self.net
        # what an epoch's writes need: the checkpoint (weights and two optimizer moments), the model, the report
        self.needed = 4 * sum(p.numel() * p.element_size() for p in self.net.parameters()) + REPORT_BYTES
        self.micro = MicroBatches()
        torch.manual_seed(seed + world.rank)  # the head's dropout: a stream per process (augmentation: SeededImages)

    def load_data(self, data: str, data_root, val_fraction: float) -> data_mod.Dataset:
        """The dataset, checked to have train/ and two classes; without val/, a stable share of train is val."""
        ds = data_mod.load(data, data_root)
        if "train" not in ds.split_names():
            raise FeatxError(f"{ds.root} has no train/ split (it has {', '.join(ds.split_names())}): fine-tuning "
                             "trains on train/")
        if len(ds.classes) < 2:
            raise FeatxError(f"{ds.root} has one class ({ds.classes[0]}): a classifier needs at least two class "
                             "folders")
        if "val" in ds.split_names():  # val/ folders, or the hashed split of a folder of class folders
            self.val_source = "val/" if ds.split_source == "folders" else "the hashed val split"
        else:
            if not 0 < val_fraction < 1:
                raise FeatxError(f"--val-fraction {val_fraction}: use a number between 0 and 1")
            ds = ds.with_val_from_train(val_fraction)
            self.val_source = f"{val_fraction:.0%} of train, by path hash"
        self.ds = ds
        return ds

    def build_network(self, net_b, head, unfreeze, from_scratch, out, resume, lr, backbone_lr_scale, optimizer,
                      schedule, epochs, step_size, weight_decay) -> None:
        """The network with its starting head, the blocks that train, their optimizer and schedule, the run's
        folder, and the provenance of the rows it trains and chooses on (and of a warm start's)."""
        ds = self.ds
        warm = provenance.of_model(ModelFile.load(head)) if head and not str(head).startswith("imagenet:") else None
        self.provenance = provenance.record(ds.root, **fine_tune_rows(ds), chose="the epoch",
                                            **({"warm_start": warm} if warm else {}))
        self.blocks = list(net_b.spec.blocks) if from_scratch else parse_unfreeze(unfreeze, net_b)
        self.out = Path(out or Path("runs") / f"{ds.name}__{net_b.spec.name}__finetune_"
                        f"{'scratch' if from_scratch else unfreeze}")
        make_folder(self.out)
        remove_stale_temporaries(self.out)  # a checkpoint or model a killed run was writing
        net = FineTuneNet(net_b, starting_head(head, net_b, ds.classes))
        self.opt, self.sched = training_setup(net, self.blocks, lr, 1.0 if from_scratch else backbone_lr_scale,
                                              optimizer, schedule, epochs, step_size, weight_decay)
        self.net = net.to(self.device).to(memory_format=torch.channels_last)
        self.checkpoint_path = self.out / "checkpoint.pt"
        if self.checkpoint_path.exists() and not resume:
            raise FeatxError(f"{self.out} already holds a fine-tuning run: pass --resume to continue it or --out "
                             "elsewhere")

    def prepare_boundary_cache(self, net_b, subsets, augment, views, epochs, seed, resume, boundary_cache_gb,
                               runtime) -> None:
        """The frozen part's outputs, computed once by rank 0 and read by every rank (``boundary.py``)."""
        if augment != "none" and resume and self.checkpoint_path.exists():
            check_views(self.checkpoint_path, views)
        cut = boundary.find_cut(net_b, lambda name: in_blocks(name, net_b, self.blocks)) if self.blocks else \
            boundary.Cut(None)  # only the head trains: the boundary is the features
        prepare = partial(boundary.prepare, net_b, cut, self.ds, {s: subsets[s][0] for s in ("train", "val") if s in
                                                                  subsets}, augment, augmentation(net_b, augment),
                          views, epochs, seed, self.cache_dir, self.device, self.batch_size, self.workers,
                          boundary_cache_gb, runtime, self.progress)

        def build() -> None:  # rank 0, the one writer, builds it while the others wait
            self.cache, self.cache_note = prepare()

        self.world.decide(build, self.device)
        if not self.world.main:
            self.cache, self.cache_note = prepare(build=False)
        self.net.cut = self.cache and self.cache.cut

    def make_loaders(self, net_b, subsets, augment, batch_size, shuffle, seed) -> None:
        """The epoch sampler (this rank's share under torchrun) and, without a boundary cache, the image loaders."""
        world, train = self.world, self.files["train"]
        draft, size = net_b.preprocess.resize_size, net_b.preprocess.input_size
        self.sampler = EpochTagged(DistributedSampler(train, world.size, world.rank, shuffle=shuffle, seed=seed)
                                   if world.distributed else EpochSampler(len(train), seed, shuffle))
        self.drop_last = drops_last_batch(len(self.sampler), batch_size)
        if self.cache is None:  # images decoded every epoch, by workers kept across epochs
            train_set = SeededImages(train, augmentation(net_b, augment), draft, seed, path_keys(subsets["train"][0]))
            self.train_loader = make_loader(train_set, self.device, batch_size, self.workers, collate,
                                            3 * size * size, sampler=self.sampler, persistent=True,
                                            drop_last=self.drop_last)
            self.val_loader = make_loader(ImageFiles(self.files.get("val", []), net_b.preprocess.transform(), draft),
                                          self.device, batch_size, self.workers, collate, 3 * size * size,
                                          persistent=True)

    def epoch(self, epoch: int) -> dict:
        """Train one epoch on every rank: (loss, accuracy) over all of them, its seconds and learning rate."""
        started = time.perf_counter()
        with tqdm(total=len(self.files["train"]), unit="img", file=sys.stderr, disable=not self.progress,
                  desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True) as bar:
            self.net.train()
            lr_used = self.opt.param_groups[0]["lr"]
            self.sampler.set_epoch(epoch)
            batches = self.train_loader if self.cache is None else \
                self.cache.batches("train", self.sampler, self.batch_size, self.drop_last)
            loss, accuracy = run_epoch(self.model, batches, self.labels["train"], self.device, self.opt,
                                       bar=bar, world=self.world, class_weights=self.class_weights,
                                       scaler=self.scaler, micro=self.micro)
        self.sched.step()
        self.net.eval()
        return {"train_loss": loss, "train_accuracy": accuracy, "seconds": time.perf_counter() - started,
                "lr": lr_used}

    def validate(self) -> tuple:
        """(val loss, val accuracy), or (None, None) without val images."""
        if "val" not in self.files:
            return None, None
        with torch.inference_mode():
            batches = self.val_loader if self.cache is None else self.cache.batches("val", None, self.batch_size)
            return run_epoch(self.net, batches, self.labels["val"], self.device)

    def close(self, epoch: int, trained: dict) -> bool:
        """Rank 0's end of an epoch: validate, record, write; whether to stop early (``--patience``)."""
        val_loss, val_acc = self.validate()
        self.state.history.append({"epoch": epoch + 1, "train_loss": trained["train_loss"],
                                   "train_accuracy": trained["train_accuracy"], "val_loss": val_loss,
                                   "val_accuracy": val_acc,
                                   "train_img_per_s": len(self.files["train"]) / trained["seconds"],
                                   "lr": trained["lr"]})
        if self.progress:
            print(f"epoch {epoch + 1}: train loss {trained['train_loss']:.4f} acc {trained['train_accuracy']:.4f}"
                  + (f", val loss {val_loss:.4f} acc {val_acc:.4f}" if val_acc is not None else ""), file=sys.stderr)
        self.checkpoint(epoch)
        return self.patience is not None and self.state.since_best >= self.patience

    def checkpoint(self, epoch: int) -> None:
        """The best model so far, the history and the checkpoint, each written atomically."""
        with room(self.out, self.needed):
            if self.state.improves(self.state.history[-1]):
                self.state.since_best = 0
                save_finetuned(self.out / MODEL_NAME, self.net, self.ds.classes,
                               {"dataset": self.ds.name, "finetune": self.config, "epoch": epoch + 1,
                                "provenance": self.provenance})
            else:
                self.state.since_best += 1
            write_history(self.out / "history.csv", self.state.history)
            save_checkpoint(self.checkpoint_path, self.net, self.opt, self.sched, epoch, self.state, self.config,
                            self.scaler)

    def finish(self) -> dict:
        """Every rank leaves the group together; rank 0 then scores the best epoch and reports, with nobody
        waiting on it."""
        self.world.leave()
        if self.cache is not None:
            self.cache.close()
            self.net.cut = None
        if not self.world.main:
            return {"rank": self.world.rank}
        with room(self.out, self.needed):
            result = final_report(self.out, self.net, self.ds, self.files, self.labels, self.state.history,
                                  self.blocks, self.asked_device, self.batch_size, self.workers, self.val_source,
                                  self.cache_dir)
        return {**result, "processes": self.world.size, "global_batch_size": self.batch_size * self.world.size,
                "notes": self.micro.notes, "boundary_cache": {
                    "used": self.cache is not None, "note": self.cache_note, **(self.cache.info if self.cache else {})}}


def final_report(out: Path, net: FineTuneNet, ds, files: dict, labels: dict, history: list, blocks: list,
                 device: str, batch_size: int, workers: int, val_source: str, cache_dir: str | os.PathLike) -> dict:
    """Score the best epoch's saved model on val (which chose it, so optimistic) and test, and write the
    report and curves. On a CPU the saved model is exported to ONNX for this (``cache_dir``/onnx), which is
    faster than torch even counting the export, and leaves ``featx predict`` a torch-free path."""
    best_net = load_predictor(out / MODEL_NAME)
    metrics = {}
    for split in ("val", "test"):
        if split in files:
            proba, _ = best_net.proba(files[split], device, batch_size, workers, cache_dir=cache_dir)
            paths = ds.subset(split)[0]
            ok = ~np.isnan(proba).any(1)
            metrics[split] = report.classification_metrics(labels[split][ok], proba[ok], ds.classes,
                                                           np.asarray(paths)[ok])
    result = {**metrics, "history": history, "best_epoch": best_net.model.info["epoch"], "selected_on": "val", "val_source": val_source,
              "unfreeze": blocks, "model": str(out / MODEL_NAME), "trainable_params": trainable(net),
              "total_params": used_params(net), "provenance": provenance.of_model(best_net.model)}
    result["report_page"] = str(report.write_report(
        out, result, ds.classes, f"{net.backbone.spec.name} fine-tuned on {ds.name} ({', '.join(blocks) or 'head only'})",
        {"data": str(ds.root), "backbone": net.backbone.spec.name, "unfrozen": ", ".join(blocks) or "none",
         "best epoch": result["best_epoch"], "val": val_source, "model": result["model"]}, image_root=ds.root))
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
