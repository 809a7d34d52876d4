"""Prediction: load a model file with the backbone that makes its features, and use it on images
(``predict``) or on a split of a dataset with the full report (``evaluate``).

On a CPU, a model whose backbone was already exported to ONNX (``cache/onnx``, by any extraction or
prediction with the same feature identity) predicts from that export with Pillow and numpy: no torch,
so ``featx predict`` answers in about 1.5 s on two cores (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx import data as data_mod
from featx import workspace
from featx.extraction.backbones import Preprocess, create_backbone
from featx.devices import device_name
from featx.errors import FeatxError, listed
from featx.files import REPORT_BYTES, room
from featx.extraction.images import ImageFiles
from featx.modelfile import ModelFile
from featx.extraction.runtimes import OnnxForward, onnx_path, resolve_runtime, verified

if TYPE_CHECKING:
    from featx.heads.base import Head
    from featx.extraction.network import Backbone


@dataclass
class Predictor:
    """A loaded model: the head, and the backbone that makes its features (built when first needed)."""

    head: Head
    model: ModelFile
    weights: str | None = None  # a --weights FILE the backbone's features must come from

    @cached_property
    def backbone(self) -> Backbone:
        """The torch backbone, checked to make the features the head was fitted on."""
        import torch

        identity, model = self.model.identity, self.model
        if model.kind == "finetuned":
            net = create_backbone(identity.backbone, identity.layer, pretrained=False)
            shapes = {k: v.shape for k, v in net.model.state_dict().items()}  # safetensors stores 0-d as 1-d
            net.model.load_state_dict({k: torch.as_tensor(v).reshape(shapes[k])
                                       for k, v in model.backbone_state.items()})
            net.weights_id, net.weights_sha256 = identity.weights, identity.weights_sha256
        else:
            net = create_backbone(identity.backbone, identity.layer, self.weights or model.weights_file)
        net.precision, net.tta = identity.precision, identity.tta
        net.preprocess = self.preprocess
        diff = identity.differences(net.identity())
        if diff:
            raise FeatxError(f"{model.path} was fitted on {identity.backbone} features whose {', '.join(diff)} "
                             f"differ from the backbone here: pass the same --weights FILE it was fitted with")
        return net

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.model.preprocess.items()})

    @property
    def classes(self) -> list:
        return self.model.classes

    @property
    def path(self) -> Path:
        return self.model.path

    def proba(self, files: list, device: str = "auto", batch_size: int | None = None, workers: int | None = 0,
              runtime: str = "auto", cache_dir: str | os.PathLike = "cache"):
        """(probabilities, failures) for image files; failures are (index, reason). With ``workers=0`` and the
        backbone exported, the export runs here without torch; otherwise DataLoader workers decode."""
        from featx.extraction.runner import iter_features
        from featx.heads.base import proba_over

        dev = device_name(device)
        rows, failures = [None] * len(files), []
        runtime = resolve_runtime(runtime, dev, self.model.identity.precision)
        export = onnx_path(cache_dir, self.model.identity) if runtime == "onnxruntime" else None
        if workers == 0 and export and self.weights is None and verified(export):
            batches = onnx_batches(export, files, self.preprocess, batch_size or 32)
        else:
            batches = iter_features(self.backbone, files, dev, batch_size, workers, progress=False, runtime=runtime,
                                    cache_dir=cache_dir)
        for indices, feats, failed in batches:
            failures += failed
            for i, row in zip(indices, feats):
                rows[i] = row
        ok = [i for i, r in enumerate(rows) if r is not None]
        proba = np.full((len(files), len(self.classes)), np.nan)
        if ok:
            proba[ok] = proba_over(self.head, np.stack([rows[i] for i in ok]), len(self.classes))
        return proba, failures

def load_predictor(path: str | os.PathLike, weights: str | None = None) -> Predictor:
    """The model file's head, with its backbone made on first use (``Predictor.backbone``); with a
    ``weights`` FILE, at once, so weights other than the model's are refused here."""
    model = ModelFile.load(path)  # a file that is no model is refused before the heads' imports
    from featx.heads.registry import load_head

    predictor = Predictor(load_head(model.head_arrays, model.head_config), model, weights)
    if weights:
        predictor.backbone  # built and checked now
    return predictor


def image_files(inputs: list) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():  # the files extract would list there; broken symlinks stay in, reported per file
            try:
                broken: list = []
                names = data_mod.files_below(item, "", broken, "", {os.path.realpath(item)})
                files += sorted(item / name for name in names + [path for path, _ in broken])
            except OSError as exc:  # a path too long for the system, a folder that cannot be listed
                where = f"{exc.filename}"[:120] + ("..." if len(f"{exc.filename}") > 120 else "")
                raise FeatxError(f"cannot list {item}: {exc.strerror or exc} at {where}: pass the image files, "
                                 "or shorten or move what is below the folder") from None
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
    files = image_files(images)  # both checked before scikit-learn or torch is imported
    if str(model).endswith(".onnx"):  # a whole classifier from featx export: ONNX Runtime, Pillow and numpy only
        classes, (proba, failures) = exported_proba(model, files)
    else:
        predictor = load_predictor(model, weights)
        classes = predictor.classes
        proba, failures = predictor.proba(files, device, runtime=runtime, cache_dir=cache_dir)
    failed = dict(failures)
    results = []
    for i, f in enumerate(files):
        if i in failed:
            results.append({"path": str(f), "error": failed[i]})
            continue
        order = np.argsort(-proba[i])[:top_k]
        results.append({"path": str(f), "label": classes[order[0]], "probability": float(proba[i, order[0]]),
                        "top_k": [{"label": classes[j], "probability": float(proba[i, j])} for j in order]})
    if plot:
        from featx.report import metrics as report

        ok = [r for r in results if "label" in r]
        report.plot_image_grid([r["path"] for r in ok], [f"{r['label']} ({r['probability']:.3f})" for r in ok],
                               Path(plot))
    return results


def recorded_provenance(model: str | os.PathLike) -> dict | str:
    """What a model file or ONNX export records of the rows it was trained and selected on, else ``UNKNOWN``;
    read from the file's metadata, without loading the model."""
    from featx.provenance import UNKNOWN

    if str(model).endswith(".onnx"):
        from .onnxfile import load_exported

        recorded = load_exported(model).get("provenance")
        recorded = json.loads(recorded) if recorded else None
    else:
        from featx.modelfile import stored_manifest

        recorded = stored_manifest(model).get("provenance")
    return recorded or UNKNOWN


def onnx_batches(export: Path, files: list, pre: Preprocess, batch_size: int, fixed: int | None = None):
    """(indices, outputs, failures) per batch of an ONNX export over image files, decoded by Pillow to the same
    pixels as the torch path (``Preprocess.pil_array``). A ``fixed``-batch export gets its last batch padded."""
    images, forward = ImageFiles(files, pre.pil_array, pre.resize_size), OnnxForward(export)
    batch_size = fixed or batch_size
    for start in range(0, len(files), batch_size):
        items = [images[i] for i in range(start, min(start + batch_size, len(files)))]
        ok = [(i, x) for i, x, _ in items if x is not None]
        outputs = np.zeros((0, 0), np.float32)
        if ok:
            pixels = np.stack([x for _, x in ok])
            if fixed:
                pixels = np.concatenate([pixels, np.zeros((fixed - len(ok), *pixels.shape[1:]), np.uint8)])
            outputs = forward.run(pixels)[:len(ok)]
        yield [i for i, _ in ok], outputs, [(i, reason) for i, x, reason in items if x is None]


def exported_proba(path: str | os.PathLike, files: list, batch_size: int = 32) -> tuple[list, tuple]:
    """(classes, (probabilities, failures)) of an exported model (``export.py``), its digest checked first."""
    from .onnxfile import load_exported

    meta = load_exported(path)
    pre = Preprocess(int(meta["input_size"]), int(meta["resize_size"]), meta["interpolation"])
    fixed = int(meta["batch"]) if meta.get("batch", "dynamic") != "dynamic" else None
    classes = json.loads(meta["classes"])
    proba, failures = np.full((len(files), len(classes)), np.nan), []
    for indices, outputs, failed in onnx_batches(Path(path), files, pre, batch_size, fixed):
        if indices:
            proba[indices] = outputs
        failures += failed
    return classes, (proba, failures)


def evaluate(model: str | os.PathLike, data: str | None = None, split: str = "test", *, data_root: str | None = None,
             cache_dir: str | os.PathLike = "cache", out: str | os.PathLike | None = None, device: str = "auto",
             weights: str | None = None, runtime: str = "auto", progress: bool = True) -> dict:
    """Metrics, confusion matrix and top losses of a model on one split of a dataset (features cached);
    ``data`` left out is the last extraction's in ``cache_dir``."""
    data = workspace.fill(cache_dir, "evaluate", data=data)["data"]
    predictor = load_predictor(model, weights)
    ds = data_mod.load(data, data_root)
    unknown = sorted(set(ds.classes) - set(predictor.classes))
    if unknown:  # checked before any extraction
        raise FeatxError(f"{data} has classes the model does not know ({listed(unknown, 5)}): "
                         f"evaluate on data with the model's classes {listed(predictor.classes, 10)}")
    if split not in ds.splits:  # said before the backbone is built
        raise FeatxError(f"dataset {data} has no '{split}' split (it has {', '.join(ds.split_names())}): pass "
                         "--split with one of those")
    from featx import provenance
    from featx.report import metrics as report
    from featx.extraction import store
    from featx.extraction.runner import extract
    from featx.heads.base import proba_over

    r = extract(predictor.backbone, data, data_root=data_root, cache_dir=cache_dir, device=device, runtime=runtime,
                progress=progress)
    F = store.load(r.path)
    if split not in F.split_names():
        raise FeatxError(f"no '{split}' image of {data} could be read (the skipped files and why: featx extract "
                         f"--data {data}): evaluate on another --split")
    X, y, paths = F.split(split)
    y_model = np.asarray([predictor.classes.index(F.classes[i]) for i in y])
    proba = proba_over(predictor.head, X, len(predictor.classes))
    prov = provenance.of_model(predictor.model)
    shared = provenance.overlap(prov, F.attrs["dataset_root"], [provenance.rows(split, paths)])
    trained, here = {predictor.classes[int(c)] for c in predictor.head.classes_}, {F.classes[i] for i in y}
    untrained = [c for c in predictor.classes if c not in trained and c in here]
    metrics = {split: report.classification_metrics(y_model, proba, predictor.classes, paths),
               **({"warnings": [f"the model never trained on {listed(untrained)}, so it never predicts "
                                f"{'that class' if len(untrained) == 1 else 'those classes'}: their {split} images "
                                "count as errors"]} if untrained else {}),
               "model": str(predictor.path), "features": str(F.path), "provenance": prov or provenance.UNKNOWN,
               "provenance_line": provenance.describe(prov) + (
                   f"; warning: it trained on or chose its settings on {split} images, so this figure is optimistic"
                   if shared else "")}
    out = Path(out or predictor.path.parent / f"evaluate_{F.attrs['dataset']}_{split}")
    with room(out, REPORT_BYTES):
        metrics["report_page"] = str(report.write_report(
            out, metrics, predictor.classes, f"{predictor.path} evaluated on {F.attrs['dataset']} {split}",
            {"data": F.attrs["dataset_root"], "split": split, "model": str(predictor.path),
             "backbone": predictor.model.identity.backbone, "features": str(F.path)},
            image_root=Path(F.attrs["dataset_root"])))
    return metrics
