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
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from featx import __version__
from featx import workspace
from featx import data as data_mod
from .backbones import create_backbone, resolve_backbone
from featx.devices import device_name, resolve_precision
from featx.errors import FeatxError
from featx.identity import FeatureIdentity
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

    from featx.devices import HalvingForward, default_batch_size, default_workers, make_loader, overlapped
    from .images import EncodedFiles, ImageFiles, collate, collate_encoded, decode_batches
    from .runtimes import embedding, onnx_model, sidecar

    check_decode(decode)
    device = torch.device(device)
    workers = default_workers(device, runtime == "onnxruntime") if workers is None else workers
    on_device = decode == "device"
    size = net.preprocess.input_size
    dataset = (EncodedFiles if on_device else ImageFiles)(files, net.preprocess.transform(),
                                                          net.preprocess.resize_size)
    loader = make_loader(dataset, device, batch_size or default_batch_size(device), workers,
                         collate_encoded if on_device else collate, image_bytes=3 * size * size, pin=not on_device)
    onnx = onnx_model(net, cache_dir) if runtime == "onnxruntime" else None
    embed = embedding(net, device, onnx)
    if run is not None:
        run.ready = time.perf_counter()
        run.runtime = "torch" if isinstance(embed, HalvingForward) else "onnxruntime"
        run.exports.update({onnx.name: sidecar(onnx).read_text()} if onnx else {})
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
    exports: dict = field(default_factory=dict)  # the ONNX export that computed the rows: {file name: SHA-256}
    ready: float | None = None  # perf_counter() when the runtime could take its first batch


@dataclass
class ExtractResult:
    path: str
    images: int
    new: int
    skipped: int
    dropped: int
    img_per_s: float  # over the computing, from the moment the network was ready (``setup_s`` before it)
    seconds: float
    device: str
    backbone: str
    layer: str
    feature_dim: int
    dataset: str
    unreadable: int = 0  # of ``skipped``: I/O errors, not cached, tried again next run
    excluded: list = field(default_factory=list)  # files --exclude left out
    skipped_files: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the run adapted to, e.g. running out of device memory
    runtime: str = "torch"
    engine: str = "local"
    setup_s: float = 0.0  # importing torch and the model library, building the network, opening its runtime

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """What an extraction works with before any image is read: the identity of each tap's features it
    will write, and how to build the network for the taps that need computing."""

    spec: object
    layers: list
    preprocess: Preprocess
    identities: list
    build: Callable[[list], Backbone]


def plan(backbone: str | Backbone, layer, weights: str | None, input_size: int | None, precision: str,
         tta: str = "none") -> Plan:
    """``backbone`` is a registry name or an already built ``Backbone`` (then ``layer``, ``weights``,
    ``input_size`` and ``precision`` are its own). For a name, the weights are hashed but no network is built."""
    if not isinstance(backbone, str):
        return Plan(backbone.spec, list(backbone.tap_names), backbone.preprocess, backbone.identities(),
                    lambda taps: backbone)
    spec, layers, preprocess = resolve_backbone(backbone, layer, input_size)
    build = partial(create_backbone, backbone, weights=weights, input_size=input_size, precision=precision, tta=tta)
    found = weights_identity(spec, weights)
    if found is None:  # not on this machine: building fetches them or says why it cannot
        net = build(layers)
        found, build = (net.weights_id, net.weights_sha256), (lambda taps: net)
    return Plan(spec, layers, preprocess,
                [feature_identity(spec, found, tap, preprocess, precision, tta) for tap in layers], build)


def training_exclusions(ds: data_mod.Dataset, exclude) -> list[str]:
    """The training files ``exclude`` names (relative or absolute; none matching is an error). Val and test are
    kept whole: leaving out the images a model disagreed with would flatter every later score on them."""
    named = set(data_mod.match_exclude(list(exclude), ds.paths, ds.root))
    excluded = [p for p, split in zip(ds.paths, ds.splits) if p in named and split == "train"]
    if len(excluded) < len(named):
        print(f"featx: --exclude leaves out training images only: {len(named) - len(excluded)} of the files it "
              "names are in val or test and stay in the cache, scored in full", file=sys.stderr)
    return excluded


def extract(backbone: str | Backbone = "efficientnet_lite0", data: str = "digits", layer: str | None = None,
            **options) -> ExtractResult:
    """Extract (or bring up to date) the cached features of ``data`` at one tap of ``backbone``; ``extract_taps``
    takes several (or ``auto``) in one pass, with the same options."""
    results = extract_taps(backbone, data, layer, **options)
    if len(results) > 1:
        raise FeatxError(f"--layer {layer} names {len(results)} taps: extract_taps returns one result per tap")
    return results[0]


def extract_taps(backbone: str | Backbone = "efficientnet_lite0", data: str = "digits", layer=None, *,
                 data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
                 batch_size: int | None = None, workers: int | None = None, dtype: str = "float32",
                 weights: str | None = None, input_size: int | None = None, progress: bool = True,
                 decode: str = "pil", precision: str = "auto", verify: str = "stat", runtime: str = "auto",
                 checkpoint_rows: int = 1024, checkpoint_seconds: float = 15.0, engine: str = "local",
                 address: str | None = None, actors: int | None = None, gpus_per_actor: float = 0,
                 threads_per_actor: int = 2, tta: str = "none", exclude=()) -> list[ExtractResult]:
    """Extract (or bring up to date) the cached features of ``data`` at each tap ``layer`` names (one, a
    comma-separated list, or ``auto``: ``specs.auto_layers``), one result per tap in network order.

    Each tap has its own cache file, as a single-tap run would write it; the images any of them lacks are
    decoded once and go through the network once, which stops at the deepest tap needed. Only images that
    are new or changed since the last run are computed; deleted ones are dropped. The network is built only
    if some image needs it, so an up-to-date cache answers at once.
    Rows are persisted every ``checkpoint_rows`` images or ``checkpoint_seconds``, so a killed run
    resumes where it stopped. ``decode`` is where JPEGs are decoded: ``pil`` (CPU workers) or
    ``device`` (batched, nvjpeg on CUDA); see ``iter_features``. ``precision`` (``auto``: fp32 on a CPU,
    bf16 or fp16 on CUDA) is part of the features' identity, so each precision has its own cache.
    ``verify`` is how a file is known to be unchanged: ``stat`` (cheap) or ``content`` (hashes every file).
    ``runtime`` (``auto``: ONNX Runtime on a CPU, torch on CUDA) runs the network; it is recorded in the
    cache's attributes but is not part of the identity, as both give the same features.
    ``tta="flip"`` stores the mean of each image's and its mirror's features (its own cache; predict and
    evaluate apply what the model file records). ``exclude`` lists files (relative or absolute paths): the training ones are left out of the cache; val and
    test are kept whole.
    ``engine="ray"`` computes on a Ray Data cluster
    (``address``; a local one, started only if some image needs computing, when None) with ``actors``
    embedding actors of ``gpus_per_actor`` GPUs each (``ray_engine.py``); this process still writes the cache.
    """
    check_options(engine, address, verify, dtype, decode)
    start = time.perf_counter()
    ds = data_mod.load(data, data_root)
    excluded = training_exclusions(ds, exclude)
    ds = ds.without(excluded)
    dev = ("cuda" if gpus_per_actor else "cpu") if engine == "ray" else device_name(device)
    p = plan(backbone, layer, weights, input_size, resolve_precision(precision, dev), tta)
    runtime = resolve_runtime(runtime, dev, p.identities[0].precision)
    paths = [cache_path(cache_dir, ds.name, ds.root, identity, dtype) for identity in p.identities]
    with ExitStack() as held:
        stores = [held.enter_context(FeatureStore(path, dtype)) for path in paths]  # locked in network order
        indexes = [store.index() for store in stores]
        fingerprints = {f: data_mod.fingerprint(ds.root / f, verify) for f in ds.paths}
        onnx_dir = Path(cache_dir) / "onnx"
        todos = [to_compute(index, ds.paths, fingerprints, distrusted(index, onnx_dir, store.path))
                 for index, store in zip(indexes, stores)]
        lacking = set().union(*todos)
        todo = [f for f in ds.paths if f in lacking]
        compute_start, unreadable, run = time.perf_counter(), {}, RunInfo(runtime)
        for store in stores:
            store.exports = run.exports  # filled once the runtime is set up, before any row is written
        if todo:
            for store, tap_todo in zip(stores, todos):
                store.check_writable(len(tap_todo))
            net = p.build([tap for tap, tap_todo in zip(p.layers, todos) if tap_todo])
            batches = feature_batches(
                net, [ds.root / f for f in todo], f"{p.spec.name}:{net.tap_name}", dev, runtime, run, cache_dir,
                engine, batch_size=batch_size,
                workers=workers, decode=decode, progress=progress, address=address, actors=actors,
                gpus_per_actor=gpus_per_actor, threads_per_actor=threads_per_actor, checkpoint_rows=checkpoint_rows)
            targets = [(stores[p.layers.index(tap)], set(todos[p.layers.index(tap)])) for tap in net.tap_names]
            dims = net.tap_dims() if len(net.tap_names) > 1 else None
            unreadable = write_batches(targets, dims, batches, todo, fingerprints, checkpoint_rows,
                                       checkpoint_seconds)
        # the rate counts from the first batch the network could take; the imports and the build before it are a
        # fixed cost (about 3 s in a fresh process: torch, torchvision, timm), reported as setup_s
        ready = run.ready or compute_start
        compute_seconds = time.perf_counter() - ready
        rate = round(len(todo) / compute_seconds, 2) if todo and compute_seconds else 0.0
        run.notes += split_note(indexes[0].main_meta, ds)
        finished = finish_taps(p, stores, indexes, todos, ds, fingerprints, onnx_dir, run, rate)
    if isinstance(backbone, str):  # evaluate extracts with a model's own backbone: not a user's choice
        record_extract(cache_dir, p, ds, input_size, weights, paths)
    check_some_read(ds, finished, unreadable)
    ran = {"seconds": round(time.perf_counter() - start, 3), "setup_s": round(ready - compute_start, 3),
           "device": dev, "backbone": p.spec.name, "dataset": ds.name, "notes": run.notes, "runtime": run.runtime,
           "engine": engine, "excluded": excluded}
    return [tap_result(tap, path, tap_todo, done, unreadable, ds.broken, rate, ran)
            for tap, path, tap_todo, done in zip(p.layers, paths, todos, finished)]


def check_options(engine: str, address: str | None, verify: str, dtype: str, decode: str) -> None:
    """Each wrong option is one line before any image is read (a missing Ray or an unreachable cluster too)."""
    if engine not in ENGINES:
        raise FeatxError(f"--engine {engine} is not supported: use {' or '.join(ENGINES)}")
    if engine == "ray":
        from .ray_engine import require

        require(address)
    if verify not in data_mod.VERIFY:
        raise FeatxError(f"--verify {verify} is not supported: use {' or '.join(data_mod.VERIFY)}")
    if dtype not in ("float32", "float16"):
        raise FeatxError(f"--dtype {dtype} is not supported: use float32 or float16")
    check_decode(decode)


def feature_batches(net: Backbone, files: list, desc: str, dev: str, runtime: str, run: RunInfo, cache_dir,
                    engine: str, *, batch_size, workers, decode, progress, address, actors, gpus_per_actor,
                    threads_per_actor, checkpoint_rows):
    """The (indices, features, failures) batches of ``files`` from this process (``iter_features``) or from a Ray
    Data cluster (``ray_engine.py``); ``run`` learns the runtime that computes them."""
    if engine != "ray":
        return iter_features(net, files, dev, batch_size, workers, progress, desc=desc, decode=decode, run=run,
                             runtime=runtime, cache_dir=cache_dir)
    from .ray_engine import ray_features
    from .runtimes import onnx_model, sidecar

    onnx = onnx_model(net, cache_dir) if runtime == "onnxruntime" else None
    run.runtime = "onnxruntime" if onnx else "torch"
    run.exports.update({onnx.name: sidecar(onnx).read_text()} if onnx else {})
    return ray_features(net, files, dev, batch_size, decode, onnx and onnx.read_bytes(), address, actors,
                        gpus_per_actor, threads_per_actor, progress, desc, run, checkpoint_rows)


def finish_taps(p: Plan, stores: list, indexes: list, todos: list, ds: data_mod.Dataset, fingerprints: dict,
                onnx_dir: Path, run: RunInfo, rate: float) -> list:
    """``finish`` each tap's cache, its attributes recording this run's rate where the tap computed images."""
    finished = []
    for identity, store, index, tap_todo in zip(p.identities, stores, indexes, todos):
        speed = rate if tap_todo else index.main_meta.get("img_per_s")
        finished.append(finish(store, ds, fingerprints, onnx_dir, lambda: {
            **cache_attrs(identity, p.preprocess, ds), "runtime": run.runtime,
            **({"img_per_s": float(speed)} if speed else {})}))
    return finished


def record_extract(cache_dir, p: Plan, ds: data_mod.Dataset, input_size: int | None, weights: str | None,
                   paths: list) -> None:
    """What this extraction was, for the later stages to take what they are not told (``workspace.py``)."""
    workspace.record(cache_dir, "extract", {
        "backbone": p.spec.name, "data": str(ds.root), "dataset": ds.name, "layer": ",".join(p.layers),
        "input_size": input_size, "precision": p.identities[0].precision, "tta": p.identities[0].tta,
        "weights": weights and str(Path(weights).resolve()), "path": ", ".join(map(str, paths))})


def check_some_read(ds: data_mod.Dataset, finished: list, unreadable: dict) -> None:
    """A dataset none of whose images decodes is an error, not an empty cache."""
    if ds.paths and not any(order for _, order, _, _ in finished):
        why = next(iter([reason for _, reason in finished[0][2].values()] + list(unreadable.values())), "unreadable")
        raise FeatxError(f"none of the {len(ds.paths)} images under {ds.root} could be read (first: {why}): replace "
                         "them with images (what could not be decoded is recorded and skipped until it changes)")


def tap_result(tap: str, path: Path, tap_todo: list, finished: tuple, unreadable: dict, broken: list, rate: float,
               ran: dict) -> ExtractResult:
    """One tap's result: its counts and skipped files, with what the whole run shares (``ran``)."""
    index, order, skipped, dropped = finished
    failed = {f: reason for f, reason in unreadable.items() if f in set(tap_todo)}
    return ExtractResult(
        path=str(path), images=len(order), new=sum(1 for f in tap_todo if f not in skipped and f not in failed),
        skipped=len(skipped) + len(failed) + len(broken), dropped=dropped, unreadable=len(failed),
        img_per_s=rate if tap_todo else 0.0, layer=tap, feature_dim=int(index.dim or 0), **ran,
        skipped_files=[{"path": f, "reason": reason} for f, (_, reason) in skipped.items()]
        + [{"path": f, "reason": reason, "retried_next_run": True} for f, reason in failed.items()]
        + [{"path": f, "reason": reason} for f, reason in broken])


def to_compute(index, paths: list, fingerprints: dict, doubtful=frozenset()) -> list:
    """The ``paths`` a cache must compute: neither a row nor a recorded skip matches the file as it is now."""
    return [f for f in paths if f in doubtful or not (
            f in index.rows and index.rows[f][2] == fingerprints[f] or
            f in index.skipped and index.skipped[f][0] == fingerprints[f])]


def split_taps(rows: np.ndarray, dims: list[int] | None) -> list[np.ndarray]:
    """A multi-tap network's rows (taps side by side) as one array per tap; ``dims`` None means one tap."""
    return np.split(rows, np.cumsum(dims)[:-1], axis=1) if dims else [rows]


def write_batches(targets: list, dims: list[int] | None, batches, todo: list, fingerprints: dict,
                  checkpoint_rows: int, checkpoint_seconds: float) -> dict:
    """Write computed rows and undecodable files into part files, every ``checkpoint_rows`` rows or
    seconds. ``targets`` holds one (store, files it lacks) per tap the network computes, in its column order
    (``dims``): a tap's store receives only the files it lacks. Files that could not be *read* (I/O errors)
    are not cached: they are returned, and tried again on the next run."""
    from .images import IO_ERROR

    rows, last_flush, unreadable = [Rows() for _ in targets], time.monotonic(), {}
    for indices, feats, failures in batches:
        unreadable |= {todo[i]: reason for i, reason in failures if reason.startswith(IO_ERROR)}
        for (store, lacking), tap_rows, columns in zip(targets, rows, split_taps(feats, dims)):
            for i, row in zip(indices, columns):
                if todo[i] in lacking:
                    tap_rows.features.append(row)
                    tap_rows.paths.append(todo[i])
                    tap_rows.fingerprints.append(fingerprints[todo[i]])
            tap_rows.skipped += [(todo[i], fingerprints[todo[i]], reason) for i, reason in failures
                                 if not reason.startswith(IO_ERROR) and todo[i] in lacking]
        if max(len(r) + len(r.skipped) for r in rows) >= checkpoint_rows or \
                time.monotonic() - last_flush > checkpoint_seconds:
            flush(targets, rows)
            rows, last_flush = [Rows() for _ in targets], time.monotonic()
    flush(targets, rows)
    return unreadable


def flush(targets: list, rows: list) -> None:
    for (store, _), tap_rows in zip(targets, rows):
        if len(tap_rows) or tap_rows.skipped:
            store.write_part(tap_rows)


def finish(store: FeatureStore, ds: data_mod.Dataset, fingerprints: dict, onnx_dir: Path,
           attrs: Callable[[], dict]):
    """Merge parts into the main file in dataset order (with the attributes ``attrs()`` gives), unless it
    already holds exactly that, checksums included. Only rows that can be trusted are kept: the old row of a
    changed file that could not be read this time is dropped (its file is tried again next run), and so is a
    row from an export that no longer verifies. Returns (index, ordered paths, skipped {path: (fingerprint,
    reason)}, rows dropped)."""
    index = store.index()
    doubtful = distrusted(index, onnx_dir)
    order = [f for f in ds.paths if f in index.rows and index.rows[f][2] == fingerprints[f] and f not in doubtful]
    skipped = {f: index.skipped[f] for f in ds.paths if f in index.skipped}
    position = {f: i for i, f in enumerate(ds.paths)}
    labels = ds.labels[[position[f] for f in order]]
    splits = [ds.splits[position[f]] for f in order]
    main = index.main_meta
    dropped = len(main.get("paths", ())) - sum(1 for f in main.get("paths", ()) if f in position)
    unchanged = (bool(main) and store.parts_written == 0 and len(index.sources) == 1 and main["paths"] == order
                 and np.array_equal(main["labels"], labels) and list(main["splits"]) == splits
                 and main.get("skipped") == sorted(skipped) and main["checksummed"]
                 and main.get("split_source") == ds.split_source)
    if not unchanged:
        store.check_writable(0)
        store.consolidate(order, labels, splits, skipped, attrs())
    return index, order, skipped, dropped


def distrusted(index, onnx_dir: Path, cache: Path | None = None) -> set:
    """Paths whose rows came from an ONNX export that is still here but no longer hashes to the SHA-256 the
    cache recorded for it (damaged or replaced since): computed again, never served. ``cache`` given, it is
    said in one line."""
    from .runtimes import export_failed

    failed = {source: name for source, record in index.exports.items() for name, sha in record.items()
              if export_failed(onnx_dir / name, sha)}
    if failed and cache is not None:
        print(f"featx: rows of {cache} came from {onnx_dir / next(iter(failed.values()))}, which no longer verifies: "
              "computing them again", file=sys.stderr)
    return {f for f, (source, _, _) in index.rows.items() if source in failed}


def split_note(main: dict, ds: data_mod.Dataset) -> list:
    """A note when a cache split by the old path hash (class folder included) is re-split by the new one."""
    if not str(main.get("split_source") or "").startswith("hash:") or ds.split_source.startswith("folders"):
        return []
    now = dict(zip(ds.paths, ds.splits))
    moved = sum(now[p] != s for p, s in zip(main["paths"], main["splits"]) if p in now)
    return [f"hashed splits now hash each file's path below its class folder, so renaming a class moves no file; "
            f"this cache was re-split once: {moved} of {len(main['paths'])} images changed split (a head fitted "
            "before may have trained on images now in val or test: fit it again)"]


def cache_attrs(identity: FeatureIdentity, preprocess: Preprocess, ds: data_mod.Dataset) -> dict:
    return {**identity.as_dict(), "preprocess": json.dumps(preprocess.__dict__), "dataset": ds.name,
            "dataset_root": str(ds.root), "split_source": ds.split_source, "classes": json.dumps(ds.classes),
            "featx_version": __version__, "torch_version": importlib.metadata.version("torch")}
