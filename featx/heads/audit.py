"""Audit: the mislabelled, duplicated and leaking images of a dataset, found from its cached features.

cleanlab's ``Datalab`` does the finding (label issues, near-duplicates, outliers, class imbalance) from each
image's features and its out-of-fold probabilities; featx supplies those. The probabilities come from the
head ``fit-head`` would fit, with its usual selection, fitted on each split alone: every image is scored by
K-fold models that never saw it (``folds``), and no split's images help score another's. Near-duplicates
across splits are leakage: the report gives the test accuracy with and without the leaking test images.
Nothing in the dataset is moved or deleted.
"""
from __future__ import annotations

import csv
import html
import json
import os
import warnings
from pathlib import Path

import numpy as np

from featx.extraction import store
from featx import workspace
from featx.errors import FeatxError
from featx.extraction.runner import extract_taps
from featx.files import REPORT_BYTES, room
from .base import proba_over
from .mlp import MLPHead
from .registry import make_head
from .selection import make_folds
from featx.report.page import image_grid, table, write_page

# cleanlab's near-duplicate threshold is a fraction of the median distance to the nearest neighbour: on cats_dogs
# (lite0 features) a test photo re-encoded and resized into train sits at 0.07-0.19 of it, different photos at 0.5
# and more; cleanlab's default, 0.13, missed half of such copies
def issue_types() -> dict:
    """What Datalab looks for, a fresh dict each call: ``find_issues`` writes the call's ``pred_probs`` and
    ``features`` into the one it is given, and a dict kept between calls hands the next call the last one's
    probabilities (in one process, the second audit's label check failed: "pred_probs and labels must have same
    length")."""
    return {"label": {}, "near_duplicate": {"threshold": 0.3}, "outlier": {}, "class_imbalance": {}}
SHOWN = 48  # images a grid of the report shows per finding


def out_of_fold(F: store.Features, clf: str) -> tuple[np.ndarray, dict]:
    """(probabilities of every row over every class, {split: head fitted on it}), each row's from K-fold models
    that never saw it (``folds``). A row nothing could hold out (the only image of its class in its split) gets
    its own label at probability 1: never called wrong."""
    proba = np.eye(len(F.classes))[F.y]
    heads = {}
    for split in F.split_names():
        rows = np.flatnonzero(F.splits == split)
        if len(np.unique(F.y[rows])) < 2:
            continue
        head = heads[split] = make_head(clf).fit(F.X[rows], F.y[rows])
        for scored, p in folds(head, F.X[rows], F.y[rows], len(F.classes)):
            proba[rows[scored]] = p
    return proba, heads


def folds(head, X: np.ndarray, y: np.ndarray, n_classes: int):
    """(rows, their probabilities over every class) from K-fold models that never saw them. The linear heads and
    kNN score every row in their C or k selection (``Head.held_out_``, stratified K-fold); the MLP's selection
    holds out 15% only, so it is refitted on each of the same folds, stopping early within the fold and for at
    most the epochs the whole split's MLP kept."""
    if head.kind != "mlp":
        if head.held_out_ is not None:
            scored, p = head.held_out_
            full = np.zeros((len(scored), n_classes))
            full[:, np.asarray(head.classes_, dtype=int)] = p
            yield scored, full
        return
    for train, test in make_folds(5, y).pairs:
        fold = MLPHead(max_epochs=head.selected_["epochs"], device=head.device).fit(X[train], y[train])
        yield test, proba_over(fold, X[test], n_classes)


def audit(data: str | None = None, backbone: str | None = None, layer: str | None = None, clf: str = "logreg", *,
          data_root: str | None = None, cache_dir: str | os.PathLike = "cache", out: str | os.PathLike | None = None,
          device: str = "auto", progress: bool = True) -> dict:
    """Audit a dataset's labelled images (extracting what is not cached) and write ``audit.json``,
    ``label_issues.csv``, ``duplicates.csv`` and ``report.html`` to ``out``. What is left out comes from the
    last extraction in ``cache_dir``; with several taps there, the last (the pooled features)."""
    given = workspace.fill(cache_dir, "audit", backbone=backbone, data=data, layer=layer)
    extracted = extract_taps(given["backbone"], given["data"], given.get("layer"), data_root=data_root,
                             cache_dir=cache_dir, device=device, progress=progress)[-1]
    F = store.load(extracted.path)
    counts = np.bincount(F.y, minlength=len(F.classes))
    if (counts > 0).sum() < 2:
        raise FeatxError(f"{F.attrs['dataset_root']} has one class with images: an audit compares classes, "
                         "so it needs two")
    if counts[counts > 0].max() < 2:
        raise FeatxError(f"{F.attrs['dataset_root']} has one image a class: out-of-fold probabilities need at "
                         "least two images in some class")
    proba, heads = out_of_fold(F, clf)
    lab = find_issues(F, proba)
    issues = lab.get_issues()
    label = lab.get_issues("label")
    root = Path(F.attrs["dataset_root"])
    label_issues = [{"path": F.paths[i], "split": F.splits[i], "given": F.classes[F.y[i]],
                     "suggested": F.classes[int(label["predicted_label"].iloc[i])],
                     "confidence": float(proba[i, int(label["predicted_label"].iloc[i])]),
                     "score": float(issues["label_score"].iloc[i])}
                    for i in np.argsort(issues["label_score"].to_numpy()) if issues["is_label_issue"].iloc[i]]
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    pairs = sorted({tuple(sorted((i, int(j)))) for i in range(len(F.paths)) for j in sets[i]})
    duplicates = [{"a": F.paths[i], "split_a": F.splits[i], "b": F.paths[j], "split_b": F.splits[j],
                   "leak": F.splits[i] != F.splits[j],
                   "score": float(min(issues["near_duplicate_score"].iloc[i], issues["near_duplicate_score"].iloc[j]))}
                  for i, j in pairs]
    outliers = [{"path": F.paths[i], "split": F.splits[i], "label": F.classes[F.y[i]],
                 "score": float(issues["outlier_score"].iloc[i])}
                for i in np.argsort(issues["outlier_score"].to_numpy()) if issues["is_outlier_issue"].iloc[i]]
    result = {"data": str(root), "features": str(F.path), "clf": clf, "images": len(F.paths),
              "label_issues": label_issues, "duplicates": duplicates, "outliers": outliers,
              "class_counts": dict(zip(F.classes, counts.tolist())),
              "class_imbalance": bool(issues["is_class_imbalance_issue"].any()),
              "leakage": leakage_cost(F, heads, duplicates)}
    out = Path(out or Path("runs") / f"{F.attrs['dataset']}__audit")
    with room(out, REPORT_BYTES):
        write_outputs(out, result, root)
    result["report_page"] = str(out / "report.html")
    return result


def find_issues(F: store.Features, proba: np.ndarray):
    """cleanlab's ``Datalab`` over the features and out-of-fold probabilities (its warnings, about pandas and
    small classes, silenced)."""
    from cleanlab import Datalab

    lab = Datalab(data={"label": F.y}, label_name="label", verbosity=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab.find_issues(features=F.X, pred_probs=proba, issue_types=issue_types())
    return lab


def leakage_cost(F: store.Features, heads: dict, duplicates: list) -> dict:
    """The test accuracy of the train head with and without the test images that are near-copies of training
    images (what the leak inflates)."""
    leaking = {d["a"] if d["split_a"] == "test" else d["b"] for d in duplicates
               if {d["split_a"], d["split_b"]} == {"train", "test"}}
    if "train" not in heads or "test" not in F.split_names():
        return {"leaking_test_images": sorted(leaking)}
    X, y, paths = F.split("test")
    right = proba_over(heads["train"], X, len(F.classes)).argmax(1) == y
    keep = np.array([p not in leaking for p in paths])
    return {"leaking_test_images": sorted(leaking), "test_accuracy": float(right.mean()),
            "test_accuracy_without_leaks": float(right[keep].mean()) if keep.any() else None,
            "test_images": len(paths)}


def write_outputs(out: Path, result: dict, root: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    for name, rows in (("label_issues", result["label_issues"]), ("duplicates", result["duplicates"])):
        with open(out / f"{name}.csv", "w", newline="", errors="surrogateescape") as f:  # names byte for byte
            fields = ["path", "split", "given", "suggested", "confidence", "score"] if name == "label_issues" else \
                ["a", "split_a", "b", "split_b", "leak", "score"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    write_page(out, {}, f"featx audit of {root}", {"data": str(root), "features": result["features"],
                                                   "head": result["clf"], "images": result["images"]},
               extra=findings_html(result, root))


def findings_html(result: dict, root: Path) -> str:
    leak = result["leakage"]
    cost = (f"<p>Test accuracy {leak['test_accuracy']:.4f} on all {leak['test_images']} test images, "
            f"{leak['test_accuracy_without_leaks']:.4f} without the {len(leak['leaking_test_images'])} that are "
            "near-copies of training images.</p>") if leak.get("test_accuracy_without_leaks") is not None else ""
    labels = image_grid([(r["path"], f"{html.escape(r['split'])}: <b>{html.escape(r['given'])}</b> → "
                          f"{html.escape(r['suggested'])} ({r['confidence']:.2f})<br>score {r['score']:.3f}")
                         for r in result["label_issues"][:SHOWN]], root)
    copies = "".join(f"<h3>{'Leak: ' if d['leak'] else ''}{html.escape(d['split_a'])} ~ {html.escape(d['split_b'])}"
                     f" (score {d['score']:.3f})</h3>" + image_grid([(d["a"], html.escape(d["split_a"])),
                                                                     (d["b"], html.escape(d["split_b"]))], root)
                     for d in sorted(result["duplicates"], key=lambda d: (not d["leak"], d["score"]))[:SHOWN // 2])
    outliers = image_grid([(r["path"], f"{html.escape(r['split'])}: {html.escape(r['label'])}<br>score "
                            f"{r['score']:.3f}") for r in result["outliers"][:SHOWN]], root)
    counts = table(["class", "images"], [[html.escape(c), str(n)] for c, n in result["class_counts"].items()])
    return (f"<h2>Likely label errors: {len(result['label_issues'])}</h2>"
            "<p>Given label → the label the out-of-fold head suggests (its probability).</p>" + labels
            + f"<h2>Near-duplicates: {len(result['duplicates'])} pairs, "
            f"{sum(d['leak'] for d in result['duplicates'])} across splits (leakage)</h2>{cost}{copies}"
            + f"<h2>Outliers: {len(result['outliers'])}</h2>{outliers}"
            + f"<h2>Classes{' (imbalanced)' if result['class_imbalance'] else ''}</h2>{counts}")
