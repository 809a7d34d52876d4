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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last suits both cuDNN and oneDNN convolutions (1.7x for lite0 on a 2-core CPU)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def prepare(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return net.to(device).eval().to(memory_format=torch.channels_last)


def forward(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        return net(to_device(images, device)).float()
