"""Stage 2 timings: every head with its whole selection (5-fold CV over the C path or the k grid, early
stopping for the MLP) on the shapes of real small datasets (classes x images: 2x400, 3x1100, 10x2000, 17x1400,
120x1000, all 1,280-d like lite0's pooled features), each side by side in one run with scikit-learn's own
estimator doing the same selection: ``GridSearchCV`` over the same grid with ``n_jobs`` = cores
(``StandardScaler`` + ``LogisticRegression`` / ``LinearSVC``; ``Normalizer`` + brute-force
``KNeighborsClassifier``), and ``MLPClassifier`` with its own early stopping for the MLP. Every fit runs in a
fresh process, timed from its data to its fitted model, once on an idle machine and once beside a second
process that keeps one core busy. ``--baseline`` times another featx checkout as well.

    python benchmarks/heads_speed.py [--repeat 3] [--baseline /path/to/older/featx]
    python benchmarks/heads_speed.py --threshold   # one fit on one thread against all: threads.SMALL_FIT
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]
SHAPES = "2x400,3x1100,10x2000,17x1400,120x1000"
DIM = 1280

DATA = r'''
import numpy as np

def features(classes, n, dim, seed=0):
    """(X, y, X_test, y_test): non-negative sparse class centres plus noise, clipped at 0 (like pooled ReLU
    features), n rows to fit on and a fifth as many to score, every class as evenly filled as n allows."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(0, 1, (classes, dim))) * (rng.random((classes, dim)) < 0.1)
    y, y_test = rng.permutation(np.arange(n) % classes), np.arange(max(n // 5, classes)) % classes
    X, X_test = (np.maximum(centres[c] + rng.normal(0, 3.0, (len(c), dim)), 0).astype(np.float32) for c in (y, y_test))
    return X, y, X_test, y_test
'''

CHILD = DATA + r'''
import json, os, sys, time
impl, clf, classes, n, dim = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
X, y, Xt, yt = features(classes, n, dim)
imports = time.perf_counter()
if impl == "featx":  # what its fits import, timed apart, as scikit-learn's imports are (torch for the mlp, and for
    from featx import heads  # the svm of checkouts before its solver moved to scipy)
    import importlib.util, re  # noqa: E401
    solver = open(importlib.util.find_spec("featx.heads.solvers").origin).read()
    if clf == "mlp" or (clf == "svm" and re.search(r"^\s+import torch$", solver, re.M)):
        import torch, torch.optim  # noqa: E401
    model = heads.make_head(clf, device="cpu")
else:
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from featx.heads.knn import DEFAULT_KS
    from featx.heads.linear import DEFAULT_CS
    from featx.heads.logreg import LOGREG_MAX_ITER
    from featx.devices import usable_cores
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    if clf == "logreg":
        from sklearn.linear_model import LogisticRegression
        model = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=LOGREG_MAX_ITER)),
                             {"logisticregression__C": DEFAULT_CS}, cv=folds, n_jobs=usable_cores())
    elif clf == "svm":
        from sklearn.svm import LinearSVC
        model = GridSearchCV(make_pipeline(StandardScaler(), LinearSVC()), {"linearsvc__C": DEFAULT_CS}, cv=folds,
                             n_jobs=usable_cores())
    elif clf == "knn":
        from sklearn.neighbors import KNeighborsClassifier
        model = GridSearchCV(make_pipeline(Normalizer(), KNeighborsClassifier(algorithm="brute")),
                             {"kneighborsclassifier__n_neighbors": list(DEFAULT_KS)}, cv=folds, n_jobs=usable_cores())
    else:
        from sklearn.neural_network import MLPClassifier
        model = make_pipeline(StandardScaler(), MLPClassifier(
            (512,), alpha=1e-2, batch_size=64, learning_rate_init=1e-3, max_iter=200, early_stopping=True,
            validation_fraction=0.15, n_iter_no_change=15, random_state=0))
start = time.perf_counter()
model.fit(X, y)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 2), "imports": round(start - imports, 2),
                  "accuracy": round(float(model.score(Xt, yt)), 4)}))
'''

THRESHOLD = DATA + r'''
import json, sys, time
import numpy as np
clf, classes, n, dim = sys.argv[1], *map(int, sys.argv[2:5])
X, y, _, _ = features(classes, n, dim)
from featx import heads
from featx.heads import solvers
Xs = (X - X.mean(0)) / np.maximum(X.std(0), 1e-6)
start = time.perf_counter()
if clf == "logreg":  # one fit at C = 1, as a fold of the C path
    heads.LogRegHead().pipeline(C=1.0).fit(X, y)
elif clf == "svm":
    solvers.SquaredHinge(Xs, solvers.ovr_signs(y, classes)).solve(1e-3, gap=solvers.SVM_SELECT_GAP)
elif clf == "knn":
    from sklearn.neighbors import KNeighborsClassifier
    KNeighborsClassifier(31, algorithm="brute").fit(X, y).kneighbors(X, return_distance=False)
else:  # 20 epochs without held-out rows
    head = heads.MLPHead(device="cpu")
    head.classes_ = np.unique(y)
    head._train(X, y, np.arange(n), np.array([], int), 20)
print(json.dumps({"seconds": round(time.perf_counter() - start, 3)}))
'''


def child(script: str, args: list, checkout: Path = REPO, threads: int | None = None, timeout: float = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # a session of its own, so that a fit stopped at the timeout takes its joblib (loky) workers with it: left
    # behind, a dozen of them kept about a tenth of a core busy through the later runs
    # run in the checkout: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH, so run
    # from another checkout it imported that one's featx (the baseline rows of earlier runs timed this checkout)
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=checkout)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"seconds": None, "timeout": timeout}
    if process.returncode:
        raise RuntimeError(err[-2000:])
    return json.loads(out.strip().splitlines()[-1])


class Busy:
    """A second process keeping one core busy beside the timed one (a plain Python loop)."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def seconds(r: dict) -> str:
    return f">{r['timeout']:.0f}" if r["seconds"] is None else f"{r['seconds']:.2f}"


def timings(args) -> None:
    impls = {"featx": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    for condition in args.conditions.split(","):
        for shape in args.shapes.split(","):
            classes, n = map(int, shape.split("x"))
            for clf in args.clf.split(","):
                row = {"condition": condition, "shape": shape, "clf": clf}
                for name, checkout in impls.items():
                    runs = []
                    for _ in range(args.repeat):
                        with Busy() if condition == "busy" else _Idle():
                            runs.append(child(CHILD, ["featx", clf, classes, n, DIM], checkout))
                    times = [r["seconds"] for r in runs]
                    row[name] = statistics.median(times) if None not in times else None
                    row[f"{name}_runs"], row[f"{name}_accuracy"] = times, runs[-1]["accuracy"]
                    row[f"{name}_imports"] = runs[-1]["imports"]
                with Busy() if condition == "busy" else _Idle():
                    ref = child(CHILD, ["sklearn", clf, classes, n, DIM], timeout=args.timeout)
                row["sklearn"], row["sklearn_accuracy"] = ref["seconds"], ref.get("accuracy")
                rows.append(row)
                line = (f"{condition:<5} {shape:>9} {clf:<7} featx {row['featx']:>7.2f} s (acc {row['featx_accuracy']:.3f}, "
                        f"imports {row['featx_imports']:.2f} s)")
                if args.baseline:
                    line += f"  baseline {row['baseline']:>7.2f} s"
                line += f"  scikit-learn {seconds(ref):>7} s"
                print(line + (f" (acc {ref['accuracy']:.3f})" if ref.get("accuracy") is not None else ""), flush=True)
    print(json.dumps({"machine": machine(), "rows": rows}))


class _Idle:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def threshold(args) -> None:
    """One fit of each head on one thread and on every core, over sizes either side of ``SMALL_FIT``."""
    sizes = [(2, 400), (10, 2000), (120, 1000), (10, 8000), (120, 4000)]
    rows = []
    for clf in args.clf.split(","):
        for classes, n in sizes:
            one = child(THRESHOLD, [clf, classes, n, DIM], threads=1)["seconds"]
            every = child(THRESHOLD, [clf, classes, n, DIM], threads=os.cpu_count())["seconds"]
            width = 512 if clf == "mlp" else classes
            rows.append({"clf": clf, "rows": n, "classes": classes, "size": n * DIM * width, "one": one, "all": every})
            print(f"{clf:<7} {classes:>4} x {n:<5} size {n * DIM * width:9.2e}  one thread {one:7.3f} s  "
                  f"{os.cpu_count()} threads {every:7.3f} s  ratio {every / one:5.2f}", flush=True)
    print(json.dumps({"machine": machine(), "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="classes x images, comma-separated")
    ap.add_argument("--clf", default="logreg,svm,knn,mlp")
    ap.add_argument("--conditions", default="idle,busy")
    ap.add_argument("--repeat", type=int, default=1, help="featx fits per row (the median is reported)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds after which scikit-learn's fit is stopped")
    ap.add_argument("--baseline", type=Path, default=None, help="another featx checkout to time beside this one")
    ap.add_argument("--threshold", action="store_true", help="time one fit on one thread against every core")
    args = ap.parse_args()
    threshold(args) if args.threshold else timings(args)


if __name__ == "__main__":
    main()
