"""Distributed: fine-tuning under torchrun (DDP), one process per GPU, or gloo processes on CPUs.

``torchrun --nproc-per-node K -m featx finetune ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with
more than one process featx joins the process group (nccl on CUDA, gloo on CPUs), each process trains on
its share of every epoch (``DistributedSampler``) and rank 0 alone validates and writes. A single process
is a world of one, and every helper here is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from featx.errors import FeatxError, first_line

T = TypeVar("T")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that validates, tests and writes (history, checkpoints, the model file)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """On CUDA, this process's own GPU (``cuda:LOCAL_RANK``)."""
        if self.distributed and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def decide(self, step: Callable[[], T], device: torch.device) -> T:
        """Run ``step`` on rank 0 (validate, write, decide whether to stop) and give every process its outcome:
        the one point where the ranks wait on rank 0, exception-safe. When ``step`` fails, rank 0 raises its
        error (one line from the CLI) and every other rank raises ``RankFailed`` (a quiet non-zero exit), at
        once, instead of waiting in a collective until its timeout."""
        if not self.distributed:
            return step()
        outcome, error = [None], None
        if self.main:
            try:
                outcome = [("done", step())]
            except BaseException as exc:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
                error, outcome = exc, [("failed", first_line(exc))]
        torch.distributed.broadcast_object_list(outcome, src=0, device=device if device.type == "cuda" else None)
        kind, value = outcome[0]
        if kind == "failed":
            if error is not None:
                raise error
            raise RankFailed(f"rank 0 failed: {value}")
        return value

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process."""
        if self.distributed:
            torch.distributed.all_reduce(values)
        return values

    def leave(self) -> None:
        """Every process leaves the group together (rank 0 then finishes alone: no collective waits on it)."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class RankFailed(FeatxError):
    """Raised in every other process when rank 0 failed: rank 0 says why; these exit non-zero quietly."""


def join_world(device: torch.device) -> World:
    """The world torchrun started this process in, its process group joined; a world of one otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), size, local_rank)


def restarted() -> bool:
    """torchrun restarted this worker after a failure: the run resumes from its checkpoint by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
