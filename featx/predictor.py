"""Prediction: load a model file with the backbone that makes its features, and use it on images
(``predict``) or on a split of a dataset with the full report (``evaluate``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import report, store, workspace
from .backbones import Preprocess, create_backbone
from .network import Backbone
from .devices import resolve_device
from .errors import FeatxError
from .extraction import extract, iter_features
from .heads import Head, proba_over
from .modelfile import ModelFile
from .runtimes import resolve_runtime


@dataclass
class Predictor:
    """A loaded model: the backbone that makes its features, and the head on top."""

    backbone: Backbone
    head: Head
    model: ModelFile

    @property
    def classes(self) -> list:
        return self.model.classes

    @property
    def path(self) -> Path:
        return self.model.path

    def proba(self, files: list, device: str = "auto", batch_size: int | None = None, workers: int | None = 0,
              runtime: str = "auto", cache_dir: str | os.PathLike = "cache"):
        """(probabilities, failures) for image files; failures are (index, reason)."""
        dev = resolve_device(device)
        rows, failures = [None] * len(files), []
        runtime = resolve_runtime(runtime, str(dev), self.backbone.precision)
        for indices, feats, failed in iter_features(self.backbone, files, dev, batch_size, workers, progress=False,
                                                    runtime=runtime, cache_dir=cache_dir):
            failures += failed
            for i, row in zip(indices, feats):
                rows[i] = row
        ok = [i for i, r in enumerate(rows) if r is not None]
        proba = np.full((len(files), len(self.classes)), np.nan)
        if ok:
            proba[ok] = proba_over(self.head, np.stack([rows[i] for i in ok]), len(self.classes))
        return proba, failures


def load_predictor(path: str | os.PathLike, weights: str | None = None) -> Predictor:
    model = ModelFile.load(path)
    identity = model.identity
    if model.kind == "finetuned":
        net = create_backbone(identity.backbone, identity.layer, pretrained=False)
        shapes = {k: v.shape for k, v in net.model.state_dict().items()}  # safetensors stores 0-d as 1-d
        net.model.load_state_dict({k: torch.as_tensor(v).reshape(shapes[k]) for k, v in model.backbone_state.items()})
        net.weights_id, net.weights_sha256 = identity.weights, identity.weights_sha256
    else:
        net = create_backbone(identity.backbone, identity.layer, weights or model.weights_file)
    net.precision, net.tta = identity.precision, identity.tta
    net.preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.preprocess.items()})
    diff = identity.differences(net.identity())
    if diff:
        raise FeatxError(f"{path} was fitted on {identity.backbone} features whose {', '.join(diff)} differ from "
                         f"the backbone here: pass the same --weights FILE it was fitted with")
    return Predictor(net, model.head(), model)


def image_files(inputs: list) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():  # broken symlinks stay in, so they are reported per file rather than dropped
            files += sorted(p for p in item.rglob("*") if (p.is_file() or p.is_symlink() and not p.exists())
                            and not p.name.startswith("."))
        elif item.is_file() or item.is_symlink():
            files.append(item)
        else:
            raise FeatxError(f"{item} does not exist: pass image files or folders")
    if not files:
        raise FeatxError("no images given: pass image files or folders")
    return files


def predict(model: str | os.PathLike, images: list, top_k: int = 1, device: str = "auto",
            weights: str | None = None, plot: str | None = None, runtime: str = "auto",
            cache_dir: str | os.PathLike = "cache") -> list[dict]:
    """Label and probability (and the top k) for each image; unreadable files get an ``error``."""
    predictor = load_predictor(model, weights)
    files = image_files(images)
    proba, failures = predictor.proba(files, device, runtime=runtime, cache_dir=cache_dir)
    failed = dict(failures)
    results = []
    for i, f in enumerate(files):
        if i in failed:
            results.append({"path": str(f), "error": failed[i]})
            continue
        order = np.argsort(-proba[i])[:top_k]
        results.append({"path": str(f), "label": predictor.classes[order[0]], "probability": float(proba[i, order[0]]),
                        "top_k": [{"label": predictor.classes[j], "probability": float(proba[i, j])} for j in order]})
    if plot:
        ok = [r for r in results if "label" in r]
        report.plot_image_grid([r["path"] for r in ok], [f"{r['label']} ({r['probability']:.3f})" for r in ok],
                               Path(plot))
    return results


def evaluate(model: str | os.PathLike, data: str | None = None, split: str = "test", *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", out: str | os.PathLike | None = None, device: str = "auto",
             weights: str | None = None, runtime: str = "auto", progress: bool = True) -> dict:
    """Metrics, confusion matrix and top losses of a model on one split of a dataset (features cached);
    ``data`` left out is the last extraction's in ``cache_dir``."""
    data = workspace.fill(cache_dir, "evaluate", data=data)["data"]
    predictor = load_predictor(model, weights)
    unknown = sorted(set(data_mod.load(data, data_root).classes) - set(predictor.classes))
    if unknown:  # checked before any extraction
        raise FeatxError(f"{data} has classes the model does not know ({', '.join(unknown[:5])}): "
                         f"evaluate on data with the model's classes {', '.join(predictor.classes[:10])}")
    r = extract(predictor.backbone, data, data_root=data_root, cache_dir=cache_dir, device=device, runtime=runtime,
                progress=progress)
    F = store.load(r.path)
    if split not in F.split_names():
        raise FeatxError(f"dataset {data} has no '{split}' split (it has {', '.join(F.split_names())}): "
                         f"pass --split with one of those")
    X, y, paths = F.split(split)
    y_model = np.asarray([predictor.classes.index(F.classes[i]) for i in y])
    proba = proba_over(predictor.head, X, len(predictor.classes))
    metrics = {split: report.classification_metrics(y_model, proba, predictor.classes, paths),
               "model": str(predictor.path), "features": str(F.path)}
    out = Path(out or predictor.path.parent / f"evaluate_{F.attrs['dataset']}_{split}")
    metrics["report_page"] = str(report.write_report(
        out, metrics, predictor.classes, f"{predictor.path} evaluated on {F.attrs['dataset']} {split}",
        {"data": F.attrs["dataset_root"], "split": split, "model": str(predictor.path),
         "backbone": predictor.model.identity.backbone, "features": str(F.path)},
        image_root=Path(F.attrs["dataset_root"])))
    return metrics
