"""logreg's C path at the selection tolerance (``LOGREG_SELECT_TOL``, 1e-3) against scikit-learn's default (1e-4):
the C each chooses and its accuracy on held-out rows (hymenoptera val/, cats_dogs and digits test/, the
synthetic sets' held-out rows), on lite0's four ``--layer auto`` taps and heads_speed.py's synthetic shapes.

    python benchmarks/logreg_tolerance.py [--cache-dir DIR]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from featx.extraction.runner import extract_taps
from featx.extraction import store
from featx.heads import logreg as L, make_head
exec(__import__("heads_speed").DATA)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ap = argparse.ArgumentParser()
ap.add_argument("--cache-dir", default="cache")
cache = ap.parse_args().cache_dir
rows = []
for name in ("hymenoptera", "cats_dogs", "digits"):
    data = "digits" if name == "digits" else str(SHARED / name)
    for r in extract_taps("efficientnet_lite0", data, "block5,block6,block7,pool", cache_dir=cache, progress=False):
        F = store.load(r.path)
        X, y, _ = F.split("train")
        Xt, yt, _ = F.split("val" if name == "hymenoptera" else "test")
        rows.append((f"{name}:{r.layer}", X, y, Xt, yt))
for shape in ("2x400", "3x1100", "10x2000", "17x1400"):
    c, n = map(int, shape.split("x"))
    rows.append((f"synthetic {shape}",) + features(c, n, 1280))
total = {1e-4: [], 1e-3: []}
for name, X, y, Xt, yt in rows:
    acc = {}
    for tol in (1e-4, 1e-3):
        L.LOGREG_SELECT_TOL = tol
        started = time.perf_counter()
        h = make_head("logreg").fit(X, y)
        acc[tol] = (h.selected_["C"], float((h.predict(Xt) == yt).mean()), len(yt), time.perf_counter() - started)
        total[tol].append(acc[tol][1] * len(yt))
    print(f"{name:<24} n={acc[1e-4][2]:>4}" + "".join(f"   {tol:g}: C {c:.1e} held-out {a:.4f} fit {s:.2f} s"
                                                     for tol, (c, a, _, s) in acc.items()), flush=True)
print("held-out rows right:", {f"{k:g}": int(sum(v)) for k, v in total.items()}, "of", sum(len(r[4]) for r in rows))
