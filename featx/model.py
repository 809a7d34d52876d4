"""featx model files, and the stages that write and use them: fit-head, predict, evaluate.

A model file is a safetensors file (tensors only: loading it cannot execute code) whose metadata holds
a JSON manifest (classes, the backbone identity its features came from, the head's kind and selected
hyper-parameters) and a SHA-256 digest over manifest and tensors. Loading refuses files without a
matching digest. Heads fitted on cached features and fine-tuned networks share the format: a fine-tuned
model also carries the backbone's tensors, under ``backbone.``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from . import data as data_mod
from . import report, store
from .backbones import Backbone, Preprocess, create_backbone
from .errors import FeatxError
from .extract import extract, iter_features, resolve_device
from .heads import Head, load_head, make_head

FORMAT = "featx-model-1"
MODEL_NAME = "model.featx"


def digest(manifest_json: str, tensors: dict) -> str:
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype.str}|{t.shape}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def save_model(path: str | os.PathLike, tensors: dict, manifest: dict) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    manifest = {**manifest, "format": FORMAT, "featx_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(manifest, sort_keys=True, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "manifest": text, "sha256": digest(text, tensors)})
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, manifest) of a file featx wrote; anything else is refused with one line."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"model file {path} does not exist: pass the model.featx that fit-head or finetune wrote")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        raise FeatxError(f"{path} is not a featx model file: pass the model.featx that fit-head or finetune "
                         "wrote") from None
    if meta.get("format") != FORMAT or "manifest" not in meta:
        raise FeatxError(f"{path} was not written by featx ({FORMAT}): refit it with featx fit-head")
    if digest(meta["manifest"], tensors) != meta.get("sha256"):
        raise FeatxError(f"{path} fails its SHA-256 check (changed after featx wrote it): refit or restore it")
    return tensors, json.loads(meta["manifest"])


def proba_over(head: Head, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every dataset class, also when training lacked some of them."""
    p = head.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(head.classes_, dtype=int)] = p
    return full


def backbone_manifest(identity: dict, preprocess: dict, weights_file: str | None) -> dict:
    return {"identity": identity, "preprocess": preprocess, "weights_file": weights_file}


def fit_head(clf: str = "logreg", features: str | None = None, backbone: str = "efficientnet_lite0",
             data: str | None = None, layer: str | None = None, *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", select_on: str = "cv", out: str | os.PathLike | None = None,
             device: str = "auto", weights: str | None = None, input_size: int | None = None,
             progress: bool = True) -> dict:
    """Fit a head on cached features, select its hyper-parameter without leaking, score held-out splits,
    and write model.featx, metrics.json, confusion PNGs and top losses to ``out``."""
    if select_on not in ("cv", "val"):
        raise FeatxError(f"--select-on {select_on}: use cv or val")
    if features is None:
        if data is None:
            raise FeatxError("fit-head needs --features FILE, or --backbone and --data to extract them")
        r = extract(backbone, data, layer, data_root=data_root, cache_dir=cache_dir, device=device,
                    weights=weights, input_size=input_size, progress=progress)
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
    head = make_head(clf, cv=cv, device=device).fit(X, y)
    fit_seconds = time.perf_counter() - start
    metrics = {}
    for split in held_out:
        Xs, ys, paths = F.split(split)
        metrics[split] = report.classification_metrics(ys, proba_over(head, Xs, len(F.classes)), F.classes, paths)
    out = Path(out or Path("runs") / f"{F.attrs['dataset']}__{F.attrs['backbone']}__{F.attrs['layer']}__{clf}")
    arrays, config = head.export()
    model_path = save_model(out / MODEL_NAME, {f"head.{k}": v for k, v in arrays.items()}, {
        "kind": "head", "head": config, "classes": F.classes, "dataset": F.attrs["dataset"],
        "features": str(F.path), "select_on": select_on,
        **backbone_manifest(F.identity(), json.loads(F.attrs["preprocess"]), weights)})
    result = {**metrics, "selected": {**head.selected_, "select_on": select_on, "fit_seconds": round(fit_seconds, 3)},
              "clf": clf, "model": str(model_path), "features": str(F.path)}
    report.write_report(out, result, F.classes)
    return result


@dataclass
class Predictor:
    """A loaded model: the backbone that makes its features, and the head on top."""

    backbone: Backbone
    head: Head
    classes: list
    manifest: dict
    path: Path

    def proba(self, files: list, device: str = "auto", batch_size: int | None = None, workers: int | None = 0):
        """(probabilities, failures) for image files; failures are (index, reason)."""
        dev = resolve_device(device)
        rows, failures = [None] * len(files), []
        for indices, feats, failed in iter_features(self.backbone, files, dev, batch_size, workers, progress=False):
            failures += failed
            for i, row in zip(indices, feats):
                rows[i] = row
        ok = [i for i, r in enumerate(rows) if r is not None]
        proba = np.full((len(files), len(self.classes)), np.nan)
        if ok:
            proba[ok] = proba_over(self.head, np.stack([rows[i] for i in ok]), len(self.classes))
        return proba, failures


def load_predictor(path: str | os.PathLike, weights: str | None = None) -> Predictor:
    tensors, manifest = load_model(path)
    identity, pre = manifest["identity"], Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in manifest["preprocess"].items()})
    head_arrays = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    head = load_head(head_arrays, manifest["head"])
    if manifest["kind"] == "finetuned":
        net = create_backbone(identity["backbone"], identity["layer"], pretrained=False)
        shapes = {k: v.shape for k, v in net.model.state_dict().items()}  # safetensors stores 0-d as 1-d
        state = {k[len("backbone."):]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith("backbone.")}
        net.model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})
        net.weights_id, net.weights_sha256 = identity["weights"], identity["weights_sha256"]
    else:
        net = create_backbone(identity["backbone"], identity["layer"], weights or manifest.get("weights_file"))
    net.preprocess = pre
    if net.identity() != identity:
        diff = [k for k in identity if net.identity().get(k) != identity[k]]
        raise FeatxError(f"{path} was fitted on {identity['backbone']} features whose {', '.join(diff)} differ from "
                         f"the backbone here: pass the same --weights FILE it was fitted with")
    return Predictor(net, head, manifest["classes"], manifest, Path(path))


def image_files(inputs: list) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item.is_file():
            files.append(item)
        else:
            raise FeatxError(f"{item} does not exist: pass image files or folders")
    if not files:
        raise FeatxError("no images given: pass image files or folders")
    return files


def predict(model: str | os.PathLike, images: list, top_k: int = 1, device: str = "auto",
            weights: str | None = None, plot: str | None = None) -> list[dict]:
    """Label and probability (and the top k) for each image; unreadable files get an ``error``."""
    predictor = load_predictor(model, weights)
    files = image_files(images)
    proba, failures = predictor.proba(files, device)
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


def evaluate(model: str | os.PathLike, data: str, split: str = "test", *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", out: str | os.PathLike | None = None, device: str = "auto",
             weights: str | None = None, progress: bool = True) -> dict:
    """Metrics, confusion matrix and top losses of a model on one split of a dataset (features cached)."""
    predictor = load_predictor(model, weights)
    unknown = sorted(set(data_mod.load(data, data_root).classes) - set(predictor.classes))
    if unknown:  # checked before any extraction
        raise FeatxError(f"{data} has classes the model does not know ({', '.join(unknown[:5])}): "
                         f"evaluate on data with the model's classes {', '.join(predictor.classes[:10])}")
    r = extract(predictor.backbone, data, data_root=data_root, cache_dir=cache_dir, device=device, progress=progress)
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
    report.write_report(out, metrics, predictor.classes)
    return metrics
