"""Devices: which device runs a network, at what precision, fed by what DataLoader.

Extraction, prediction and fine-tuning share this policy, so a change (a new precision, a loader
setting) happens in one place. torch is imported where it is used: on a machine without an NVIDIA driver,
choosing the device (and so a cache's identity) needs no torch.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from typing import TYPE_CHECKING

from .errors import FeatxError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

NVIDIA_DRIVER = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")  # Linux, and WSL2's GPU device


def device_name(device: str = "auto") -> str:
    """``auto``: cuda when torch sees a CUDA GPU, else cpu. On Linux without an NVIDIA driver the answer is
    cpu without importing torch (1.4 s)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise FeatxError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")
    if device == "cpu" or device == "auto" and sys.platform == "linux" and not any(map(os.path.exists, NVIDIA_DRIVER)):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise FeatxError(f"--device {device} was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    return torch.device(device_name(device))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """On glibc, let freed memory stay with the process (malloc's mmap and trim thresholds at 2 GiB). A
    forward and backward pass on the CPU frees and reallocates the same large activation buffers every
    batch; handing them back to the OS each time costs a page fault per 4 KiB page (one-thread fine-tuning
    of lite0 in the test suite: 25 s, 11.7 s of it in the kernel, against 17 s). The process keeps its
    peak memory until it exits. The CLI sets this; returns whether it applied."""
    if sys.platform != "linux":
        return False
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt) and all(mallopt(option, 2 ** 31 - 1) == 1 for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads() -> int:
    """Threads for a forward pass on the CPU: ``OMP_NUM_THREADS`` when set (torch reads it too, so a
    machine shared by several jobs can hold each to its share), else every core this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def default_workers(device: torch.device, fast_model: bool = False) -> int:
    """On a GPU decoding is the bottleneck, so every core but one (the main process feeds the GPU). On a
    CPU one worker overlaps decoding with a torch model, which needs the cores itself; a model in ONNX
    Runtime is fast enough that decoding limits again, so half the cores, at least two (lite0 on 2 cores:
    64.8 img/s with two workers against 54.4 with one, BENCHMARKS.md)."""
    cores = usable_cores()
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(2, cores // 2) if fast_model else 1


def default_batch_size(device: torch.device) -> int:
    """32 keeps a CPU's caches warm (measured faster than 64 for lite0); GPUs want big batches."""
    return 128 if device.type == "cuda" else 32


PREFETCH = 4  # batches each worker keeps ready


class EpochSampler:
    """A seeded permutation per epoch (``set_epoch``), as ``DistributedSampler`` does: a loader with
    persistent workers shuffles anew each epoch, and a resumed run sees the orders an uninterrupted one would.
    ``shuffle=False`` keeps the files' order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def shm_prefetch(workers: int, batch_bytes: int, free: int | None = None) -> int:
    """Batches each worker may prefetch so that all of them fit in /dev/shm, where workers hand batches
    over (Docker's default is 64 MB): fewer than ``PREFETCH`` with a one-line note, 0 when not even one
    batch per worker fits (then the caller loads in the main process)."""
    if not workers or not os.path.isdir("/dev/shm"):
        return PREFETCH
    free = shutil.disk_usage("/dev/shm").free if free is None else free
    fits = int(free * 0.8 // max(1, workers * batch_bytes))
    if fits < PREFETCH:
        print(f"featx: /dev/shm has {free / 2**20:.0f} MiB free, {workers} workers prefetching {PREFETCH} batches "
              f"need {workers * PREFETCH * batch_bytes / 2**20:.0f} MiB: "
              + (f"prefetching {fits}" if fits else "loading in the main process")
              + " (a larger --shm-size, or fewer --workers, restores it)", file=sys.stderr)
    return min(fits, PREFETCH)


def make_loader(dataset, device: torch.device, batch_size: int, workers: int, collate_fn, image_bytes: int,
                sampler=None, drop_last: bool = False, persistent: bool = False, pin: bool = True) -> DataLoader:
    """The one DataLoader setup: pinned memory on CUDA (``pin=False`` for bytes nvJPEG reads), prefetching
    workers sized to /dev/shm, an optional sampler, workers kept across epochs with ``persistent``."""
    import torch
    from torch.utils.data import DataLoader

    prefetch = shm_prefetch(workers, batch_size * image_bytes)
    workers = workers if prefetch else 0
    # its own generator: starting an epoch draws nothing from the process's stream, which the head's dropout uses,
    # so fine-tuning through the loader and from the boundary cache (no loader) see the same dropout
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator(),
                      pin_memory=device.type == "cuda" and pin, drop_last=drop_last,
                      prefetch_factor=prefetch if workers else None, persistent_workers=persistent and workers > 0)


PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # autocast's torch dtype


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: fp32 on a CPU; on CUDA bf16 where the GPU supports it natively, else fp16 (also when the GPUs
    are a Ray cluster's and this process cannot ask them). ``device`` is a name: cpu, cuda or cuda:N."""
    if precision == "auto":
        if not device.startswith("cuda"):
            return "fp32"
        import torch

        if not torch.cuda.is_available():
            return "fp16"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise FeatxError(f"--precision {precision} is not supported: use auto, {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision``'s dtype on ``device``; fp32 runs as it is."""
    import torch

    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, PRECISIONS[precision]))


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last suits both cuDNN and oneDNN convolutions (1.7x for lite0 on a 2-core CPU)."""
    import torch

    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def prepare(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return net.to(device).eval().to(memory_format=torch.channels_last)


def forward(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A backbone's features at the precision it carries (``Backbone.precision``)."""
    with autocast(device, net.precision):
        return net(to_device(images, device)).float()


class BatchLimit:
    """How many images go through the device at once: all, until it runs out of memory; then half (the retry
    comes after the ``except`` block, so the failed attempt's activations are freed first, and a note says
    so), and twice as many again after ``GROW_AFTER`` batches that fit. Shared by extraction's forward pass
    (``HalvingForward``) and fine-tuning's steps (``finetuning.MicroBatches``)."""

    GROW_AFTER = 8

    def __init__(self):
        self.limit, self.fitted, self.notes = None, 0, []

    def halve(self, size: int, device: torch.device, too_big: str, note) -> None:
        """After running out of memory at ``size`` images: one line (``too_big``) at one image, else half."""
        import torch

        if size == 1:
            raise FeatxError(too_big)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.limit, self.fitted = size // 2, 0
        text = note(size, self.limit)
        self.notes += [text] if text not in self.notes else []

    def fits(self) -> None:
        """A batch at the limit went through: after ``GROW_AFTER`` of them, try twice as many."""
        if self.limit is not None:
            self.fitted += 1
            if self.fitted >= self.GROW_AFTER:
                self.limit, self.fitted = self.limit * 2, 0


class HalvingForward(BatchLimit):
    """``forward`` that survives running out of device memory: the batch is split (``BatchLimit``), with a note
    for the summary instead of a traceback."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        super().__init__()
        self.net, self.device = net, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        step = self.limit or len(images)
        return torch.cat([self.fit(images[i:i + step]) for i in range(0, len(images), step)])

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        try:
            out = forward(self.net, images, self.device)
        except torch.OutOfMemoryError:
            out = None  # leave the handler: its traceback holds the failed attempt's activations
        if out is not None:
            self.fits()
            return out
        self.halve(len(images), self.device, "one image does not fit in the device's memory: use --device cpu or a "
                   "smaller --input-size",
                   lambda size, limit: f"out of device memory at batch {size}: continued with batches of {limit}")
        return self(images)


def overlapped(batches, device: torch.device):
    """Batches of (indices, images, failures) with images on ``device``. On CUDA each batch's copy runs on
    a side stream while the previous batch computes; elsewhere this is a plain move."""
    import torch

    if device.type != "cuda":
        yield from ((i, x.to(device) if x is not None else None, f) for i, x, f in batches)
        return
    side, current, pending = torch.cuda.Stream(device), torch.cuda.current_stream(device), None
    for indices, images, failures in batches:
        event = None
        if images is not None and images.device != device:
            with torch.cuda.stream(side):
                images = images.to(device, non_blocking=True)
                event = side.record_event()
        if pending is not None:
            yield ready(pending, current)
        pending = (indices, images, failures, event)
    if pending is not None:
        yield ready(pending, current)


def ready(pending: tuple, stream) -> tuple:
    """Make ``stream`` wait for a batch's copy, and keep its memory alive for that stream's use."""
    indices, images, failures, event = pending
    if event is not None:
        stream.wait_event(event)
        images.record_stream(stream)
    return indices, images, failures
