"""The leaderboard: several backbones, layers and heads on one dataset, ranked, with what each costs.

Each (backbone, layer) is extracted once (or read from the cache) and each head fitted with its usual
selection. Every row is ranked on the same images measured the same way (``held_out_right``): val when the data
has one (the heads chose their hyper-parameters by CV on train, so val has chosen nothing but the winner: its
figure is marked optimistic), else 5-fold out-of-fold predictions on train, the same folds for every head (the
MLP refitted on them). Each row carries its paired interval against the winner on those rows. Test, when there
is one, chose nothing and is the figure to trust.
"""
from __future__ import annotations

import html
import os
import shlex
import time
from pathlib import Path

import numpy as np

from featx.extraction import store
from featx.errors import FeatxError
from featx.extraction.runner import extract, extract_taps
from featx.files import REPORT_BYTES, room
from .fit import fit_head, record_head
from featx.report.page import table, write_page
from .base import proba_over
from .registry import load_head, make_head
from featx.modelfile import ModelFile
from .selection import paired_comparison, wilson

HEADS = ("logreg", "svm", "knn", "mlp")


def held_out_right(result: dict, clf: str) -> tuple[str, dict]:
    """(where, {path: predicted right}) for one fitted row: its val images when the data has val, else
    train's 5-fold out-of-fold predictions (``audit.folds``: the folds depend on the labels only, so every head
    and tap is scored on the same rows)."""
    from .audit import folds

    F = store.load(result["features"])
    if "val" in F.split_names():
        X, y, paths = F.split("val")
        model = ModelFile.load(result["model"])
        head = load_head(model.head_arrays, model.head_config)
        return "val", dict(zip(paths.tolist(), (proba_over(head, X, len(F.classes)).argmax(1) == y).tolist()))
    X, y, paths = F.split("train")
    right = {}
    for scored, p in folds(make_head(clf).fit(X, y), X, y, len(F.classes)):
        right |= dict(zip(paths[scored].tolist(), (p.argmax(1) == y[scored]).tolist()))
    return "cv", right


def rank_rows(rows: list, right: list) -> None:
    """Score every row on the images all rows were scored on, sort best first, and give each its accuracy's
    Wilson interval and its paired margin against the best (``selection.paired_comparison``: McNemar's exact test)."""
    common = sorted(set.intersection(*(set(r) for r in right))) if right else []
    correct = [np.array([hits[p] for p in common], bool) for hits in right]
    for row, hits in zip(rows, correct):
        row["accuracy"] = float(hits.mean()) if common else None
        row["interval95"] = wilson(row["accuracy"], len(common)) if common else None
        row["scored_images"] = len(common)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["accuracy"] is not None, rows[i]["accuracy"] or 0),
                   reverse=True)
    for i in order if common else []:
        paired = paired_comparison(correct[order[0]], correct[i])
        rows[i]["against_best"] = {"margin": paired["margin"], "interval95": paired["interval95"],
                                   "told_apart": bool(paired["interval95"][1] < 0)}
    rows[:] = [rows[i] for i in order]


def compare(data: str, backbones: list, layers: list | None = None, clfs: list | None = None, *,
            data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
            out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Extract what is not cached (each backbone's ``layers`` in one pass; ``auto`` names the family's), fit every
    head, and rank the rows best first (``report.html`` in ``out``)."""
    clfs, rows, right = clfs or ["logreg"], [], []
    unknown = [c for c in clfs if c not in HEADS]
    if unknown or not backbones:
        raise FeatxError(f"--clf {','.join(unknown)}: use {', '.join(HEADS)}" if unknown else
                         "--backbones names none: give one or more, e.g. efficientnet_lite0,efficientnet_lite2")
    for backbone in backbones:  # each backbone's layers in one pass
        for extracted in extract_taps(backbone, data, layers, data_root=data_root, cache_dir=cache_dir,
                                      device=device, progress=progress):
            attrs = store.load(extracted.path).attrs
            img_per_s = attrs.get("img_per_s")
            out_dir = Path(out or Path("runs") / f"{extracted.dataset}__compare")
            for clf in clfs:
                started = time.perf_counter()
                result = fit_head(clf, extracted.path, cache_dir=cache_dir, device=device, progress=progress,
                                  out=out_dir / f"{backbone}__{extracted.layer}__{clf}".replace(":", "-"))
                seconds = round(time.perf_counter() - started, 2)
                where, hits = held_out_right(result, clf)
                right.append(hits)
                rows.append({"backbone": backbone, "layer": extracted.layer, "clf": clf, "ranked_on": where,
                             "test_accuracy": result["test"]["accuracy"] if "test" in result else None,
                             "fit_seconds": seconds,
                             "extract_img_per_s": round(float(img_per_s), 2) if img_per_s else None,
                             "extract_seconds": round(extracted.images / float(img_per_s), 1) if img_per_s else None,
                             "feature_dim": extracted.feature_dim, "images": extracted.images,
                             "report_page": result["report_page"], "model": result["model"],
                             "dataset_root": attrs["dataset_root"],
                             "command": reproduce(backbone, data, extracted.layer, clf)})
    rank_rows(rows, right)
    result = {"data": data, "rows": rows, "best": rows[0] if rows and rows[0]["accuracy"] is not None else None}
    if result["best"]:
        remember(result["best"], data, data_root, cache_dir, device)
    with room(out_dir, REPORT_BYTES):
        result["report_page"] = str(write_page(out_dir, {}, f"featx compare on {data}", {"data": data},
                                               extra=leaderboard_html(rows, out_dir)))
    return result


def remember(best: dict, data: str, data_root: str | None, cache_dir, device: str) -> None:
    """Leave the project folder as if the winner's two commands had run last, so a later ``fit-head`` or
    ``finetune`` without options picks up the winner, not whichever row was fitted last."""
    extract(best["backbone"], data, best["layer"], data_root=data_root, cache_dir=cache_dir, device=device,
            progress=False)  # cached: records the extraction only
    record_head(cache_dir, best["model"], best["clf"], best["backbone"], best["layer"], best["dataset_root"])


def reproduce(backbone: str, data: str, layer: str, clf: str) -> str:
    return (f"featx extract {shlex.join(['--backbone', backbone, '--data', str(data), '--layer', layer])} && "
            f"featx fit-head --clf {clf}")


def interval_text(row: dict) -> str:
    if row["accuracy"] is None:
        return "-"
    low, high = row["interval95"]
    return f"{row['accuracy']:.4f} [{low:.3f}, {high:.3f}]"


COLUMNS = ["#", "backbone", "layer", "head", "score [95%]", "vs best, paired [95%]", "ranked on", "test", "fit s",
           "extract s", "img/s", "dim"]


def cells(rank: int, row: dict) -> list:
    """One leaderboard row as text, in ``COLUMNS`` order."""
    known = lambda value, form: "-" if value is None else format(value, form)  # noqa: E731
    paired = row.get("against_best")
    versus = "-" if paired is None else \
        f"{paired['margin']:+.4f} [{paired['interval95'][0]:+.3f}, {paired['interval95'][1]:+.3f}]"
    return [str(rank), row["backbone"], row["layer"], row["clf"], interval_text(row), versus, row["ranked_on"] or "-",
            known(row["test_accuracy"], ".4f"), f"{row['fit_seconds']:.1f}", known(row["extract_seconds"], ".1f"),
            known(row["extract_img_per_s"], ".1f"), str(row["feature_dim"])]


def leaderboard_table(rows: list) -> str:
    """The leaderboard as plain text, for the terminal."""
    lines = [cells(i + 1, r) for i, r in enumerate(rows)]
    widths = [max(len(x) for x in column) for column in zip(COLUMNS, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [COLUMNS, *lines])


def leaderboard_html(rows: list, out_dir: Path) -> str:
    """The leaderboard for the page, each head linked to its own report."""
    body = []
    for i, r in enumerate(rows):
        row = [html.escape(c) for c in cells(i + 1, r)]
        row[3] = f'<a href="{html.escape(Path(r["report_page"]).relative_to(out_dir).as_posix())}">{row[3]}</a>'
        body.append(row)
    note = ("<p>Ranked on val, the same images for every row, which chose the winner: its figure is optimistic. "
            "Test chose nothing.</p>"
            if any(r["ranked_on"] == "val" for r in rows) else
            "<p>Ranked on 5-fold out-of-fold predictions on train, the same folds and images for every row; the "
            "linear heads and kNN chose C or k on them: optimistic.</p>")
    return "<h2>Leaderboard</h2>" + note + table(COLUMNS, body, left=4)
