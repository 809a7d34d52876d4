"""Stage 2 timings: every head with its whole selection (5-fold CV over the C path or the k grid, early
stopping for the MLP), on real hymenoptera features, a 120-class few-shot fixture and 10,000 x 2,048 synthetic
features; optionally against another featx checkout (``--baseline``), each fit in a fresh process, the two
implementations alternating row by row in one run.

    python benchmarks/heads_speed.py --features cache/hymenoptera__efficientnet_lite0__pool__*.h5 \\
        [--baseline /path/to/older/featx]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, sys, time
import numpy as np
from sklearn.datasets import make_classification
from featx import heads, store

data, clf, features = sys.argv[1:4]
if data == "hymenoptera":
    F = store.load(features)
    (X, y, _), (Xt, yt, _) = F.split("train"), F.split("val")
elif data == "few-shot-120":  # 120 classes of 3-8 training images, 1,280 sparse non-negative features
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 9, 120)
    y, yt = np.repeat(np.arange(120), counts), np.repeat(np.arange(120), 5)
    centres = np.abs(rng.normal(0, 1, (120, 1280))) * (rng.random((120, 1280)) < 0.1)
    X, Xt = (np.maximum(centres[c] + rng.normal(0, 2.0, (len(c), 1280)), 0).astype(np.float32) for c in (y, yt))
else:
    Xa, ya = make_classification(n_samples=12_000, n_features=2048, n_informative=64, n_classes=10, random_state=0)
    X, y, Xt, yt = Xa[:10_000].astype(np.float32), ya[:10_000], Xa[10_000:].astype(np.float32), ya[10_000:]
start = time.perf_counter()
head = heads.make_head(clf, device="cpu").fit(X, y)
seconds = time.perf_counter() - start
chosen = {k: v for k, v in head.selected_.items() if k in ("C", "k", "epochs", "evaluated", "warnings", "edge")}
print(json.dumps({"shape": list(X.shape), "seconds": round(seconds, 2), "held_out_accuracy": round(head.score(Xt, yt), 4),
                  "chosen": chosen}))
'''


def run(checkout: Path, data: str, clf: str, features: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", CHILD, data, clf, features], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", required=True, help="a featx cache of hymenoptera (lite0)")
    ap.add_argument("--baseline", type=Path, default=None, help="another featx checkout to time beside this one")
    ap.add_argument("--data", default="hymenoptera,few-shot-120,synthetic-10000")
    ap.add_argument("--clf", default="logreg,svm,knn,mlp")
    args = ap.parse_args()
    checkouts = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    for data in args.data.split(","):
        for clf in args.clf.split(","):
            for name, checkout in checkouts.items():
                r = {"data": data, "clf": clf, "featx": name, **run(checkout, data, clf, args.features)}
                rows.append(r)
                print(f"{data:<16} {clf:<7} {name:<9} {r['seconds']:>8.2f} s  held-out acc {r['held_out_accuracy']:.4f}"
                      f"  {r['chosen']}", flush=True)
    print(json.dumps({"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
