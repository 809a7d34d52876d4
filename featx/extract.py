"""Stage 1: run images through a frozen backbone and keep the features in the HDF5 cache.

Images are decoded in DataLoader workers straight to uint8 tensors (JPEG draft mode, no float
copies on the CPU); normalisation, bf16 autocast and channels_last happen on the device.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from . import data as data_mod
from .backbones import Backbone, create_backbone
from .errors import FeatxError
from .store import FeatureStore, Rows, cache_path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatxError(f"--device {device} was asked for but torch sees no CUDA GPU: use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise FeatxError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


def default_workers(device: torch.device) -> int:
    """On a GPU decoding is the bottleneck, so use every core; on a CPU one worker overlaps decoding
    with the model, which needs the cores itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 16) if device.type == "cuda" else 1


class ImageFiles(torch.utils.data.Dataset):
    """Decodes files to uint8 tensors; a file that fails becomes a skip with its reason, never a crash."""

    def __init__(self, files: list, transform, draft_size: int):
        self.files, self.transform, self.draft_size = files, transform, draft_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(data_mod.open_rgb(self.files[i], self.draft_size)), ""
        except Exception as exc:  # corrupt, truncated, empty or not an image: reported, not fatal
            return i, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def collate(batch):
    ok = [b for b in batch if b[1] is not None]
    images = torch.stack([b[1] for b in ok]) if ok else None
    return [b[0] for b in ok], images, [(b[0], b[2]) for b in batch if b[1] is None]


def prepare(net: Backbone, device: torch.device) -> Backbone:
    """channels_last suits both cuDNN and oneDNN convolutions (1.7x for lite0 on a 2-core CPU)."""
    return net.to(device).eval().to(memory_format=torch.channels_last)


def forward(net: Backbone, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x).float()
    return net(x)


def default_batch_size(device: torch.device) -> int:
    """32 keeps a CPU's caches warm (measured faster than 64 for lite0); GPUs want big batches."""
    return 128 if device.type == "cuda" else 32


def iter_features(net: Backbone, files: list, device: torch.device, batch_size: int | None = None,
                  workers: int | None = None, progress: bool = True, desc: str = "extract"):
    """Yield (indices, features, failures) per batch; ``failures`` is [(index, reason)]."""
    workers = default_workers(device) if workers is None else workers
    batch_size = batch_size or default_batch_size(device)
    loader = DataLoader(ImageFiles(files, net.preprocess.pil_transform(), net.preprocess.resize_size),
                        batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    net = prepare(net, device)
    with tqdm(total=len(files), unit="img", desc=desc, file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode():
        for indices, images, failures in loader:
            feats = forward(net, images, device).cpu().numpy() if images is not None else np.zeros((0, 0))
            bar.update(len(indices) + len(failures))
            yield indices, feats, failures


@dataclass
class ExtractResult:
    path: str
    images: int
    new: int
    skipped: int
    dropped: int
    img_per_s: float
    seconds: float
    device: str
    backbone: str
    layer: str
    feature_dim: int
    dataset: str
    skipped_files: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def extract(backbone: str | Backbone = "efficientnet_lite0", data: str = "digits", layer: str | None = None, *,
            data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
            batch_size: int | None = None, workers: int | None = None, dtype: str = "float32",
            weights: str | None = None, input_size: int | None = None, progress: bool = True,
            checkpoint_rows: int = 1024, checkpoint_seconds: float = 15.0) -> ExtractResult:
    """Extract (or bring up to date) the cached features of ``data`` at ``backbone``/``layer``.

    ``backbone`` is a registry name or an already built ``Backbone`` (then ``layer``, ``weights`` and
    ``input_size`` are its own). Only images that are new or changed since the last run are computed;
    deleted ones are dropped.
    Rows are persisted every ``checkpoint_rows`` images or ``checkpoint_seconds``, so a killed run
    resumes where it stopped.
    """
    if dtype not in ("float32", "float16"):
        raise FeatxError(f"--dtype {dtype} is not supported: use float32 or float16")
    ds = data_mod.load(data, data_root)
    net = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, layer, weights,
                                                                          input_size=input_size)
    dev = resolve_device(device)
    path = cache_path(cache_dir, ds.name, net.identity(), dtype)
    start = time.perf_counter()
    with FeatureStore(path, dtype) as store:
        index = store.index()
        fingerprints = {p: data_mod.fingerprint(ds.root / p) for p in ds.paths}

        def up_to_date(p: str) -> bool:
            fp = fingerprints[p]
            return (p in index.rows and index.rows[p][2] == fp) or (p in index.skipped and index.skipped[p][0] == fp)

        todo = [p for p in ds.paths if not up_to_date(p)]
        rows, last_flush, computed = Rows(), time.monotonic(), 0
        for indices, feats, failures in iter_features(net, [ds.root / p for p in todo], dev, batch_size,
                                                      workers, progress, desc=f"{net.spec.name}:{net.tap_name}"):
            for i, row in zip(indices, feats):
                rows.features.append(row)
                rows.paths.append(todo[i])
                rows.fingerprints.append(fingerprints[todo[i]])
            rows.skipped += [(todo[i], fingerprints[todo[i]], reason) for i, reason in failures]
            computed += len(indices) + len(failures)
            if len(rows) + len(rows.skipped) >= checkpoint_rows or time.monotonic() - last_flush > checkpoint_seconds:
                store.write_part(rows)
                rows, last_flush = Rows(), time.monotonic()
        if len(rows) or rows.skipped:
            store.write_part(rows)
        compute_seconds = time.perf_counter() - start

        index = store.index()
        order = [p for p in ds.paths if p in index.rows]
        skipped = {p: index.skipped[p] for p in ds.paths if p in index.skipped}
        position = {p: i for i, p in enumerate(ds.paths)}
        labels = ds.labels[[position[p] for p in order]]
        splits = [ds.splits[position[p]] for p in order]
        main = index.main_meta
        dropped = len(main.get("paths", ())) - sum(1 for p in main.get("paths", ()) if p in position)
        unchanged = (bool(main) and store.parts_written == 0 and len(index.sources) == 1 and main["paths"] == order
                     and np.array_equal(main["labels"], labels) and list(main["splits"]) == splits
                     and main.get("skipped") == sorted(skipped))
        if not unchanged:
            store.consolidate(order, labels, splits, skipped, cache_attrs(net, ds))
    seconds = time.perf_counter() - start
    skipped_files = [{"path": p, "reason": reason} for p, (_, reason) in skipped.items()]
    return ExtractResult(
        path=str(path), images=len(order), new=computed - sum(1 for p in todo if p in skipped),
        skipped=len(skipped), dropped=dropped, img_per_s=round(computed / compute_seconds, 2) if computed else 0.0,
        seconds=round(seconds, 3), device=str(dev), backbone=net.spec.name, layer=net.tap_name,
        feature_dim=int(index.dim or 0), dataset=ds.name, skipped_files=skipped_files)


def cache_attrs(net: Backbone, ds: data_mod.Dataset) -> dict:
    return {**net.identity(), "preprocess": json.dumps(net.preprocess.__dict__), "dataset": ds.name,
            "dataset_root": str(ds.root), "split_source": ds.split_source, "classes": json.dumps(ds.classes),
            "featx_version": __version__, "torch_version": str(torch.__version__)}


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: image paths in, backbone features out.

    ``Pipeline([("features", FeatureExtractor("efficientnet_lite0")), ("clf", LogisticRegression())])``
    trains on a list of image files. Unlike ``extract`` it caches nothing and refuses unreadable
    files, because a transformer must return one row per input.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", layer: str | None = None, weights: str | None = None,
                 device: str = "auto", batch_size: int = 32, workers: int = 0, input_size: int | None = None,
                 pretrained: bool = True):
        self.backbone, self.layer, self.weights, self.device = backbone, layer, weights, device
        self.batch_size, self.workers, self.input_size, self.pretrained = batch_size, workers, input_size, pretrained

    def fit(self, X=None, y=None):
        self.backbone_ = create_backbone(self.backbone, self.layer, self.weights, pretrained=self.pretrained,
                                         input_size=self.input_size)
        self.device_ = resolve_device(self.device)
        self.n_features_out_ = None
        return self

    def transform(self, X) -> np.ndarray:
        if not hasattr(self, "backbone_"):
            self.fit()
        files = [Path(x) for x in X]
        out = [None] * len(files)
        for indices, feats, failures in iter_features(self.backbone_, files, self.device_, self.batch_size,
                                                      self.workers, progress=False):
            if failures:
                i, reason = failures[0]
                raise FeatxError(f"{files[i]} could not be read ({reason}): remove it or replace it with an image")
            for i, row in zip(indices, feats):
                out[i] = row
        result = np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
        self.n_features_out_ = result.shape[1] if result.size else None
        return result

    def get_feature_names_out(self, input_features=None):
        return np.asarray([f"{self.backbone}_{i}" for i in range(self.n_features_out_ or 0)], dtype=object)
