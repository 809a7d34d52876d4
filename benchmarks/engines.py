"""featx extract --engine ray against --engine local on the same images, in one run, plus the per-process
figures that bound a cluster: files read per CPU-second, and how fast the driver (the one writer) writes rows.

    python benchmarks/engines.py --data ../shared/data/hymenoptera --repeat 4

Both engines start from a fresh cache. The Ray cluster is started first (its start-up is printed apart);
the Ray engine's time includes starting its actors, as every run pays that. Prints a table and one JSON line.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import featx
from common import machine, parser, replicate
from featx.extraction.ray_engine import read_files
from featx.extraction.store import FeatureStore, Rows


def timed_extract(backbone: str, data: Path, cache: Path, **kw) -> dict:
    start = time.perf_counter()
    r = featx.extract(backbone, str(data), cache_dir=cache, progress=False, **kw)
    return {"seconds": time.perf_counter() - start, "img_per_s": r.img_per_s, "images": r.images,
            "runtime": r.runtime, "notes": r.notes}


def read_rate(files: list, preprocess, count: int = 128) -> float:
    """Files read and decoded per second by one read task (one CPU)."""
    batch = {"index": np.arange(min(count, len(files))), "path": np.array([str(f) for f in files[:count]])}
    start = time.perf_counter()
    read_files(batch, preprocess, on_device=False)
    return len(batch["path"]) / (time.perf_counter() - start)


def write_rate(folder: Path, rows: int = 20000, dim: int = 1280) -> float:
    """MB/s the driver writes feature rows into part files (float32, checksummed)."""
    features = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    with FeatureStore(folder / "bench.h5") as store:
        start = time.perf_counter()
        for lo in range(0, rows, 1024):
            part = Rows(list(features[lo:lo + 1024]), [f"f{i}.jpg" for i in range(lo, min(lo + 1024, rows))],
                        ["0-0-0-0"] * len(features[lo:lo + 1024]))
            store.write_part(part)
        seconds = time.perf_counter() - start
    return features.nbytes / 2 ** 20 / seconds


def main() -> None:
    ap = parser()
    ap.add_argument("--actors", type=int, default=None)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = replicate(Path(args.data), tmp / "data", args.repeat) if args.repeat > 1 else Path(args.data)
        local = timed_extract(args.backbone, data, tmp / "local")
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cluster_seconds = time.perf_counter() - start
        on_ray = timed_extract(args.backbone, data, tmp / "ray", engine="ray", actors=args.actors)
        files = sorted(f for f in data.rglob("*.jpg"))
        reads = read_rate(files, featx.create_backbone(args.backbone).preprocess)
        writes = write_rate(tmp)
    result = {"machine": machine(), "backbone": args.backbone, "images": local["images"], "local": local,
              "ray": on_ray, "ray_cluster_start_s": cluster_seconds,
              "ray_overhead": on_ray["seconds"] / local["seconds"] - 1,
              "read_img_per_cpu_s": reads, "driver_write_mb_s": writes}
    print(f"{local['images']} images, {args.backbone}, {machine()}")
    print(f"local engine   {local['seconds']:7.1f} s  {local['img_per_s']:6.1f} img/s ({local['runtime']})")
    print(f"ray engine     {on_ray['seconds']:7.1f} s  {on_ray['img_per_s']:6.1f} img/s ({on_ray['runtime']}), "
          f"+{result['ray_overhead']:.0%}; cluster start {cluster_seconds:.1f} s apart")
    print(f"one read task: {reads:.0f} img/s per CPU; driver writes {writes:.0f} MB/s "
          f"({writes * 2 ** 20 / 5120:.0f} img/s of 1,280-d float32)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
