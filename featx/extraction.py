"""Extraction, stage 1: run images through a frozen backbone and keep the features in the HDF5 cache.

Images are decoded in DataLoader workers straight to uint8 tensors (JPEG draft mode, no float
copies on the CPU), or, with ``decode="device"``, the workers only read JPEG bytes and the device
decodes them in batches (``images.py``). Normalisation, autocast and channels_last happen on the
device (``devices.py``). Both decoders give the same features to within JPEG-decoder noise (cosine
>= 0.9999 on hymenoptera), so they share one cache. torch is imported only when some image needs
computing: re-running an up-to-date extraction reads the index and returns.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import __version__, workspace
from . import data as data_mod
from .backbones import create_backbone, resolve_backbone
from .devices import device_name, resolve_precision
from .errors import FeatxError
from .identity import FeatureIdentity
from .runtimes import resolve_runtime
from .specs import Preprocess, feature_identity
from .store import FeatureStore, Rows, cache_path
from .weights import weights_identity

if TYPE_CHECKING:
    import torch

    from .network import Backbone

ENGINES = ("local", "ray")
DECODERS = ("pil", "device")


def check_decode(decode: str) -> None:
    if decode not in DECODERS:
        raise FeatxError(f"--decode {decode} is not supported: use one of {', '.join(DECODERS)}")


def iter_features(net: Backbone, files: list, device: torch.device | str, batch_size: int | None = None,
                  workers: int | None = None, progress: bool = True, desc: str = "extract", decode: str = "pil",
                  run: RunInfo | None = None, runtime: str = "torch", cache_dir: str | os.PathLike = "cache"):
    """Yield (indices, features, failures) per batch; ``failures`` is [(index, reason)].

    ``decode="pil"`` decodes in the workers (JPEG draft mode); ``"device"`` has the workers read
    JPEG bytes and decodes them in batches on ``device``, which lifts the CPU decoding ceiling on a GPU.
    ``runtime`` (already resolved: ``torch`` or ``onnxruntime``) runs the network, ONNX exports living under
    ``cache_dir``. ``run``, when given, receives the runtime that really ran (a network that does not export
    stays on torch) and notes such as running out of device memory, which halves the batch.
    """
    import torch
    from tqdm import tqdm

    from .devices import HalvingForward, default_batch_size, default_workers, make_loader, overlapped
    from .images import EncodedFiles, ImageFiles, collate, collate_encoded, decode_batches
    from .runtimes import embedding, onnx_model

    check_decode(decode)
    device = torch.device(device)
    workers = default_workers(device, runtime == "onnxruntime") if workers is None else workers
    on_device = decode == "device"
    size = net.preprocess.input_size
    dataset = (EncodedFiles if on_device else ImageFiles)(files, net.preprocess.transform(),
                                                          net.preprocess.resize_size)
    loader = make_loader(dataset, device, batch_size or default_batch_size(device), workers,
                         collate_encoded if on_device else collate, image_bytes=3 * size * size, pin=not on_device)
    embed = embedding(net, device, onnx_model(net, cache_dir) if runtime == "onnxruntime" else None)
    if run is not None:
        run.runtime = "torch" if isinstance(embed, HalvingForward) else "onnxruntime"
    with tqdm(total=len(files), unit="img", desc=desc, file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar, torch.inference_mode():
        for indices, images, failures in decode_batches(loader, dataset, device) if on_device \
                else overlapped(loader, device):
            feats = embed(images).cpu().numpy() if images is not None else np.zeros((0, 0))
            bar.update(len(indices) + len(failures))
            yield indices, feats, failures
    if run is not None:
        run.notes += embed.notes


@dataclass
class RunInfo:
    """How an extraction ran: the runtime that computed the rows, and what it had to adapt to."""

    runtime: str
    notes: list = field(default_factory=list)


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
    unreadable: int = 0  # of ``skipped``: I/O errors, not cached, tried again next run
    skipped_files: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the run adapted to, e.g. running out of device memory
    runtime: str = "torch"
    engine: str = "local"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """What an extraction works with before any image is read: the identity of the features it
    will write, and how to build the network should some image need computing."""

    spec: object
    layer: str
    preprocess: Preprocess
    identity: FeatureIdentity
    build: Callable[[], Backbone]


def plan(backbone: str | Backbone, layer: str | None, weights: str | None, input_size: int | None,
         precision: str, tta: str = "none") -> Plan:
    """``backbone`` is a registry name or an already built ``Backbone`` (then ``layer``, ``weights``,
    ``input_size`` and ``precision`` are its own). For a name, the weights are hashed but no network is built."""
    if not isinstance(backbone, str):
        return Plan(backbone.spec, backbone.tap_name, backbone.preprocess, backbone.identity(), lambda: backbone)
    spec, layer, preprocess = resolve_backbone(backbone, layer, input_size)
    build = partial(create_backbone, backbone, layer, weights, input_size=input_size, precision=precision, tta=tta)
    found = weights_identity(spec, weights)
    if found is None:  # not on this machine: building fetches them or says why it cannot
        net = build()
        found, build = (net.weights_id, net.weights_sha256), (lambda: net)
    return Plan(spec, layer, preprocess, feature_identity(spec, found, layer, preprocess, precision, tta), build)


def extract(backbone: str | Backbone = "efficientnet_lite0", data: str = "digits", layer: str | None = None, *,
            data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
            batch_size: int | None = None, workers: int | None = None, dtype: str = "float32",
            weights: str | None = None, input_size: int | None = None, progress: bool = True,
            decode: str = "pil", precision: str = "auto", verify: str = "stat", runtime: str = "auto",
            checkpoint_rows: int = 1024, checkpoint_seconds: float = 15.0, engine: str = "local",
            address: str | None = None, actors: int | None = None, gpus_per_actor: float = 0,
            threads_per_actor: int = 2, tta: str = "none") -> ExtractResult:
    """Extract (or bring up to date) the cached features of ``data`` at ``backbone``/``layer``.

    Only images that are new or changed since the last run are computed; deleted ones are dropped.
    The network is built only if some image needs it, so an up-to-date cache answers at once.
    Rows are persisted every ``checkpoint_rows`` images or ``checkpoint_seconds``, so a killed run
    resumes where it stopped. ``decode`` is where JPEGs are decoded: ``pil`` (CPU workers) or
    ``device`` (batched, nvjpeg on CUDA); see ``iter_features``. ``precision`` (``auto``: fp32 on a CPU,
    bf16 or fp16 on CUDA) is part of the features' identity, so each precision has its own cache.
    ``verify`` is how a file is known to be unchanged: ``stat`` (cheap) or ``content`` (hashes every file).
    ``runtime`` (``auto``: ONNX Runtime on a CPU, torch on CUDA) runs the network; it is recorded in the
    cache's attributes but is not part of the identity, as both give the same features.
    ``tta="flip"`` stores the mean of each image's and its mirror's features (its own cache; predict and
    evaluate apply what the model file records). ``engine="ray"`` computes on a Ray Data cluster
    (``address``; a local one, started only if some image needs computing, when None) with ``actors``
    embedding actors of ``gpus_per_actor`` GPUs each (``ray_engine.py``); this process still writes the cache.
    """
    if engine not in ENGINES:
        raise FeatxError(f"--engine {engine} is not supported: use {' or '.join(ENGINES)}")
    if engine == "ray":
        from .ray_engine import require

        require(address)  # a missing Ray or an unreachable cluster is said before any work
    if verify not in data_mod.VERIFY:
        raise FeatxError(f"--verify {verify} is not supported: use {' or '.join(data_mod.VERIFY)}")
    if dtype not in ("float32", "float16"):
        raise FeatxError(f"--dtype {dtype} is not supported: use float32 or float16")
    check_decode(decode)
    start = time.perf_counter()
    ds = data_mod.load(data, data_root)
    dev = ("cuda" if gpus_per_actor else "cpu") if engine == "ray" else device_name(device)
    p = plan(backbone, layer, weights, input_size, resolve_precision(precision, dev), tta)
    runtime = resolve_runtime(runtime, dev, p.identity.precision)
    path = cache_path(cache_dir, ds.name, ds.root, p.identity, dtype)
    with FeatureStore(path, dtype) as store:
        index = store.index()
        fingerprints = {f: data_mod.fingerprint(ds.root / f, verify) for f in ds.paths}
        todo = [f for f in ds.paths if not (f in index.rows and index.rows[f][2] == fingerprints[f] or
                                            f in index.skipped and index.skipped[f][0] == fingerprints[f])]
        compute_start, unreadable, run = time.perf_counter(), {}, RunInfo(runtime)
        if todo:
            store.check_writable(len(todo))
            files, desc = [ds.root / f for f in todo], f"{p.spec.name}:{p.layer}"
            if engine == "ray":
                from .ray_engine import ray_features
                from .runtimes import onnx_model

                net = p.build()
                onnx = onnx_model(net, cache_dir) if runtime == "onnxruntime" else None
                run.runtime = "onnxruntime" if onnx else "torch"
                batches = ray_features(net, files, dev, batch_size, decode, onnx and onnx.read_bytes(), address,
                                       actors, gpus_per_actor, threads_per_actor, progress, desc, run)
            else:
                batches = iter_features(p.build(), files, dev, batch_size, workers, progress, desc=desc,
                                        decode=decode, run=run, runtime=runtime, cache_dir=cache_dir)
            unreadable = write_batches(store, batches, todo, fingerprints, checkpoint_rows, checkpoint_seconds)
        compute_seconds = time.perf_counter() - compute_start
        speed = len(todo) / compute_seconds if todo and compute_seconds else index.main_meta.get("img_per_s")
        index, order, skipped, dropped = finish(store, ds, lambda: {
            **cache_attrs(p.identity, p.preprocess, ds), "runtime": run.runtime,
            **({"img_per_s": float(speed)} if speed else {})})
    if isinstance(backbone, str):  # evaluate extracts with a model's own backbone: not a user's choice
        workspace.record(cache_dir, "extract", {
            "backbone": p.spec.name, "data": str(ds.root), "dataset": ds.name, "layer": p.layer,
            "input_size": input_size, "precision": p.identity.precision, "tta": p.identity.tta,
            "weights": weights and str(Path(weights).resolve()), "path": str(path)})
    seconds = time.perf_counter() - start
    return ExtractResult(
        path=str(path), images=len(order), new=len(todo) - sum(1 for f in todo if f in skipped or f in unreadable),
        skipped=len(skipped) + len(unreadable) + len(ds.broken), dropped=dropped, unreadable=len(unreadable),
        img_per_s=round(len(todo) / compute_seconds, 2) if todo and compute_seconds else 0.0,
        seconds=round(seconds, 3), device=dev, backbone=p.spec.name, layer=p.layer,
        feature_dim=int(index.dim or 0), dataset=ds.name, notes=run.notes, runtime=run.runtime, engine=engine,
        skipped_files=[{"path": f, "reason": reason} for f, (_, reason) in skipped.items()]
        + [{"path": f, "reason": reason, "retried_next_run": True} for f, reason in unreadable.items()]
        + [{"path": f, "reason": reason} for f, reason in ds.broken])


def write_batches(store: FeatureStore, batches, todo: list, fingerprints: dict, checkpoint_rows: int,
                  checkpoint_seconds: float) -> dict:
    """Write computed rows and undecodable files into part files, every ``checkpoint_rows`` rows or
    seconds. Files that could not be *read* (I/O errors) are not cached: they are returned, and tried
    again on the next run."""
    from .images import IO_ERROR

    rows, last_flush, unreadable = Rows(), time.monotonic(), {}
    for indices, feats, failures in batches:
        for i, row in zip(indices, feats):
            rows.features.append(row)
            rows.paths.append(todo[i])
            rows.fingerprints.append(fingerprints[todo[i]])
        unreadable |= {todo[i]: reason for i, reason in failures if reason.startswith(IO_ERROR)}
        rows.skipped += [(todo[i], fingerprints[todo[i]], reason) for i, reason in failures
                         if not reason.startswith(IO_ERROR)]
        if len(rows) + len(rows.skipped) >= checkpoint_rows or time.monotonic() - last_flush > checkpoint_seconds:
            store.write_part(rows)
            rows, last_flush = Rows(), time.monotonic()
    if len(rows) or rows.skipped:
        store.write_part(rows)
    return unreadable


def finish(store: FeatureStore, ds: data_mod.Dataset, attrs: Callable[[], dict]):
    """Merge parts into the main file in dataset order (with the attributes ``attrs()`` gives), unless it
    already holds exactly that. Returns (index, ordered paths, skipped {path: (fingerprint, reason)},
    rows dropped)."""
    index = store.index()
    order = [f for f in ds.paths if f in index.rows]
    skipped = {f: index.skipped[f] for f in ds.paths if f in index.skipped}
    position = {f: i for i, f in enumerate(ds.paths)}
    labels = ds.labels[[position[f] for f in order]]
    splits = [ds.splits[position[f]] for f in order]
    main = index.main_meta
    dropped = len(main.get("paths", ())) - sum(1 for f in main.get("paths", ()) if f in position)
    unchanged = (bool(main) and store.parts_written == 0 and len(index.sources) == 1 and main["paths"] == order
                 and np.array_equal(main["labels"], labels) and list(main["splits"]) == splits
                 and main.get("skipped") == sorted(skipped))
    if not unchanged:
        store.check_writable(0)
        store.consolidate(order, labels, splits, skipped, attrs())
    return index, order, skipped, dropped


def cache_attrs(identity: FeatureIdentity, preprocess: Preprocess, ds: data_mod.Dataset) -> dict:
    return {**identity.as_dict(), "preprocess": json.dumps(preprocess.__dict__), "dataset": ds.name,
            "dataset_root": str(ds.root), "split_source": ds.split_source, "classes": json.dumps(ds.classes),
            "featx_version": __version__, "torch_version": importlib.metadata.version("torch")}
