"""The leaderboard: several backbones, layers and heads on one dataset, ranked, with what each costs.

Each (backbone, layer) is extracted once (or read from the cache) and each head fitted with its usual
selection. Rows are ranked on val when the data has one (the heads chose their hyper-parameters by CV
on train, so val has chosen nothing but the winner: its figure is marked optimistic), else on the heads'
own CV accuracy on train. Test, when there is one, chose nothing and is the figure to trust.
"""
from __future__ import annotations

import html
import os
import shlex
import time
from pathlib import Path

from . import store
from .errors import FeatxError
from .extraction import extract, extract_taps
from .files import REPORT_BYTES, room
from .fit import fit_head, record_head
from .report_page import table, write_page
from .selection import wilson

HEADS = ("logreg", "svm", "knn", "mlp")


def score(result: dict) -> tuple:
    """(where, accuracy, 95% interval) the row is ranked on: val's bootstrap, else CV's Wilson interval."""
    if "val" in result:
        return "val", result["val"]["accuracy"], result["val"]["interval95"]["accuracy"]
    selected = result["selected"]
    if selected.get("cv_accuracy") is not None and selected.get("scored_rows"):
        return "cv", selected["cv_accuracy"], wilson(selected["cv_accuracy"], selected["scored_rows"])
    return None, None, None


def compare(data: str, backbones: list, layers: list | None = None, clfs: list | None = None, *,
            data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
            out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Extract what is not cached (each backbone's ``layers`` in one pass; ``auto`` names the family's), fit every
    head, and rank the rows best first (``report.html`` in ``out``)."""
    clfs, rows = clfs or ["logreg"], []
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
                where, accuracy, interval = score(result)
                rows.append({"backbone": backbone, "layer": extracted.layer, "clf": clf, "ranked_on": where,
                             "accuracy": accuracy, "interval95": interval,
                             "test_accuracy": result["test"]["accuracy"] if "test" in result else None,
                             "fit_seconds": round(time.perf_counter() - started, 2),
                             "extract_img_per_s": round(float(img_per_s), 2) if img_per_s else None,
                             "extract_seconds": round(extracted.images / float(img_per_s), 1) if img_per_s else None,
                             "feature_dim": extracted.feature_dim, "images": extracted.images,
                             "report_page": result["report_page"], "model": result["model"],
                             "dataset_root": attrs["dataset_root"],
                             "command": reproduce(backbone, data, extracted.layer, clf)})
    rows.sort(key=lambda r: (r["accuracy"] is not None, r["accuracy"] or 0), reverse=True)
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


COLUMNS = ["#", "backbone", "layer", "head", "score [95%]", "ranked on", "test", "fit s", "extract s", "img/s", "dim"]


def cells(rank: int, row: dict) -> list:
    """One leaderboard row as text, in ``COLUMNS`` order."""
    known = lambda value, form: "-" if value is None else format(value, form)  # noqa: E731
    return [str(rank), row["backbone"], row["layer"], row["clf"], interval_text(row), row["ranked_on"] or "-",
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
    note = ("<p>Ranked on val, which chose the winner: its figure is optimistic. Test chose nothing.</p>"
            if any(r["ranked_on"] == "val" for r in rows) else
            "<p>Ranked on each head's cross-validated accuracy on train, at the C or k it chose there: optimistic.</p>")
    return "<h2>Leaderboard</h2>" + note + table(COLUMNS, body, left=4)
