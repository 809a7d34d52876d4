"""How long ``featx audit`` takes on a large cached dataset: out-of-fold probabilities (the logreg head's
selection on each split) and cleanlab's Datalab (label issues, near-duplicates, outliers), nothing extracted.

    python benchmarks/audit_speed.py --features cache/cats_dogs__efficientnet_lite0__pool__*.h5 --images 10000

Real features of a cache are repeated, with a little noise, to ``--images`` rows (classes and splits kept),
over that many tiny PNGs the cache is made to describe; then ``featx.heads.audit`` runs on it, timed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine
from featx import data as data_mod
from featx.extraction import store
from featx.heads.audit import audit
from featx.extraction.runner import cache_attrs, finish, plan
from featx.extraction.store import FeatureStore, Rows, cache_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", required=True)
    ap.add_argument("--images", type=int, default=10000)
    args = ap.parse_args()
    F = store.load(args.features)
    rng = np.random.default_rng(0)
    take = rng.integers(0, len(F.paths), args.images)
    tmp = Path(tempfile.mkdtemp(prefix="featx-audit-"))
    pixels = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for n, i in enumerate(take):
        folder = tmp / "data" / F.splits[i] / F.classes[F.y[i]]
        folder.mkdir(parents=True, exist_ok=True)
        pixels.save(folder / f"{n:05d}.png")
    ds = data_mod.load(str(tmp / "data"))
    p = plan("efficientnet_lite0", None, None, None, "fp32")
    path = cache_path(tmp / "cache", ds.name, ds.root, p.identities[0], "float32")
    fingerprints = {f: data_mod.fingerprint(ds.root / f) for f in ds.paths}
    source = {f"{F.splits[i]}/{F.classes[F.y[i]]}/{n:05d}.png": i for n, i in enumerate(take)}
    X = np.stack([F.X[source[f]] for f in ds.paths])
    X += rng.normal(0, X.std() * 0.3, X.shape).astype(np.float32)
    with FeatureStore(path) as cache:
        cache.write_part(Rows(list(X), list(ds.paths), [fingerprints[f] for f in ds.paths]))
        finish(cache, ds, fingerprints, tmp / "cache" / "onnx",
               lambda: {**cache_attrs(p.identities[0], p.preprocess, ds), "runtime": "onnxruntime"})
    start = time.perf_counter()
    r = audit(str(tmp / "data"), "efficientnet_lite0", cache_dir=tmp / "cache", out=tmp / "out", progress=False)
    seconds = time.perf_counter() - start
    print(f"machine: {machine()}; {r['images']} images x {X.shape[1]} features: audit {seconds:.1f} s "
          f"({len(r['label_issues'])} label issues, {len(r['duplicates'])} near-duplicate pairs, "
          f"{len(r['outliers'])} outliers)")


if __name__ == "__main__":
    main()
