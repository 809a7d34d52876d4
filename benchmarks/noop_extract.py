"""What a no-op ``featx extract`` costs on a large cache: every file stat-ed, every cache dataset checked
against its checksum (the features chunk by chunk, Fletcher-32), nothing computed.

    python benchmarks/noop_extract.py --images 10000

Writes ``--images`` tiny PNGs and a cache of random rows for them (lite0's 1,280 columns, the fingerprints the
files have), then times ``featx extract`` over it as a user runs it (a fresh process, median of ``--repeat``),
and the same call in this process.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine
from featx import data as data_mod
from featx.extraction.runner import cache_attrs, extract, finish, plan
from featx.extraction.store import FeatureStore, Rows, cache_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featx-noop-"))
    pixels = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for c in ("a", "b"):
        (tmp / "data" / c).mkdir(parents=True)
        for i in range(args.images // 2):
            pixels.save(tmp / "data" / c / f"{i:05d}.png")
    ds = data_mod.load(str(tmp / "data"))
    p = plan("efficientnet_lite0", None, None, None, "fp32")
    path = cache_path(tmp / "cache", ds.name, ds.root, p.identities[0], "float32")
    fingerprints = {f: data_mod.fingerprint(ds.root / f) for f in ds.paths}
    with FeatureStore(path) as store:
        features = np.random.default_rng(0).normal(size=(len(ds), 1280)).astype(np.float32)
        store.write_part(Rows(list(features), list(ds.paths), [fingerprints[f] for f in ds.paths]))
        finish(store, ds, fingerprints, tmp / "cache" / "onnx",
               lambda: {**cache_attrs(p.identities[0], p.preprocess, ds), "runtime": "onnxruntime"})
    command = [sys.executable, "-m", "featx", "extract", "--data", str(tmp / "data"), "--cache-dir",
               str(tmp / "cache"), "--quiet"]
    cli = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        cli.append(time.perf_counter() - start)
    assert f"{len(ds)} images (0 new" in out, out
    api = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        extract("efficientnet_lite0", str(tmp / "data"), cache_dir=tmp / "cache", progress=False)
        api.append(time.perf_counter() - start)
    print(f"machine: {machine()}; {len(ds)} images, cache {path.stat().st_size / 2**20:.0f} MiB; median of "
          f"{args.repeat}: featx extract (fresh process) {statistics.median(cli):.2f} s, extract() in-process "
          f"{statistics.median(api):.2f} s")


if __name__ == "__main__":
    main()
