"""``featx auto`` against the best row found by hand (issue 39's target: within 1 point of it).

Runs auto on DATA, then, outside auto, fits every candidate auto considered on the rows auto's refit uses (the
training part and the comparison rows) and scores each on test once: every backbone x tap with logreg (also a
backbone whose extraction auto skipped), svm, kNN and the MLP where auto tried them (every tap with --all-heads),
and with --finetunes its two fine-tunes (the same fixed schedule, the epoch chosen on the same path-hash holdout).
The ensemble is left out: a model file cannot ship it. Prints one JSON object: auto's winner and test figure, every
hand row's test figure, the best hand row and the gap in points.

    python benchmarks/auto_vs_hand.py --data DATA [--data-root ROOT] [--budget 3m] [--cache-dir CACHE] [--out OUT]
        [--finetunes] [--all-heads]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

import featx
from featx import autosearch
from featx import data as data_mod


def hand_heads(data, data_root, cache_dir, rows, plan: list) -> list:
    """Each (backbone, tap, head) of ``plan`` fitted on the training part + the comparison rows, scored on test."""
    from featx.extraction import store
    from featx.extraction.runner import extract_taps
    from featx.heads.base import proba_over
    from featx.heads.registry import make_head

    scored, features = [], {}
    for backbone, layer, clf in plan:
        if backbone not in features:
            features[backbone] = {r.layer: r.path for r in extract_taps(
                backbone, data, "auto", data_root=data_root, cache_dir=cache_dir, progress=False)}
        F = store.load(features[backbone][layer])
        where = {p: i for i, p in enumerate(F.paths.tolist())}
        fit = np.array([where[p] for p in rows.train + rows.compare])
        test = np.array([where[p] for p in rows.test])
        started = time.perf_counter()
        head = make_head(clf, cv=5, device="cpu").fit(F.X[fit], F.y[fit])
        right = proba_over(head, F.X[test], len(F.classes)).argmax(1) == F.y[test]
        scored.append({"name": f"{backbone}:{layer} + {clf}", "test": float(right.mean()), "n": int(len(test)),
                       "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(scored[-1]), flush=True)
    return scored


def hand_finetunes(data, data_root, cache_dir, rows, ds, tunes: list, work: Path) -> list:
    """Each (backbone, unfreeze) fine-tuned as auto's refit does it, on a symlinked copy of the rows, test scored."""
    from featx.finetuning.training import finetune

    paths = rows.train + rows.compare
    held = set(autosearch.hash_share(paths, rows.labels, autosearch.INNER_FRACTION, seed=3))
    splits = {"train": [p for p in paths if p not in held], "val": sorted(held), "test": rows.test}
    scored = []
    for backbone, unfreeze in tunes:
        folder = work / f"{backbone}_{unfreeze.replace(':', '')}"
        autosearch.link_dataset(folder.with_name(folder.name + "_data"), ds.root, splits, rows.labels, rows.classes)
        started = time.perf_counter()
        m = finetune(backbone, str(folder.with_name(folder.name + "_data")), unfreeze,
                     epochs=autosearch.FINETUNE_EPOCHS, head="none", out=folder, cache_dir=cache_dir, progress=False)
        scored.append({"name": f"{backbone} fine-tuned {unfreeze}", "test": m["test"]["accuracy"],
                       "n": m["test"]["n"], "epoch": m["best_epoch"], "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(scored[-1]), flush=True)
    return scored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--out", default=None)
    ap.add_argument("--finetunes", action="store_true", help="fine-tune by hand too (minutes each on a CPU)")
    ap.add_argument("--all-heads", action="store_true", help="svm, kNN and MLP on every tap, not only auto's")
    args = ap.parse_args()

    started = time.perf_counter()
    r = featx.auto(args.data, args.budget, out=args.out, data_root=args.data_root, cache_dir=args.cache_dir,
                   progress=False)
    auto_wall = time.perf_counter() - started
    ds = data_mod.load(args.data, args.data_root)
    rows = autosearch.comparison_rows(ds)
    assert len(rows.test) == r["test"]["n"], "auto's test rows are not these"
    from featx.extraction.backbones import resolve_backbone

    board = r["leaderboard"]
    backbones = list(dict.fromkeys(x["backbone"] for x in board if x.get("backbone")))
    taps = {b: resolve_backbone(b, "auto")[1] for b in backbones}
    plan = [(b, t, "logreg") for b in backbones for t in taps[b]]
    extra = [(x["backbone"], x["layer"], x["clf"]) for x in board if x["family"] == "head" and x["clf"] != "logreg"]
    if args.all_heads:
        extra = [(b, t, c) for b in backbones for t in taps[b] for c in autosearch.MORE_HEADS]
    plan += [p for p in extra if p not in plan]
    started = time.perf_counter()
    hand = hand_heads(args.data, args.data_root, args.cache_dir, rows, plan)
    if args.finetunes:
        tunes = [(x["backbone"], x["unfreeze"]) for x in board if x["family"] == "finetune"]
        work = Path(r["model"]).parent / "by_hand"
        hand += hand_finetunes(args.data, args.data_root, args.cache_dir, rows, ds, tunes, work)
        shutil.rmtree(work, ignore_errors=True)
    best = max(hand, key=lambda h: h["test"])
    considered = {x["name"] for x in board} | {f"{b}:{t} + logreg" for b, t, _ in plan}  # a skipped extraction's taps
    best_considered = max((h for h in hand if h["name"] in considered), key=lambda h: h["test"])
    same = next((h for h in hand if h["name"] == r["winner"]["name"]), None)
    print(json.dumps({
        "data": args.data, "budget": args.budget, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "auto_seconds": round(auto_wall, 1), "hand_seconds": round(time.perf_counter() - started, 1),
        "compare_rows": r["compare_rows"], "winner": r["winner"]["name"], "why": r["winner"]["why"],
        "scenario": r["scenario"]["finding"],
        "auto_test": r["test"]["accuracy"], "winner_by_hand": same and same["test"],
        "best_hand": best, "gap_points": round(100 * (best["test"] - r["test"]["accuracy"]), 2),
        "best_hand_of_auto_candidates": best_considered,
        "gap_points_auto_candidates": round(100 * (best_considered["test"] - r["test"]["accuracy"]), 2),
        "hand_rows": len(hand), "within_1_point": best["test"] - r["test"]["accuracy"] <= 0.01 + 1e-9,
        "skipped_by_auto": [s["name"] for s in r["skipped"]], "seconds_by_family": r["seconds_by_family"],
        "hand": sorted(hand, key=lambda h: -h["test"])}, indent=1))


if __name__ == "__main__":
    main()
