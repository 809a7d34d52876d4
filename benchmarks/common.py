"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import os
from pathlib import Path


def replicate(src: Path, dst: Path, repeat: int) -> Path:
    """Link every file of ``src`` ``repeat`` times under ``dst``: volume for fast machines, no copies."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dst / f.relative_to(src).parent
            target.mkdir(parents=True, exist_ok=True)
            for k in range(repeat):
                os.symlink(f.resolve(), target / f"{k}_{f.name}")
    return dst
