"""The boundary cache: what the frozen part of a partly unfrozen network computes, kept once per image and view.

When ``--unfreeze`` names top blocks, everything below the first of them is frozen (eval mode, no gradient), so
its output for a given input never changes. Fine-tuning then runs that part once per image and view, keeps its
output, the input of the first unfrozen block (the *boundary*), in HDF5 files under ``cache/boundary/``
(``store.FeatureStore``: incremental, resumable, checksummed; one chunk per row, as rows are read in random
order), and every epoch trains the top part from there: no decoding, no frozen forward pass (seed S3's
bottleneck features, for any top part).

Where to cut comes from one traced pass: the first unfrozen module to run takes the boundary, and the modules
that finished before it are the frozen part, replayed from the cache. A second pass proves the cut: the top part
run from the captured boundary must give the network's own features. A network where it does not (a skip
connection across the cut, arithmetic between modules) trains the uncached way, as does one whose cache would
not fit its budget; ``prepare`` says which in one line.

Views: without augmentation, one plain view per image. With it, ``views`` augmented views per training image
(no more than the epochs), view k drawn exactly as an uncached run draws epoch k (``images.SeededImages``), and
epoch e trains on view e mod ``views``: with as many views as epochs the cached run is the uncached one. Val is
one plain view.
"""
from __future__ import annotations

import itertools
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from featx import data as data_mod
from featx.finetuning import DEFAULT_VIEWS
from featx.devices import autocast, make_loader, overlapped
from featx.errors import FeatxError
from featx.extraction.runner import cache_attrs, distrusted, finish, to_compute, write_batches
from featx.identity import FeatureIdentity
from featx.extraction.images import SeededImages, collate, path_keys
from featx.extraction.network import Backbone
from featx.extraction.runtimes import embedding, onnx_model, resolve_runtime, sidecar
from featx.extraction.specs import Tap
from featx.extraction.store import MARGIN, ROW_STRINGS, FeatureStore, cache_path, open_h5, strings

DEFAULT_GB = 4.0  # --boundary-cache-gb
PART_BYTES = 64 << 20  # computed rows held in memory before they go to a part file
CHECKPOINT_SECONDS = 15.0


class Replay(nn.Module):
    """Stands in for a frozen module: returns the cached boundary, whatever it is given."""

    def __init__(self, boundary: torch.Tensor):
        super().__init__()
        self.boundary = boundary

    def forward(self, *_args, **_kwargs) -> torch.Tensor:
        return self.boundary


@contextmanager
def replaying(model: nn.Module, names: list, boundary: torch.Tensor):
    """``model`` with the named modules swapped for ``Replay(boundary)``, put back on leaving."""
    replay, swapped = Replay(boundary), []
    try:
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            swapped.append((owner, child, owner.get_submodule(child)))
            setattr(owner, child, replay)
        yield model
    finally:
        for owner, child, module in swapped:
            setattr(owner, child, module)


@dataclass
class Cut:
    """Where a backbone is cut: ``module``, the first unfrozen module to run, receives the boundary; ``frozen``,
    the modules that finished before it, are replayed from the cache. ``module`` None: nothing is unfrozen and
    the boundary is the backbone's features themselves."""

    module: str | None
    frozen: list = field(default_factory=list)

    def capture(self, net: Backbone, images: torch.Tensor) -> torch.Tensor:
        """The boundary of uint8 images: what the frozen part computes."""
        return net(images) if self.module is None else net.input_of(self.module, images)

    def resume(self, net: Backbone, boundary: torch.Tensor) -> torch.Tensor:
        """The features, from the boundary through the top part only."""
        if self.module is None:
            return boundary
        with replaying(net.model, self.frozen, boundary):
            return net(boundary)


def find_cut(net: Backbone, unfrozen) -> Cut | str:
    """Where to cut ``net`` when ``unfrozen(module name)`` says which modules train, or why it cannot be cut."""
    size = net.preprocess.input_size
    probe = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(net.mean.device)
    was_training = net.training
    net.eval()
    try:
        started, finished, whole = traced(net, probe)
        trained = [n for n in started if unfrozen(n)]
        if not trained:
            return "the unfrozen blocks do not run before the features are taken"
        first = min(trained, key=started.get)
        done = {n for n, t in finished.items() if t < started[first]}
        frozen = sorted((n for n in done if n.rpartition(".")[0] not in done), key=started.get)
        if not frozen:
            return "nothing below the unfrozen blocks is frozen"
        cut = Cut(first, frozen)
        try:
            with torch.no_grad():
                again = cut.resume(net, cut.capture(net, probe))
            same = again.shape == whole.shape and \
                float((again - whole).abs().max()) <= 1e-4 * float(whole.abs().max()) + 1e-6
        except Exception:  # noqa: BLE001 - any failure of the replayed network means the cut is not clean
            same = False
        return cut if same else f"the features are not a function of what {first} receives alone"
    finally:
        net.train(was_training)


def traced(net: Backbone, images: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """One forward pass that stamps when each module starts and finishes: (starts, ends, the features)."""
    started, finished, clock, hooks = {}, {}, itertools.count(), []

    def stamp(times: dict, name: str, *_) -> None:  # a hook that returned a value would replace the input
        times.setdefault(name, next(clock))

    for name, module in net.model.named_modules():
        if name:
            hooks += [module.register_forward_pre_hook(partial(stamp, started, name)),
                      module.register_forward_hook(partial(stamp, finished, name))]
    try:
        with torch.no_grad():
            return started, finished, net(images)
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class Recipe:
    """One boundary cache file: a view of some images. ``draw`` seeds its augmentation (``SeededImages``)."""

    name: str  # "plain", or "<augment>-seed<S>-view<k>"
    paths: list  # relative paths it must hold
    transform: object
    draw: int = 0


class BoundaryCache:
    """The cached boundary, read back in training order: batches of (indices, boundary rows, failures) as a
    DataLoader over the images would give them, for ``run_epoch``."""

    def __init__(self, cut: Cut, shape: tuple, files: dict, train: list, plain: str | None, paths: dict,
                 info: dict):
        self.cut, self.shape, self.train, self.plain, self.info = cut, shape, train, plain, info
        self.paths = paths  # split -> relative paths, indexed as the training run indexes them
        self.stack = ExitStack()
        self.files, self.rows = {}, {}
        for name, path in files.items():
            f = self.stack.enter_context(open_h5(path))
            self.files[name] = f
            self.rows[name] = {p: row for row, p in enumerate(strings(f["paths"]))}

    def close(self) -> None:
        self.stack.close()

    def batches(self, split: str, items, batch_size: int, drop_last: bool = False):
        """``items``: (epoch, index) pairs in training order (a sampler's), or None for the split in order.
        An image whose file could not be decoded has no row and is left out of its batch, as the loader does."""
        items = ((0, i) for i in range(len(self.paths[split]))) if items is None else iter(items)
        while True:
            batch = list(itertools.islice(items, batch_size))
            if not batch or drop_last and len(batch) < batch_size:
                return
            yield self.read(split, batch)

    def read(self, split: str, batch: list) -> tuple:
        wanted = []  # (file, row, index)
        for epoch, i in batch:
            name = self.train[epoch % len(self.train)] if split == "train" else self.plain
            row = self.rows[name].get(self.paths[split][i])
            if row is not None:
                wanted.append((name, row, i))
        if not wanted:
            return [], None, []
        out = np.empty((len(wanted), int(np.prod(self.shape))), dtype=self.files[wanted[0][0]]["features"].dtype)
        for name in {w[0] for w in wanted}:
            picks = sorted((row, position) for position, (n, row, _) in enumerate(wanted) if n == name)
            dataset = self.files[name]["features"]
            try:
                out[[p for _, p in picks]] = dataset[[r for r, _ in picks]]
            except OSError:
                raise FeatxError(f"{dataset.file.filename} is damaged (its rows fail their Fletcher-32 checksum): "
                                 "delete it, and run again with --resume; it is computed again") from None
        return [i for _, _, i in wanted], torch.from_numpy(out).view(len(wanted), *self.shape), []


def prepare(net: Backbone, cut: Cut | str, ds: data_mod.Dataset, paths: dict, augment: str, train_transform,
            views: int, epochs: int, seed: int, cache_dir, device: torch.device, batch_size: int, workers: int,
            limit_gb: float, runtime: str = "auto", progress: bool = True,
            build: bool = True) -> tuple[BoundaryCache | None, str]:
    """The boundary cache for ``paths`` (split -> relative paths; train and val are cached), brought up to date,
    and one line saying what was done: computed or read, with fewer views than asked, or not used and why (then
    None: every epoch runs the whole network). The frozen part runs as extraction runs a backbone: ``runtime``
    ``auto`` is ONNX Runtime on a CPU at fp32 (an export under ``cache_dir``/onnx), torch elsewhere.
    ``build=False`` only opens what another process (torchrun's rank 0, the one writer) has just built."""
    if isinstance(cut, str):
        return None, f"boundary cache not used: {cut}"
    net.eval()
    size = net.preprocess.input_size
    with torch.inference_mode(), autocast(device, net.precision):
        shape = tuple(cut.capture(net, torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)).shape[1:])
    dtype = np.dtype("float16" if net.precision == "fp16" else "float32")  # bf16 is not exact in fp16: fp32
    row_bytes = int(np.prod(shape)) * dtype.itemsize
    train, val = paths.get("train", []), paths.get("val", [])
    views = 1 if augment == "none" else min(views, epochs)  # epoch e trains on view e mod views: no more are used
    identity, folder = net.identity(), Path(cache_dir) / "boundary"

    def recipes(count: int) -> list[Recipe]:
        if augment == "none":
            return [Recipe("plain", train + val, net.preprocess.transform())]
        return [Recipe("plain", val, net.preprocess.transform())] * bool(val) + \
            [Recipe(f"{augment}-seed{seed}-view{k}", train, train_transform, k) for k in range(count)]

    def named(recipe: Recipe) -> FeatureIdentity:
        return replace(identity, layer=f"boundary:{cut.module or identity.layer}:{recipe.name}")

    def file(recipe: Recipe) -> Path:
        return cache_path(folder, ds.name, ds.root, named(recipe), dtype.name)

    # the budget in rows: --boundary-cache-gb, and the free disk (plus what this cache holds already), less one
    # file's worth, as each file briefly exists twice while its parts are merged, and less the margin and the
    # per-row strings every HDF5 write is checked for (``store.size_of``)
    there = sum(file(r).stat().st_size for r in recipes(views) if file(r).is_file())
    largest = max(len(r.paths) for r in recipes(1))
    disk = free_bytes(folder) + there
    on_disk = row_bytes + ROW_STRINGS + max(map(len, train + val), default=0)
    budget = min(limit_gb * 1e9 // row_bytes, (disk - MARGIN) // on_disk - largest)
    asked = views
    if len(train) * views + len(val) > budget:  # fewer views, if there are views to spare
        views = int(max(budget - len(val), 0) // max(len(train), 1)) if augment != "none" else 0
    least = 1 if augment == "none" else min(2, epochs)  # one view for several epochs would freeze the augmentation
    if views < least:
        need = row_bytes * (len(train) * least + len(val))
        written = on_disk * (need // row_bytes + largest) + MARGIN
        return None, (f"boundary cache not used: it needs {size_text(need)} ({size_text(written)} free while it "
                      f"is written), over the {limit_gb:g} GB of --boundary-cache-gb or the "
                      f"{size_text(disk)} free under {folder}: every epoch runs the whole network")
    started, computed, files = time.perf_counter(), 0, {}
    with frozen_part(net, cut) as part:
        frozen = cache(lambda: frozen_forward(part, device, runtime, cache_dir))  # made once some row needs it
        fingerprints = {p: data_mod.fingerprint(ds.root / p) for p in ds.paths} if build else {}
        kept = ds.without([p for p, s in zip(ds.paths, ds.splits) if s == "test"])  # what the files may hold
        for recipe in recipes(views):
            files[recipe.name] = file(recipe)
            if build:
                computed += fill(files[recipe.name], named(recipe), net, dtype, row_bytes, recipe, kept,
                                 fingerprints, seed, device, batch_size, workers, progress, frozen,
                                 Path(cache_dir) / "onnx")
    seconds = time.perf_counter() - started
    info = {"module": cut.module, "frozen": cut.frozen, "shape": list(shape), "dtype": dtype.name, "views": views,
            "files": [str(p) for p in files.values()], "bytes": sum(p.stat().st_size for p in files.values()),
            "rows_computed": computed, "seconds": round(seconds, 2),
            "img_per_s": round(computed / seconds, 2) if computed else None}
    fewer = f" (not {asked}: {asked} would not fit)" if views < asked else ""
    line = (f"boundary cache: the input of {cut.module or 'the head'}, {views} view{'s' * (views > 1)}{fewer}, "
            f"{info['bytes'] / 1e6:.0f} MB under {folder}, "
            + (f"{computed} rows computed in {seconds:.1f} s" if computed else "every row already there"))
    train_names = ["plain"] if augment == "none" else [n for n in files if n != "plain"]
    return BoundaryCache(cut, shape, files, train_names, "plain" if val else None, paths, info), line


def size_text(n: float) -> str:
    """Bytes in GB, or in MB below a tenth of a GB, so that a small figure is not shown as 0.00."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def free_bytes(folder: Path) -> int:
    """Free space where the cache goes (its nearest existing folder)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


@contextmanager
def frozen_part(net: Backbone, cut: Cut):
    """The frozen part as a network of its own over the same modules (no copy), whose one tap is the boundary,
    flattened: extraction's runtimes run it. Its hook is removed on leaving, so training never meets it."""
    if cut.module is None:  # the boundary is the features: the network itself
        yield net
        return
    tap = f"boundary:{cut.module}"
    spec = replace(net.spec, taps={**net.spec.taps, tap: Tap(cut.module, "input")})
    part = Backbone(spec, net.model, tap, net.preprocess, net.weights_id, net.weights_sha256)
    part.precision = net.precision
    try:
        yield part
    finally:
        part.remove_hooks()


def frozen_forward(part: Backbone, device: torch.device, runtime: str, cache_dir) -> tuple:
    """(forward pass from uint8 images to boundary rows, {ONNX export: SHA-256} it runs): on a CPU at fp32 a
    checked ONNX export of the frozen part, made once and kept under ``cache_dir``/onnx; torch elsewhere."""
    onnx = onnx_model(part, cache_dir) if resolve_runtime(runtime, device.type, part.precision) == "onnxruntime" \
        else None
    return embedding(part, device, onnx), {onnx.name: sidecar(onnx).read_text()} if onnx else {}


def fill(path: Path, identity: FeatureIdentity, net: Backbone, dtype: np.dtype, row_bytes: int, recipe: Recipe,
         kept: data_mod.Dataset, fingerprints: dict, seed: int, device: torch.device, batch_size: int, workers: int,
         progress: bool, frozen, onnx_dir: Path) -> int:
    """Bring one cache file up to date with ``recipe``: compute the rows it lacks with ``frozen()``'s forward
    pass (written in parts as they come, so a killed run keeps them), then merge. Rows of ``kept``'s other images
    already there stay, for the next run that needs them. Returns the rows computed."""
    with FeatureStore(path, dtype.name, chunk_rows=1) as store:
        index = store.index()
        todo = to_compute(index, recipe.paths, fingerprints, distrusted(index, onnx_dir, path))
        if todo:
            store.check_writable(len(todo))
            forward, store.exports = frozen()
            size = net.preprocess.input_size
            images = SeededImages([kept.root / p for p in todo], recipe.transform, net.preprocess.resize_size, seed,
                                  path_keys(todo))
            loader = make_loader(images, device, batch_size, workers, collate, 3 * size * size,
                                 sampler=[(recipe.draw, i) for i in range(len(todo))])
            with tqdm(total=len(todo), unit="img", desc=f"boundary {recipe.name}", file=sys.stderr,
                      disable=not progress, dynamic_ncols=True) as bar:
                write_batches([(store, set(todo))], None, boundary_rows(forward, loader, device, dtype, bar),
                              todo, fingerprints, max(1, PART_BYTES // row_bytes), CHECKPOINT_SECONDS)
        finish(store, kept, fingerprints, onnx_dir, lambda: {
            **cache_attrs(identity, net.preprocess, kept), "view": recipe.name})
    return len(todo)


def boundary_rows(forward, loader, device: torch.device, dtype: np.dtype, bar):
    """(indices, boundary rows, failures) per batch, as ``extraction.write_batches`` takes them."""
    with torch.inference_mode():
        for indices, images, failures in overlapped(loader, device):
            bar.update(len(indices) + len(failures))
            rows = np.zeros((0, 0), dtype) if images is None else forward(images).cpu().numpy().astype(dtype)
            yield indices, rows, failures
