"""Fitting, stage 2: cached features (of one tap, or several to choose from) -> a head with leak-free selection
-> model file and report."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featx import provenance
from featx.report import metrics as report
from featx.extraction import store
from featx import workspace
from featx.data import match_exclude
from featx.errors import FeatxError, listed
from featx.files import REPORT_BYTES, room
from featx.extraction.runner import extract_taps
from .base import proba_over
from .registry import make_head
from featx.modelfile import MODEL_NAME, ModelFile
from .selection import choose_tap


def fit_head(clf: str = "logreg", features=None, backbone: str | None = None,
             data: str | None = None, layer=None, *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", select_on: str = "cv", out: str | os.PathLike | None = None,
             device: str = "auto", weights: str | None = None, input_size: int | None = None,
             precision: str | None = None, C: float | None = None, k: int | None = None, progress: bool = True,
             class_weight: str | None = None, tta: str | None = None, exclude=()) -> dict:
    """Fit a head on cached features, select its hyper-parameter without leaking, score held-out splits,
    and write model.featx, metrics.json, confusion SVGs and top losses to ``out``.

    ``select_on="cv"`` selects by cross-validation on train (``selection.make_folds``) and scores val and
    test; ``"val"`` selects on val, refits on train + val and scores test only. ``C`` / ``k`` fix the value.
    ``class_weight="balanced"`` weighs rare classes up in the linear heads' and the MLP's loss.
    ``layer`` is a tap, several (a comma-separated list or a sequence) or ``auto`` (``specs.auto_layers``);
    ``features`` a cache file or several. With several, the tap is chosen like a hyper-parameter: a head is
    fitted on each with its usual selection, the best held-out score wins (``selection.choose_tap``), and only
    the winner is scored on the held-out splits. ``exclude`` lists files (relative to the dataset folder, as ``featx
    audit --write-exclude`` writes them, or absolute) left out of training only: val and test are scored in full,
    and "without the excluded images" is a second figure (``without_excluded``) beside each split's.
    ``provenance`` (also in the model file) names the rows that trained the head and chose its settings.
    Without ``features``, what is left out (None) comes from the last extraction in ``cache_dir``
    (``workspace.fill``; all its taps when it had several); the head is recorded there for ``finetune``."""
    if select_on not in ("cv", "val"):
        raise FeatxError(f"--select-on {select_on}: use cv or val")
    if C is not None and not (C > 0 and np.isfinite(C)) or k is not None and k < 1:
        raise FeatxError(f"--C must be a positive number and --k a positive integer (got C={C}, k={k})")
    if features is None:
        given = workspace.fill(cache_dir, "fit-head", backbone=backbone, data=data, layer=layer,
                               input_size=input_size, precision=precision, weights=weights, tta=tta)
        weights = given["weights"]
        extracted = extract_taps(given["backbone"], given["data"], given["layer"], data_root=data_root,
                                 cache_dir=cache_dir, device=device, weights=weights, input_size=given["input_size"],
                                 precision=given["precision"] or "auto", tta=given["tta"] or "none", progress=progress)
        if any(r.new for r in extracted) and progress:
            print(f"featx: extracted {max(r.new for r in extracted)} new images into "
                  f"{', '.join(r.path for r in extracted)} first", file=sys.stderr)
        features = [r.path for r in extracted]
    files = [features] if isinstance(features, (str, os.PathLike)) else list(features)
    candidates = [store.load(f) for f in files]
    named = match_exclude(list(exclude), candidates[0].paths, candidates[0].attrs["dataset_root"])
    training = set(candidates[0].paths[candidates[0].splits == "train"].tolist())
    excluded = [p for p in named if p in training]  # val and test are never filtered by a model's doubts
    scored_despite = sorted(set(named) - training)
    candidates = [without(c, excluded) for c in candidates]
    F = candidates[0]
    if "train" not in F.split_names():
        raise FeatxError(f"{F.path} has no train split: fit-head trains on train/ (and selects on CV or val/)")
    for other in candidates[1:]:
        if not np.array_equal(other.paths, F.paths) or not np.array_equal(other.splits, F.splits):
            raise FeatxError(f"{other.path} and {F.path} hold different images: run 'featx extract' with both "
                             "layers again to bring them up to date together")
    head, F, selected, held_out = select(clf, candidates, select_on, device, C, k, class_weight, progress)
    selected |= {**({"excluded": excluded} if excluded else {}),
                 **({"excluded_but_scored": scored_despite} if scored_despite else {})}
    metrics = score(head, F, held_out, scored_despite)
    split_rows = lambda split: provenance.rows(split, F.paths[F.splits == split])  # noqa: E731
    prov = provenance.record(F.attrs["dataset_root"], [split_rows(s) for s in ("train", "val")[:1 + (select_on == "val")]],
                             [split_rows("train" if select_on == "cv" else "val")], [provenance.rows("train", excluded)],
                             [split_rows(s) for s in held_out],
                             chose="C, k or epochs" + (" and the tap" if len(candidates) > 1 else ""))
    out = Path(out or Path("runs") / default_run_name(F.attrs, clf, excluded))
    arrays, config = head.export()
    config["selected"] = selected
    with room(out, sum(np.asarray(a).nbytes for a in arrays.values()) + REPORT_BYTES):
        return write_outputs(out, F, clf, arrays, config, metrics, selected, select_on, weights, cache_dir, prov)


def default_run_name(attrs, clf: str, excluded: list) -> str:
    """``runs/<data>__<backbone>__<tap>__<clf>``; a head trained without some images gets a folder of its own
    (``__exclude-<n>-<digest>``), so it never overwrites the run it is compared with."""
    name = f"{attrs['dataset']}__{attrs['backbone']}__{attrs['layer']}__{clf}"
    if not excluded:
        return name
    return f"{name}__exclude-{len(excluded)}-{provenance.paths_digest(excluded)[:8]}"


def select(clf: str, candidates: list, select_on: str, device: str, C, k, class_weight, progress: bool):
    """The selection step: a head fitted on each tap's training rows (cross-validated, or selected on val and
    refitted on train + val), the tap chosen by ``choose_tap``. Returns (head, its features, ``selected``, the
    held-out splits left to score)."""
    F = candidates[0]
    held_out = [s for s in ("val", "test") if s in F.split_names()]
    cv, rows = 5, F.splits == "train"
    if select_on == "val":
        if "val" not in held_out:
            raise FeatxError(f"--select-on val needs a val split, and {F.path} has none: use --select-on cv")
        from sklearn.model_selection import PredefinedSplit

        rows = np.r_[np.flatnonzero(F.splits == "train"), np.flatnonzero(F.splits == "val")]
        cv = PredefinedSplit(np.r_[np.full((F.splits == "train").sum(), -1), np.zeros((F.splits == "val").sum(), int)])
        held_out.remove("val")  # select on val, then refit on train + val
    y = F.y[rows]
    start = time.perf_counter()
    heads = []
    for candidate in candidates:
        if progress and len(candidates) > 1:
            print(f"featx: fitting {clf} on {candidate.attrs['layer']} ({candidate.X.shape[1]}-d)", file=sys.stderr)
        heads.append(make_head(clf, cv=cv, device=device, C=C, k=k, class_weight=class_weight).fit(candidate.X[rows], y))
    chosen, taps = 0, {}
    if len(candidates) > 1:
        chosen, taps = choose_tap([c.attrs["layer"] for c in candidates], heads)
    F, head = candidates[chosen], heads[chosen]
    fit_seconds = time.perf_counter() - start
    selected = {**head.selected_, "select_on": select_on, "fit_seconds": round(fit_seconds, 3),
                "class_weight": class_weight, **taps}
    selected["unscored_classes"] = [F.classes[int(head.classes_[c])] for c in selected.get("unscored_classes", [])]
    untrained = [c for i, c in enumerate(F.classes) if i not in set(head.classes_.tolist())]
    if untrained:
        selected["warnings"] = selected.get("warnings", []) + [
            f"{len(untrained)} {'class has' if len(untrained) == 1 else 'classes have'} no training images "
            f"({listed(untrained)}): the head never predicts "
            f"{'it' if len(untrained) == 1 else 'them'}, so {'its' if len(untrained) == 1 else 'their'} held-out "
            "images count as errors"]
    return head, F, selected, held_out


def score(head, F, held_out: list, scored_despite: list) -> dict:
    """The report step's figures: each held-out split scored in full, and without the ``--exclude`` images."""
    metrics = {}
    for split in held_out:
        Xs, ys, paths = F.split(split)
        proba = proba_over(head, Xs, len(F.classes))
        metrics[split] = report.classification_metrics(ys, proba, F.classes, paths)
        named_here = np.isin(paths, scored_despite)
        if named_here.any():
            kept = ~named_here
            metrics[split]["without_excluded"] = {
                "accuracy": float((proba[kept].argmax(1) == ys[kept]).mean()) if kept.any() else None,
                "n": int(kept.sum()), "excluded": int(named_here.sum()),
                "note": "a second figure, without the images --exclude names: they were picked by a model that saw "
                        "their labels, so this one is optimistic; the split's own figure is on every image"}
    return metrics


def write_outputs(out: Path, F, clf: str, arrays: dict, config: dict, metrics: dict, selected: dict,
                  select_on: str, weights: str | None, cache_dir, prov: dict) -> dict:
    """The model file, the workspace record and the report of a fitted head."""
    model_path = ModelFile(kind="head", classes=F.classes, identity=F.identity(),
                           preprocess=json.loads(F.attrs["preprocess"]), head_config=config, head_arrays=arrays,
                           weights_file=weights, info={"dataset": F.attrs["dataset"], "features": str(F.path),
                                                       "select_on": select_on, "provenance": prov}).save(out / MODEL_NAME)
    result = {**metrics, "selected": selected, "clf": clf, "model": str(model_path), "features": str(F.path),
              "provenance": prov}
    record_head(cache_dir, model_path, clf, F.attrs["backbone"], F.attrs["layer"], F.attrs["dataset_root"])
    result["report_page"] = str(report.write_report(
        out, result, F.classes, f"{clf} head on {F.attrs['backbone']}:{F.attrs['layer']} features of {F.attrs['dataset']}",
        {"data": F.attrs["dataset_root"], "backbone": F.attrs["backbone"], "layer": F.attrs["layer"],
         "tta": F.identity().tta, "head": clf, "features": str(F.path), "model": str(model_path)},
        image_root=Path(F.attrs["dataset_root"])))
    return result


def without(F: store.Features, excluded: list) -> store.Features:
    """The cache's rows but those of ``excluded`` paths (``--exclude``'s training rows)."""
    if not excluded:
        return F
    keep = ~np.isin(F.paths, excluded)
    return replace(F, X=F.X[keep], y=F.y[keep], paths=F.paths[keep], splits=F.splits[keep])


def record_head(cache_dir, model: str | os.PathLike, clf: str, backbone: str, layer: str, data_root: str) -> None:
    """Remember this head as the project's last fit-head (``finetune`` starts from it when it fits)."""
    workspace.record(cache_dir, "fit_head", {"model": str(Path(model).resolve()), "clf": clf, "backbone": backbone,
                                             "layer": layer, "data": data_root})
