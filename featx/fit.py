"""Fitting, stage 2: cached features -> a head with leak-free selection -> model file and report."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import report, store, workspace
from .errors import FeatxError
from .extraction import extract
from .heads import make_head, proba_over
from .modelfile import MODEL_NAME, ModelFile


def fit_head(clf: str = "logreg", features: str | None = None, backbone: str | None = None,
             data: str | None = None, layer: str | None = None, *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", select_on: str = "cv", out: str | os.PathLike | None = None,
             device: str = "auto", weights: str | None = None, input_size: int | None = None,
             precision: str | None = None, C: float | None = None, k: int | None = None, progress: bool = True,
             class_weight: str | None = None, tta: str | None = None) -> dict:
    """Fit a head on cached features, select its hyper-parameter without leaking, score held-out splits,
    and write model.featx, metrics.json, confusion PNGs and top losses to ``out``.

    ``select_on="cv"`` selects by cross-validation on train (``selection.make_folds``) and scores val and
    test; ``"val"`` selects on val, refits on train + val and scores test only. ``C`` / ``k`` fix the value.
    ``class_weight="balanced"`` weighs rare classes up in the linear heads' and the MLP's loss.
    Without ``features``, what is left out (None) comes from the last extraction in ``cache_dir``
    (``workspace.fill``); the head is recorded there for ``finetune``."""
    if select_on not in ("cv", "val"):
        raise FeatxError(f"--select-on {select_on}: use cv or val")
    if C is not None and not (C > 0 and np.isfinite(C)) or k is not None and k < 1:
        raise FeatxError(f"--C must be a positive number and --k a positive integer (got C={C}, k={k})")
    if features is None:
        given = workspace.fill(cache_dir, "fit-head", backbone=backbone, data=data, layer=layer,
                               input_size=input_size, precision=precision, weights=weights, tta=tta)
        weights = given["weights"]
        r = extract(given["backbone"], given["data"], given["layer"], data_root=data_root, cache_dir=cache_dir,
                    device=device, weights=weights, input_size=given["input_size"],
                    precision=given["precision"] or "auto", tta=given["tta"] or "none", progress=progress)
        if r.new and progress:
            print(f"featx: extracted {r.new} new images into {r.path} first", file=sys.stderr)
        features = r.path
    F = store.load(features)
    if "train" not in F.split_names():
        raise FeatxError(f"{F.path} has no train split: fit-head trains on train/ (and selects on CV or val/)")
    X, y, _ = F.split("train")
    held_out = [s for s in ("val", "test") if s in F.split_names()]
    cv = 5
    if select_on == "val":
        if "val" not in held_out:
            raise FeatxError(f"--select-on val needs a val split, and {F.path} has none: use --select-on cv")
        from sklearn.model_selection import PredefinedSplit

        Xv, yv, _ = F.split("val")
        cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yv), int)])
        X, y = np.vstack([X, Xv]), np.r_[y, yv]  # select on val, then refit on train + val
        held_out.remove("val")
    start = time.perf_counter()
    head = make_head(clf, cv=cv, device=device, C=C, k=k, class_weight=class_weight).fit(X, y)
    fit_seconds = time.perf_counter() - start
    selected = {**head.selected_, "select_on": select_on, "fit_seconds": round(fit_seconds, 3),
                "class_weight": class_weight}
    selected["unscored_classes"] = [F.classes[int(head.classes_[c])] for c in selected.get("unscored_classes", [])]
    metrics = {}
    for split in held_out:
        Xs, ys, paths = F.split(split)
        metrics[split] = report.classification_metrics(ys, proba_over(head, Xs, len(F.classes)), F.classes, paths)
    out = Path(out or Path("runs") / f"{F.attrs['dataset']}__{F.attrs['backbone']}__{F.attrs['layer']}__{clf}")
    arrays, config = head.export()
    config["selected"] = selected
    model_path = ModelFile(kind="head", classes=F.classes, identity=F.identity(),
                           preprocess=json.loads(F.attrs["preprocess"]), head_config=config, head_arrays=arrays,
                           weights_file=weights, info={"dataset": F.attrs["dataset"], "features": str(F.path),
                                                       "select_on": select_on}).save(out / MODEL_NAME)
    result = {**metrics, "selected": selected, "clf": clf, "model": str(model_path), "features": str(F.path)}
    record_head(cache_dir, model_path, clf, F.attrs["backbone"], F.attrs["layer"], F.attrs["dataset_root"])
    result["report_page"] = str(report.write_report(
        out, result, F.classes, f"{clf} head on {F.attrs['backbone']}:{F.attrs['layer']} features of {F.attrs['dataset']}",
        {"data": F.attrs["dataset_root"], "backbone": F.attrs["backbone"], "layer": F.attrs["layer"],
         "tta": F.identity().tta, "head": clf, "features": str(F.path), "model": str(model_path)},
        image_root=Path(F.attrs["dataset_root"])))
    return result


def record_head(cache_dir, model: str | os.PathLike, clf: str, backbone: str, layer: str, data_root: str) -> None:
    """Remember this head as the project's last fit-head (``finetune`` starts from it when it fits)."""
    workspace.record(cache_dir, "fit_head", {"model": str(Path(model).resolve()), "clf": clf, "backbone": backbone,
                                             "layer": layer, "data": data_root})
