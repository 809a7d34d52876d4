"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch


def replicate(src: Path, dst: Path, repeat: int) -> Path:
    """Link every file of ``src`` ``repeat`` times under ``dst``: volume for fast machines, no copies."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src).parent
            target.mkdir(parents=True, exist_ok=True)
            for k in range(repeat):
                os.symlink(f.resolve(), target / f"{k}_{f.name}")
    return dst


def parser() -> argparse.ArgumentParser:
    """The options every image benchmark takes; each script adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="A local state dict, for backbones whose weights are not here.")
    ap.add_argument("--data", required=True)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed-workers", type=int, default=4, help="DataLoader workers of the seed loop (S2 uses 4)")
    return ap


def machine(device: torch.device | None = None) -> str:
    gpu = f", {torch.cuda.get_device_name()}" if device is not None and device.type == "cuda" else ""
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}"
