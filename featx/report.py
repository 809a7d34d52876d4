"""Reports: metrics, confusion matrices, top losses and plots: the same report for every head and fine-tuned net."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

TOP_LOSSES = 16
ECE_BINS = 15


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
    return {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "log_loss": float(loss.mean()),
        "ece": expected_calibration_error(proba, y_true),
        "classes_present": int(len(present)),
        "predicted_absent": [classes[c] for c in sorted(set(pred) - set(present))],
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
        "top_losses": [{"path": str(paths[i]) if paths is not None else int(i), "true": classes[y_true[i]],
                        "predicted": classes[pred[i]], "p_true": float(p_true[i]), "loss": float(loss[i])}
                       for i in worst],
    }


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    confidence = proba.max(1)
    correct = proba.argmax(1) == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def plot_confusion(matrix, classes: list, path: Path, title: str) -> Path:
    plt = pyplot()
    matrix = np.asarray(matrix)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 6 else 0)
    ax.set_yticks(ticks, classes)
    if len(classes) <= 30:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_image_grid(files: list, titles: list, path: Path, columns: int = 4) -> Path:
    """Images titled with label and probability, as in the S1/S2 tutorials."""
    plt = pyplot()
    from .images import open_rgb

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


def plot_curves(history: list, path_prefix: Path) -> list:
    """Loss and accuracy per epoch, train against val (fine-tuning)."""
    plt = pyplot()
    written = []
    epochs = [h["epoch"] for h in history]
    for metric in ("loss", "accuracy"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for split in ("train", "val"):
            values = [h.get(f"{split}_{metric}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        out = Path(f"{path_prefix}_{metric}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def write_report(out_dir: Path, metrics: dict, classes: list) -> None:
    """metrics.json, a confusion-matrix PNG and a top-losses CSV per evaluated split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for split in ("train", "val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        plot_confusion(m["confusion_matrix"], classes, out_dir / f"confusion_{split}.png",
                       f"{split}: accuracy {m['accuracy']:.3f}")
        with open(out_dir / f"top_losses_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "true", "predicted", "p_true", "loss"])
            writer.writeheader()
            writer.writerows(m["top_losses"])


def split_label(split: str, metrics: dict) -> str:
    """The split's name, marked when it chose something (an epoch): its figure is then optimistic."""
    return f"{split} (chose the epoch, optimistic)" if metrics.get("selected_on") == split else split


def summary_line(metrics: dict) -> str:
    parts = [f"{split_label(s, metrics)} acc {m['accuracy']:.4f} bal {m['balanced_accuracy']:.4f} "
             f"log-loss {m['log_loss']:.4f} ECE {m['ece']:.4f} (n={m['n']})"
             for s, m in ((s, metrics[s]) for s in ("val", "test") if s in metrics)]
    return "; ".join(parts) or "no held-out split to score"
