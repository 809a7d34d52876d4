"""The HDF5 feature cache: one file per (dataset, backbone, weights, layer, preprocessing).

Crash safety comes from never editing a file in place. Extraction appends rows to small *part*
files, each written under a temporary name and renamed when complete; at the end of a run the main
file and its parts are merged, streaming, into a new main file that replaces the old one atomically.
A run killed at any moment therefore leaves only complete, openable files, and the next run reuses
every part it finds. A file lock keeps two writers of one cache apart.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from featx.errors import FeatxError, first_line
from featx import files
from featx.files import atomic_write
from featx.identity import FeatureIdentity

FORMAT = "featx-features-1"
INTEGRITY = 1  # files that record it carry checksums: one without them is damaged, not older
STR = h5py.string_dtype()
READABLE = 150  # characters of a cache file's readable name at most: with the digest and the longest suffix
# (".partNNNNNN.h5.tmpPID") it stays below the 255 bytes a file name may have
COPY_ROWS = 4096  # rows copied or checked at a time: bounds memory whatever the dataset size...
COPY_BYTES = 256 << 20  # ...and whatever the row width (a boundary cache's rows are feature maps)


def rows_at_once(dim: int, itemsize: int) -> int:
    """How many rows of ``dim`` values to hold in memory at once when copying or checking."""
    return max(1, min(COPY_ROWS, COPY_BYTES // max(1, dim * itemsize)))


def cache_path(cache_dir: str | os.PathLike, dataset: str, root: Path, identity: FeatureIdentity, dtype: str) -> Path:
    """A readable name plus a digest of everything that changes the rows: the feature identity, the
    storage dtype and the resolved dataset root (two folders called ``photos`` never share a file)."""
    readable = "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(p)) for p in
                         (dataset, identity.backbone, identity.layer))[:READABLE]
    return Path(cache_dir) / f"{readable}__{identity.digest(dtype=dtype, root=str(Path(root).resolve()))}.h5"


@dataclass
class Rows:
    """A batch of extracted rows in memory (one part file's worth at most)."""

    features: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    fingerprints: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, fingerprint, reason)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Features:
    """What fit-head and friends read from a cache file."""

    X: np.ndarray
    y: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    classes: list
    attrs: dict
    path: Path

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = self.splits == name
        return self.X[mask], self.y[mask], self.paths[mask]

    def split_names(self) -> list[str]:
        return [s for s in ("train", "val", "test") if (self.splits == s).any()]

    def identity(self) -> FeatureIdentity:
        return FeatureIdentity.from_mapping(self.attrs)


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise FeatxError(f"{path} is not a readable HDF5 feature cache ({first_line(exc)}): run 'featx extract' "
                         "again, which rebuilds it") from None


def read_features(dataset: h5py.Dataset, rows=slice(None)) -> np.ndarray:
    """Rows of a features array; a Fletcher-32 checksum failure (bytes changed on disk) is one line."""
    try:
        return dataset[rows]
    except OSError:
        raise FeatxError(f"{dataset.file.filename} is damaged (its features fail their Fletcher-32 checksum): "
                         "run 'featx extract' again, which rebuilds it") from None


def check_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a featx feature cache, else one line saying what to pass (reads attributes only)."""
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"feature cache {path} does not exist: run 'featx extract' first or check --features")
    if not h5py.is_hdf5(path):
        raise FeatxError(f"{path} is not a featx feature cache: pass the .h5 file featx extract wrote under cache/")
    with open_h5(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise FeatxError(f"{path} was not written by featx extract: pass a featx feature cache")
    return path


def load(path: str | os.PathLike) -> Features:
    """A cache file's rows, every dataset checked against its checksum first (one line when one fails)."""
    path = check_file(path)
    with open_h5(path) as f:
        damage = damaged(f, features=False)  # reading them below checks the features' Fletcher-32
        if damage:
            raise FeatxError(f"{path} is damaged ({damage}): run 'featx extract' again, which rebuilds it")
        attrs = {k: (v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return Features(
            X=read_features(f["features"]).astype(np.float32), y=f["labels"][:], paths=strings(f["paths"]),
            splits=strings(f["splits"]), classes=json.loads(attrs["classes"]), attrs=attrs, path=path)


CHECKSUMMED = ("labels", "paths", "splits", "fingerprints", "skipped/paths", "skipped/fingerprints", "skipped/reasons")


def encoded(values) -> np.ndarray:
    """Strings as UTF-8 bytes for an HDF5 string dataset, losslessly: a file name that is not valid UTF-8
    (Python holds its bytes as surrogates) keeps its bytes, and ``strings`` gives the same name back."""
    return np.asarray([v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for v in values], dtype=object)


def attribute(value):
    """An attribute value h5py can store: a string that is not UTF-8 (a dataset folder's name) as its bytes."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
    return value


def strings(dataset: h5py.Dataset) -> np.ndarray:
    """An HDF5 string dataset as Python strings, bytes that are not UTF-8 as surrogates (``encoded``)."""
    return dataset.asstr(errors="surrogateescape")[:]


def digest(values) -> str:
    """SHA-256 of a dataset's content: the bytes of a numeric array, or its strings joined by NUL."""
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        data = b"\0".join(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape")
                          for v in values.tolist())
    else:
        data = values.dtype.str.encode() + np.ascontiguousarray(values).tobytes()
    return hashlib.sha256(data).hexdigest()


def checksums(f: h5py.File) -> str:
    """The ``checksums`` attribute of a file just filled: a digest of every dataset but the features, which
    carry HDF5's own Fletcher-32 per chunk."""
    return json.dumps({name: digest(f[name][:]) for name in CHECKSUMMED if name in f})


def damaged(f: h5py.File, features: bool = True) -> str | None:
    """What in an open cache file fails its checksum (None when all pass): each dataset's digest, and, with
    ``features``, every chunk of the features (Fletcher-32). Files written before checksums were recorded
    (no ``integrity`` attribute) pass on the features'."""
    if "checksums" not in f.attrs:
        if f.attrs.get("integrity") is not None:
            return "its checksums attribute is missing"
        recorded = {}
    else:
        try:
            recorded = json.loads(f.attrs["checksums"])
        except (ValueError, TypeError):
            recorded = None
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            return "its checksums attribute is unreadable"
    for name, expected in recorded.items():
        if name not in f or digest(f[name][:]) != expected:
            return f"its {name} fail their checksum"
    rows = f["features"] if features else []
    step = rows_at_once(rows.shape[1], rows.dtype.itemsize) if features and rows.ndim == 2 else COPY_ROWS
    try:
        for start in range(0, len(rows), step):
            rows[start:start + step]
    except OSError:
        return "its features fail their Fletcher-32 checksum"
    return None


def part_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.part*.h5"))


def write_h5(path: Path, fill, needed: int) -> None:
    """Write an HDF5 file atomically: ``fill(f)`` writes its content, about ``needed`` bytes. The free
    space is checked first (HDF5 can crash the process on a full disk rather than raise), and a full or
    read-only disk met anyway is one line; the temporary file is removed either way."""
    folder = path.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FeatxError(no_room(folder, needed, free))
    try:
        with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
            fill(f)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FeatxError(no_room(folder, needed, shutil.disk_usage(folder).free)) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise FeatxError(read_only(folder)) from None
        raise


def no_room(folder: Path, needed: int, free: int) -> str:
    return files.no_room(folder, needed, free, "--cache-dir") + " (rows already written are kept and reused)"


def read_only(folder: Path, why: str = "") -> str:
    return f"the cache folder {folder} is not writable{why}: pass --cache-dir a writable folder (or make it writable)"


ROW_STRINGS = 96  # bytes a row's fingerprint and string overhead may take, beside its path
MARGIN = 1 << 20  # and a file's own


def size_of(rows: int, dim: int, itemsize: int, paths) -> int:
    """A generous estimate of an HDF5 file's size: features, path strings, fingerprints, overhead."""
    return rows * dim * itemsize + sum(len(p) + ROW_STRINGS for p in paths) + MARGIN


def write_rows(f: h5py.File, features, paths, fingerprints, skipped) -> None:
    f.create_dataset("features", data=features, fletcher32=features.size > 0)
    f.create_dataset("paths", data=encoded(paths), dtype=STR)
    f.create_dataset("fingerprints", data=encoded(fingerprints), dtype=STR)
    write_skipped(f, skipped)
    f.attrs.update({"checksums": checksums(f), "integrity": INTEGRITY})


def write_skipped(f: h5py.File, skipped) -> None:
    g = f.create_group("skipped")
    for i, name in enumerate(("paths", "fingerprints", "reasons")):
        g.create_dataset(name, data=encoded([s[i] for s in skipped]), dtype=STR)


@dataclass
class Index:
    """Which rows the cache already holds, across the main file and its parts."""

    sources: list  # (file, row count)
    rows: dict  # path -> (source number, row, fingerprint)
    skipped: dict  # path -> (fingerprint, reason)
    dim: int | None = None
    main_meta: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)  # source number -> {ONNX export file name: SHA-256} its rows came from


def read_into(index: Index, f: h5py.File, path: Path, main: bool) -> None:
    """Add one checked cache file's rows (and, for the main file, what ``finish`` compares) to ``index``;
    a later file's row of a path replaces an earlier one's."""
    if main:
        index.main_meta = {"paths": list(strings(f["paths"])), "labels": f["labels"][:],
                           "splits": list(strings(f["splits"])), "skipped": sorted(strings(f["skipped/paths"])),
                           "img_per_s": f.attrs.get("img_per_s"), "split_source": f.attrs.get("split_source"),
                           "checksummed": "checksums" in f.attrs}
    n = f["features"].shape[0]
    source = len(index.sources)
    index.sources.append((path, n))
    index.exports[source] = json.loads(f.attrs.get("onnx_exports", "{}"))
    if n:
        index.dim = f["features"].shape[1]
    for row, (p, fp) in enumerate(zip(strings(f["paths"]), strings(f["fingerprints"]))):
        index.rows[p] = (source, row, fp)
        index.skipped.pop(p, None)
    g = f["skipped"]
    for p, fp, reason in zip(*(strings(g[k]) for k in ("paths", "fingerprints", "reasons"))):
        index.skipped[p] = (fp, reason)
        index.rows.pop(p, None)


class FeatureStore:
    """Reads and grows one cache file; use as a context manager to hold its lock."""

    def __init__(self, path: str | os.PathLike, dtype: str = "float32", chunk_rows: int = 256):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.chunk_rows = chunk_rows  # rows per HDF5 chunk: 1 where rows are read one by one, in random order
        self.lock = FileLock(str(self.path) + ".lock")
        self.parts_written = 0
        self.writable = True
        self.exports: dict = {}  # the ONNX exports (file name: SHA-256) the rows written now come from

    def __enter__(self) -> "FeatureStore":
        """Take the write lock; in a folder featx cannot write to, read without it (``writable`` False),
        so an up-to-date cache stays usable, and any write then says which folder to change."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                print(f"featx: waiting for another featx process using {self.path}", file=sys.stderr)
                self.lock.acquire()
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            self.writable = False
            return self
        for stale in self.path.parent.glob(f"{self.path.name}*.tmp*"):
            stale.unlink(missing_ok=True)  # left by a killed run; we hold the lock, so nobody writes them
        return self

    def __exit__(self, *exc) -> None:
        if self.writable:
            self.lock.release()

    def check_writable(self, images: int) -> None:
        if not self.writable:
            why = f" and {images} images need extracting" if images else " and the cache needs updating"
            raise FeatxError(read_only(self.path.parent, why))

    def index(self) -> Index:
        """The rows the main file and its parts hold. Every file is checked against its checksums first; a
        damaged one is said in one line and removed (when the folder is writable), so its rows are computed
        again instead of served."""
        index = Index([], {}, {})
        for path in ([self.path] if self.path.is_file() else []) + part_files(self.path):
            try:
                f = h5py.File(path, "r")
            except OSError as exc:  # a featx-named file HDF5 cannot open: its header or superblock is damaged
                damage = f"HDF5 cannot open it: {first_line(exc)}"
            else:
                with f:
                    if path == self.path and f.attrs.get("format") != FORMAT:
                        raise FeatxError(f"{path} was not written by featx: move it out of the cache folder")
                    damage = damaged(f)
                    if not damage:
                        read_into(index, f, path, main=path == self.path)
            if damage:
                if not self.writable:
                    raise FeatxError(f"{path} is damaged ({damage}) and {path.parent} is not writable, so it cannot "
                                     "be rebuilt: make the folder writable, or pass --cache-dir elsewhere")
                print(f"featx: {path} is damaged ({damage}): removed; its rows are computed again",
                      file=sys.stderr)
                path.unlink()
        return index

    def write_part(self, rows: Rows) -> None:
        """Persist extracted rows now, so a kill after this point loses none of them."""
        existing = part_files(self.path)
        number = int(existing[-1].name.rsplit(".part", 1)[1][:-3]) + 1 if existing else 0
        features = np.asarray(rows.features, dtype=self.dtype) if rows.features else np.zeros((0, 0), self.dtype)

        def fill(f: h5py.File) -> None:
            write_rows(f, features, rows.paths, rows.fingerprints, rows.skipped)
            f.attrs["onnx_exports"] = json.dumps(self.exports)

        write_h5(self.path.with_name(f"{self.path.name}.part{number:06d}.h5"), fill,
                 size_of(*features.shape, self.dtype.itemsize, rows.paths + [s[0] for s in rows.skipped]))
        self.parts_written += 1

    def consolidate(self, order: list, labels: np.ndarray, splits: list, skipped: dict, attrs: dict) -> int:
        """Merge main file and parts into a new main file holding exactly ``order`` (paths), streaming.

        Labels and splits come from the current dataset scan, features from the cache.
        """
        index = self.index()
        dim = index.dim or 0
        n = len(order)

        def fill(f: h5py.File) -> None:
            feats = f.create_dataset("features", shape=(n, dim), dtype=self.dtype, fletcher32=bool(n and dim),
                                     chunks=(max(1, min(n, self.chunk_rows)), dim) if n and dim else None)
            handles, step = {}, rows_at_once(dim, self.dtype.itemsize)
            try:
                for start in range(0, n, step):
                    chunk = order[start:start + step]
                    block = np.empty((len(chunk), dim), dtype=self.dtype)
                    by_source: dict = {}
                    for i, p in enumerate(chunk):
                        source, row, _ = index.rows[p]
                        by_source.setdefault(source, []).append((row, i))
                    for source, pairs in by_source.items():
                        if source not in handles:
                            handles[source] = open_h5(index.sources[source][0])
                        pairs.sort()
                        rows_in = [r for r, _ in pairs]
                        block[[i for _, i in pairs]] = read_features(handles[source]["features"], rows_in)
                    feats[start:start + len(chunk)] = block
            finally:
                for h in handles.values():
                    h.close()
            f.create_dataset("labels", data=labels)
            f.create_dataset("paths", data=encoded(order), dtype=STR)
            f.create_dataset("splits", data=encoded(splits), dtype=STR)
            f.create_dataset("fingerprints", data=encoded([index.rows[p][2] for p in order]), dtype=STR)
            write_skipped(f, [(p, fp, reason) for p, (fp, reason) in sorted(skipped.items())])
            exports = {name: sha for source in {index.rows[p][0] for p in order} for name, sha in
                       index.exports[source].items()}
            f.attrs.update({**{k: attribute(v) for k, v in attrs.items()}, "format": FORMAT, "rows": n, "feature_dim": dim, "checksums": checksums(f),
                            "integrity": INTEGRITY, "onnx_exports": json.dumps(exports),
                            "dtype": self.dtype.name, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

        write_h5(self.path, fill, size_of(n, dim, self.dtype.itemsize, order))
        for part in part_files(self.path):
            part.unlink()
        return n
