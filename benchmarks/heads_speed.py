"""Stage 2 timings: the whole C sweep with 5-fold CV on real hymenoptera features, and every head
(selection included) on 10,000 x 2,048 synthetic features.

    python benchmarks/heads_speed.py --features cache/hymenoptera__efficientnet_lite0__pool__*.h5
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.datasets import make_classification

from common import machine
from featx import heads, store


def timed(clf: str, X, y) -> tuple[float, dict]:
    start = time.perf_counter()
    head = heads.make_head(clf, device="cpu").fit(X, y)
    return time.perf_counter() - start, head.selected_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", required=True, help="a featx cache of hymenoptera (lite0)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    rows = []
    F = store.load(args.features)
    X, y, _ = F.split("train")
    for clf in ("logreg", "svm"):
        seconds, selected = timed(clf, X, y)
        rows.append({"data": f"hymenoptera train {X.shape}", "clf": clf, "seconds": round(seconds, 2),
                     "selected": {k: selected[k] for k in ("C", "candidates")}})
    Xs, ys = make_classification(n_samples=args.n, n_features=args.dim, n_informative=64, n_classes=10,
                                 random_state=0)
    Xs = Xs.astype(np.float32)
    for clf in ("logreg", "svm", "knn", "mlp"):
        seconds, selected = timed(clf, Xs, ys)
        rows.append({"data": f"synthetic {Xs.shape}", "clf": clf, "seconds": round(seconds, 2),
                     "selected": {k: v for k, v in selected.items() if k in ("C", "k", "epochs", "candidates")}})
    for r in rows:
        print(f"{r['data']:<34} {r['clf']:<7} {r['seconds']:>7.2f} s   {r['selected']}")
    print(json.dumps({"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
