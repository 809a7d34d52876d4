"""Checkpoints: what a fine-tuning run keeps after every epoch, so a kill costs at most one epoch.

A checkpoint is a ``torch.save`` payload behind a header line with its SHA-256, written atomically;
``--resume`` verifies it before loading (``weights_only=True``), so a damaged, truncated or foreign file
is one line naming it, never a traceback or silently wrong weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featx.errors import FeatxError
from featx.files import atomic_write


@dataclass
class Progress:
    """What survives a kill: the finished epochs, the best (val accuracy, -val loss), the next epoch, and the
    epochs since the best (so ``--patience`` counts on across a resume)."""

    history: list
    best: tuple = (-1.0, -np.inf)
    start_epoch: int = 0
    since_best: int = 0  # epochs since val last improved (--patience)

    def improves(self, row: dict) -> bool:
        """Higher val accuracy wins; equal accuracy goes to the lower val loss; with no val images at all,
        the latest epoch."""
        if row["val_accuracy"] is None:
            return True
        score = (row["val_accuracy"], -row["val_loss"])
        if score > self.best:
            self.best = score
            return True
        return False


CHECKPOINT_MAGIC = b"featx-checkpoint-1 sha256="
RESUME_FREE = ("epochs", "head")  # may change on --resume: the schedule is rebuilt; the head's start is in the weights


def save_checkpoint(path: Path, net, opt, sched, epoch: int, progress: Progress, config: dict,
                    scaler=None) -> None:
    """A torch.save payload behind a header line with its SHA-256, written atomically: ``--resume``
    trusts no byte it cannot verify."""
    payload = io.BytesIO()
    torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "best": list(progress.best), "history": json.dumps(progress.history),
                    "since_best": progress.since_best, "scaler": scaler.state_dict() if scaler else {},
                    "config": json.dumps(config), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, payload)
    body = payload.getvalue()
    with atomic_write(path) as tmp:
        tmp.write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def read_checkpoint(path: Path) -> dict:
    """The verified payload of a checkpoint; anything else (bit flips, truncation, an empty file, a file
    featx did not write) is one line naming the file and what to do."""
    raw = path.read_bytes()
    header, _, body = raw.partition(b"\n")
    fix = "delete it to start the run again, or pass another --out"
    if not header.startswith(CHECKPOINT_MAGIC):
        raise FeatxError(f"{path} is not a featx checkpoint (or was written before checkpoints carried a "
                         f"digest): {fix}")
    if hashlib.sha256(body).hexdigest().encode() != header[len(CHECKPOINT_MAGIC):]:
        raise FeatxError(f"{path} fails its SHA-256 check (damaged or truncated): {fix}")
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)  # RNG states must stay on the CPU


def check_views(path: Path, views: int) -> None:
    """Before any boundary row is computed: a checkpoint written with another ``--views`` is refused in the
    line ``load_checkpoint`` would give after them."""
    saved = json.loads(read_checkpoint(path)["config"]).get("views")
    if saved is not None and saved != views:
        raise FeatxError(f"{path} was written by a different finetune setup (views: {saved} then, {views} now): "
                         "rerun without --resume or with the same options")


def load_checkpoint(path: Path, net, opt, sched, config: dict, scaler=None) -> Progress:
    """Restore a run. ``--epochs`` may change: the schedule is then rebuilt for the new total, as a fresh
    run of that length would have it at this epoch (earlier epochs keep the rates they ran with)."""
    state = read_checkpoint(path)
    saved = json.loads(state["config"])
    differ = sorted(k for k in saved.keys() | config.keys() if k not in RESUME_FREE and saved.get(k) != config.get(k))
    if differ:
        changes = "; ".join(f"{k}: {saved.get(k)} then, {config.get(k)} now" for k in differ)
        raise FeatxError(f"{path} was written by a different finetune setup ({changes}): rerun without --resume "
                         "or with the same options")
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["optimizer"])
    if saved["epochs"] == config["epochs"]:
        sched.load_state_dict(state["scheduler"])
    else:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"]
        with warnings.catch_warnings():  # stepping the schedule alone, to replay it, is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(int(state["epoch"]) + 1):
                sched.step()
    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available():  # the generators of the GPUs that exist now, fewer or more than then
        for device, generator_state in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, device)
    if state.get("scaler") and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    return Progress(json.loads(state["history"]), tuple(state["best"]), int(state["epoch"]) + 1,
                    int(state.get("since_best", 0)))
