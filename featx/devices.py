"""Devices: which device runs a network, at what precision, fed by what DataLoader.

Extraction, prediction and fine-tuning share this policy, so a change (a new precision, a loader
setting) happens in one place.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.data import DataLoader

from .errors import FeatxError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatxError(f"--device {device} was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise FeatxError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


def default_workers(device: torch.device) -> int:
    """On a GPU decoding is the bottleneck, so use every core; on a CPU one worker overlaps decoding
    with the model, which needs the cores itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 16) if device.type == "cuda" else 1


def default_batch_size(device: torch.device) -> int:
    """32 keeps a CPU's caches warm (measured faster than 64 for lite0); GPUs want big batches."""
    return 128 if device.type == "cuda" else 32


def make_loader(dataset, device: torch.device, batch_size: int, workers: int, collate_fn,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """The one DataLoader setup: pinned memory on CUDA, prefetching workers, seeded shuffling."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp32 on a CPU; on CUDA bf16 where the GPU supports it natively, else fp16."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise FeatxError(f"--precision {precision} is not supported: use auto, {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision``'s dtype on ``device``; fp32 runs as it is."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last suits both cuDNN and oneDNN convolutions (1.7x for lite0 on a 2-core CPU)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def prepare(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return net.to(device).eval().to(memory_format=torch.channels_last)


def forward(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A backbone's features at the precision it carries (``Backbone.precision``)."""
    with autocast(device, net.precision):
        return net(to_device(images, device)).float()
