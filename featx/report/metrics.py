"""Reports: metrics, confusion matrices, top losses and plots: the same report for every head and fine-tuned net."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .page import HEADLINE, confusion_svg, curves_svg, split_label, write_page

TOP_LOSSES = 16
ECE_BINS = 15
BOOTSTRAP = 1000  # resamples for the 95% intervals, seeded
CONFUSED_PAIRS = 10


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list, paths=None) -> dict:
    """Accuracy, balanced accuracy, macro F1, log-loss, ECE, per-class P/R/F1, confusion matrix and the
    worst mistakes. Balanced accuracy and macro F1 average over the classes present in this split; a
    predicted class absent from it is listed under ``predicted_absent`` rather than warned about."""
    y_true = np.asarray(y_true)
    pred = proba.argmax(1)
    labels = np.arange(len(classes))
    present = np.unique(y_true)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    p_true = proba[np.arange(len(y_true)), y_true]
    loss = -np.log(np.clip(p_true, 1e-12, 1.0))
    wrong = np.flatnonzero(pred != y_true)
    worst = wrong[np.argsort(-loss[wrong])][:TOP_LOSSES]
    matrix = confusion_matrix(y_true, pred, labels=labels)
    return {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "log_loss": float(loss.mean()),
        "ece": expected_calibration_error(proba, y_true),
        "interval95": bootstrap_intervals(y_true, pred, loss, proba.max(1), len(classes)),
        "reliability": reliability(proba.max(1), pred == y_true),
        "classes_present": int(len(present)),
        "predicted_absent": [classes[c] for c in sorted(set(pred) - set(present))],
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),
        "confused_pairs": confused_pairs(matrix, classes),
        "top_losses": [{"path": str(paths[i]) if paths is not None else int(i), "true": classes[y_true[i]],
                        "predicted": classes[pred[i]], "p_true": float(p_true[i]), "loss": float(loss[i])}
                       for i in worst],
    }


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple:
    """Per equal-width confidence bin: (images, summed confidence, summed hits)."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return (np.bincount(which, minlength=bins), np.bincount(which, confidence, minlength=bins),
            np.bincount(which, correct.astype(float), minlength=bins))


def ece_of(confidence: np.ndarray, correct: np.ndarray) -> float:
    _, confidences, hits = calibration_bins(confidence, correct)
    return float(np.abs(hits - confidences).sum() / len(confidence))


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    return ece_of(proba.max(1), proba.argmax(1) == y_true)


def reliability(confidence: np.ndarray, correct: np.ndarray) -> list:
    """The reliability diagram's bins: images, mean confidence and accuracy of each non-empty bin."""
    counts, confidences, hits = calibration_bins(confidence, correct)
    return [{"low": b / ECE_BINS, "high": (b + 1) / ECE_BINS, "n": int(counts[b]),
             "confidence": float(confidences[b] / counts[b]), "accuracy": float(hits[b] / counts[b])}
            for b in range(ECE_BINS) if counts[b]]


def bootstrap_intervals(y_true: np.ndarray, pred: np.ndarray, loss: np.ndarray, confidence: np.ndarray,
                        n_classes: int, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """95% percentile intervals of the headline metrics over ``resamples`` seeded resamples of the split's
    images (with replacement): how far the figure could move on another draw of this many images. The
    resamples are counted a block at a time as one array (per-class tallies by offset bincount)."""
    rng = np.random.default_rng(seed)
    correct, n = pred == y_true, len(y_true)
    which_bin = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    draws = {k: np.empty(resamples) for k in HEADLINE}
    block = max(1, min(resamples, 50_000 // max(n, 1)))  # a block of index draws stays in cache
    for first in range(0, resamples, block):
        rows = range(first, min(first + block, resamples))
        i = np.stack([rng.integers(0, n, n) for _ in rows])  # one draw per resample, in the seeded order
        offset = np.arange(len(rows))[:, None]

        def tally(codes, size, weights=None):
            """Per resample (row), the count (or summed ``weights``) of each code in 0..size-1."""
            return np.bincount((offset * size + codes).ravel(), None if weights is None else weights.ravel(),
                               minlength=len(rows) * size).reshape(len(rows), size)

        hit = correct[i]
        support, hits = tally(y_true[i], n_classes), tally(y_true[i], n_classes, hit.astype(float))
        predicted = tally(pred[i], n_classes)
        present = support > 0
        recall = hits / np.maximum(support, 1)
        precision = hits / np.maximum(predicted, 1)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        bins = which_bin[i]
        gap = np.abs(tally(bins, ECE_BINS, hit.astype(float)) - tally(bins, ECE_BINS, confidence[i])).sum(1)
        draws["accuracy"][rows], draws["log_loss"][rows] = hit.mean(1), loss[i].mean(1)
        draws["balanced_accuracy"][rows] = (recall * present).sum(1) / present.sum(1)
        draws["macro_f1"][rows] = (f1 * present).sum(1) / present.sum(1)
        draws["ece"][rows] = gap / n
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def confused_pairs(matrix: np.ndarray, classes: list) -> list:
    """The most frequent mistakes: (true, predicted, images), most first."""
    off = np.asarray(matrix).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:CONFUSED_PAIRS]
    return [{"true": classes[t], "predicted": classes[p], "count": int(off[t, p])}
            for t, p in zip(*np.unravel_index(order, off.shape)) if off[t, p] > 0]


def plot_image_grid(files: list, titles: list, path: Path, columns: int = 4) -> Path:
    """Images titled with label and probability, as in the S1/S2 tutorials."""
    plt = pyplot()
    from featx.extraction.images import open_rgb

    rows = max(1, -(-len(files) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f, t in zip(axes.flat, files, titles):
        img = open_rgb(f, draft_size=256)
        img.thumbnail((256, 256))
        ax.imshow(img)
        ax.set_title(t, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: Path, metrics: dict, classes: list, title: str, setup: dict,
                 image_root: Path | None = None, extra: str = "") -> Path:
    """metrics.json, a confusion-matrix SVG and a top-losses CSV per evaluated split, the training curves' SVGs
    when ``metrics`` has a history, and the page that shows them all (``page.py``); returns the page's path.
    ``image_root`` is the folder the top losses' paths are relative to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for split in ("train", "val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        svg = confusion_svg(m["confusion_matrix"], classes, f"{split}: accuracy {m['accuracy']:.3f}")
        (out_dir / f"confusion_{split}.svg").write_text(svg, encoding="utf-8", errors="backslashreplace")
        with open(out_dir / f"top_losses_{split}.csv", "w", newline="", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "true", "predicted", "p_true", "loss"])
            writer.writeheader()
            writer.writerows(m["top_losses"])
    for metric in ("loss", "accuracy"):
        if svg := curves_svg(metrics.get("history") or [], metric):
            (out_dir / f"curves_{metric}.svg").write_text(svg, encoding="utf-8")
    return write_page(out_dir, metrics, title, setup, image_root, extra)


def absent_classes(m: dict) -> str:
    """How many classes a split has no image of (its balanced accuracy averages over the rest), or ''."""
    absent = len(m["per_class"]) - m["classes_present"]
    if not absent:
        return ""
    return f"; {absent} of {len(m['per_class'])} classes {'has' if absent == 1 else 'have'} no image here"


def summary_line(metrics: dict) -> str:
    parts = [f"{split_label(s, metrics)} acc {m['accuracy']:.4f} bal {m['balanced_accuracy']:.4f} "
             f"log-loss {m['log_loss']:.4f} ECE {m['ece']:.4f} (n={m['n']}{absent_classes(m)})"
             for s, m in ((s, metrics[s]) for s in ("val", "test") if s in metrics)]
    return "; ".join(parts) or "no held-out split to score"
