"""Stage 1: run images through a frozen backbone and keep the features in the HDF5 cache.

Images are decoded in DataLoader workers straight to uint8 tensors (JPEG draft mode, no float
copies on the CPU), or, with ``decode="device"``, the workers only read JPEG bytes and the device
decodes them in batches. Normalisation, bf16 autocast and channels_last happen on the device.
Both decoders give the same features to within JPEG-decoder noise (cosine >= 0.9999 on
hymenoptera), so they share one cache.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from . import data as data_mod
from .backbones import (Backbone, Preprocess, create_backbone, feature_identity, resolve_backbone,
                        weights_identity)
from .errors import FeatxError
from .store import FeatureStore, Rows, cache_path

DECODERS = ("pil", "device")
EXIF_ORIENTATION = 0x0112


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


def failure_reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


class ImageFiles(torch.utils.data.Dataset):
    """Decodes files to uint8 tensors; a file that fails becomes a skip with its reason, never a crash."""

    def __init__(self, files: list, transform, draft_size: int):
        self.files, self.transform, self.draft_size = files, transform, draft_size

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> torch.Tensor:
        return self.transform(data_mod.open_rgb(self.files[i], self.draft_size))

    def load(self, i: int) -> torch.Tensor:
        return self.decode(i)

    def __getitem__(self, i: int):
        try:
            return i, self.load(i), ""
        except Exception as exc:  # corrupt, truncated, empty or not an image: reported, not fatal
            return i, None, failure_reason(exc)


class EncodedFiles(ImageFiles):
    """For decoding on the device: a plain JPEG (baseline, RGB or grey, upright) comes back as its
    bytes, a 1-D uint8 tensor; anything else is decoded here by Pillow, as ImageFiles does, because
    nvjpeg refuses other formats and one refusal sends its whole batch to file-by-file decoding."""

    def load(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and "progressive" not in img.info
                     and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
        if not plain:
            return self.decode(i)
        return torch.frombuffer(bytearray(Path(self.files[i]).read_bytes()), dtype=torch.uint8)


def collate(batch, stack: bool = True):
    ok = [b for b in batch if b[1] is not None]
    images = [b[1] for b in ok]
    if stack:
        images = torch.stack(images) if ok else None
    return [b[0] for b in ok], images, [(b[0], b[2]) for b in batch if b[1] is None]


def decode_on_device(indices: list, items: list, dataset: EncodedFiles, device: torch.device):
    """Batched JPEG decode on ``device`` (nvjpeg on CUDA), resize and crop there. Files the device
    decoder refuses are decoded by Pillow, so the outcome per file is the same as on the CPU path."""
    encoded = [k for k, t in enumerate(items) if t.dim() == 1]
    decoded = dict(zip(encoded, decode_jpegs([items[k] for k in encoded], device)))
    kept, images, failures = [], [], []
    for k, i in enumerate(indices):
        try:
            if k not in decoded:
                image = items[k]
            elif decoded[k] is not None:
                image = dataset.transform(decoded[k])
            else:
                image = dataset.decode(i)
        except Exception as exc:
            failures.append((i, failure_reason(exc)))
            continue
        kept.append(i)
        images.append(image.to(device, non_blocking=True))
    return kept, torch.stack(images) if images else None, failures


def decode_jpegs(encoded: list, device: torch.device) -> list:
    """Decode in one batch; if the batch fails, file by file, with None for each file refused."""
    if not encoded:
        return []
    rgb = torchvision.io.ImageReadMode.RGB
    try:
        return torchvision.io.decode_jpeg(encoded, mode=rgb, device=device)
    except RuntimeError:
        out = []
        for raw in encoded:
            try:
                out.append(torchvision.io.decode_jpeg(raw, mode=rgb, device=device))
            except RuntimeError:
                out.append(None)
        return out


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


def check_decode(decode: str) -> None:
    if decode not in DECODERS:
        raise FeatxError(f"--decode {decode} is not supported: use one of {', '.join(DECODERS)}")


def iter_features(net: Backbone, files: list, device: torch.device, batch_size: int | None = None,
                  workers: int | None = None, progress: bool = True, desc: str = "extract", decode: str = "pil"):
    """Yield (indices, features, failures) per batch; ``failures`` is [(index, reason)].

    ``decode="pil"`` decodes in the workers (JPEG draft mode); ``"device"`` has the workers read
    JPEG bytes and decodes them in batches on ``device``, which lifts the CPU decoding ceiling on a GPU.
    """
    check_decode(decode)
    workers = default_workers(device) if workers is None else workers
    batch_size = batch_size or default_batch_size(device)
    on_device = decode == "device"
    dataset = (EncodedFiles if on_device else ImageFiles)(files, net.preprocess.transform(),
                                                          net.preprocess.resize_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(collate, stack=not on_device), pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    net = prepare(net, device)
    with tqdm(total=len(files), unit="img", desc=desc, file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode():
        for indices, images, failures in loader:
            if on_device:
                indices, images, refused = decode_on_device(indices, images, dataset, device)
                failures += refused
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
            decode: str = "pil", checkpoint_rows: int = 1024, checkpoint_seconds: float = 15.0) -> ExtractResult:
    """Extract (or bring up to date) the cached features of ``data`` at ``backbone``/``layer``.

    ``backbone`` is a registry name or an already built ``Backbone`` (then ``layer``, ``weights`` and
    ``input_size`` are its own). Only images that are new or changed since the last run are computed;
    deleted ones are dropped.
    Rows are persisted every ``checkpoint_rows`` images or ``checkpoint_seconds``, so a killed run
    resumes where it stopped. ``decode`` is where JPEGs are decoded: ``pil`` (CPU workers) or
    ``device`` (batched, nvjpeg on CUDA); see ``iter_features``.
    """
    if dtype not in ("float32", "float16"):
        raise FeatxError(f"--dtype {dtype} is not supported: use float32 or float16")
    check_decode(decode)
    start = time.perf_counter()
    ds = data_mod.load(data, data_root)
    dev = resolve_device(device)
    if isinstance(backbone, Backbone):
        net, spec, layer, preprocess = backbone, backbone.spec, backbone.tap_name, backbone.preprocess
        identity = net.identity()
    else:  # the network is built only if some image needs it, so an up-to-date cache answers at once
        net, (spec, layer, preprocess) = None, resolve_backbone(backbone, layer, input_size)
        build = partial(create_backbone, backbone, layer, weights, input_size=input_size)
        found = weights_identity(spec, weights)
        if found is None:  # not on this machine: building fetches them or says why it cannot
            net = build()
            found = net.weights_id, net.weights_sha256
        identity = feature_identity(spec, found, layer, preprocess)
    path = cache_path(cache_dir, ds.name, identity, dtype)
    with FeatureStore(path, dtype) as store:
        index = store.index()
        fingerprints = {p: data_mod.fingerprint(ds.root / p) for p in ds.paths}

        def up_to_date(p: str) -> bool:
            fp = fingerprints[p]
            return (p in index.rows and index.rows[p][2] == fp) or (p in index.skipped and index.skipped[p][0] == fp)

        todo = [p for p in ds.paths if not up_to_date(p)]
        if todo and net is None:
            net = build()
        rows, last_flush, computed = Rows(), time.monotonic(), 0
        batches = iter_features(net, [ds.root / p for p in todo], dev, batch_size, workers, progress,
                                desc=f"{spec.name}:{layer}", decode=decode) if todo else ()
        compute_start = time.perf_counter()
        for indices, feats, failures in batches:
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
        compute_seconds = time.perf_counter() - compute_start

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
            store.consolidate(order, labels, splits, skipped, cache_attrs(identity, preprocess, ds))
    seconds = time.perf_counter() - start
    skipped_files = [{"path": p, "reason": reason} for p, (_, reason) in skipped.items()]
    return ExtractResult(
        path=str(path), images=len(order), new=computed - sum(1 for p in todo if p in skipped),
        skipped=len(skipped), dropped=dropped, img_per_s=round(computed / compute_seconds, 2) if computed else 0.0,
        seconds=round(seconds, 3), device=str(dev), backbone=spec.name, layer=layer,
        feature_dim=int(index.dim or 0), dataset=ds.name, skipped_files=skipped_files)


def cache_attrs(identity: dict, preprocess: Preprocess, ds: data_mod.Dataset) -> dict:
    return {**identity, "preprocess": json.dumps(preprocess.__dict__), "dataset": ds.name,
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
                 pretrained: bool = True, decode: str = "pil"):
        self.backbone, self.layer, self.weights, self.device = backbone, layer, weights, device
        self.batch_size, self.workers, self.input_size, self.pretrained = batch_size, workers, input_size, pretrained
        self.decode = decode

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
                                                      self.workers, progress=False, decode=self.decode):
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
