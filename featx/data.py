"""Datasets: resolve a name or path to a folder of class folders, download registered ones, list
their images with labels and splits.

A dataset root holds ``train/``, ``val/``, ``test/`` (any of them) with one folder per class, or
class folders only; the latter gets a split by a seeded hash of each path, so every stage sees the
same one and adding files moves no other file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import FeatxError
from .files import file_digest

SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
SPLIT_SCHEME = "name-hash"  # hashed splits hash the path below the class folder ("hash" hashed the class too)
VAL_SEED = 1  # a different hash for carving val out of train, independent of the split hash
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a registered dataset comes from and how its archive unpacks."""

    name: str
    description: str
    url: str | None = None
    checksum: tuple[str, str] | None = None  # (algorithm, hex digest) of the archive
    archive_root: str | None = None  # folder inside the archive that becomes the dataset root
    expected_images: int | None = None  # checked after unpacking when no checksum is published
    train_per_class: int | None = None  # split policy for roots with class folders only
    manual: str | None = None  # how to get it where there is no public archive


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "hymenoptera", "ants vs bees, 245 train / 153 val (PyTorch transfer-learning tutorial)",
            url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
            archive_root="hymenoptera_data", expected_images=398),
        DatasetSpec(
            "cats_dogs", "Kaggle dogs-vs-cats subset, train/val/test per class (seed S3)",
            manual="download the Kaggle 'dogs-vs-cats' train.zip (needs a Kaggle account) and arrange "
                   "it as train/val/test/{cats,dogs}"),
        DatasetSpec(
            "hotdog", "1,400 hotdog + 1,400 other food images (d2l, seed S0)",
            url="http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
            checksum=("sha1", "fba480ffa8aa7e0febbb511d181409f899b9baa5"), archive_root="hotdog"),
        DatasetSpec(
            "pizza_steak_sushi", "Food-101 subset, ~75 train / ~25 test per class (seed S1)",
            url="https://github.com/mrdbourke/pytorch-deep-learning/raw/main/data/pizza_steak_sushi.zip",
            expected_images=300),
        DatasetSpec(
            "caltech256", "Caltech-256, 60 train images per class, rest val (seed S4)",
            url="https://data.caltech.edu/records/nyg1x-z6m67/files/256_ObjectCategories.tar",
            checksum=("md5", "67b4f42ca05d46448c6bb8ecd2220f6d"),
            archive_root="256_ObjectCategories", train_per_class=60),
        DatasetSpec("digits", "scikit-learn's bundled 8x8 handwritten digits, 1,797 images, offline"),
    ]
}


def default_data_root() -> Path:
    """Per-user folder for registered datasets, used when neither --data-root nor $FEATX_DATA is set."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "featx" / "data"


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("FEATX_DATA") or default_data_root()).expanduser()


@dataclass
class Dataset:
    """The images of one dataset: parallel lists of relative paths, class indices and splits."""

    name: str
    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    split_source: str  # "folders" or "name-hash:<seed>" (``hashed_split``)
    spec: DatasetSpec | None = None
    counts: dict = field(default_factory=dict)
    broken: list = field(default_factory=list)  # (relative path, reason): symlinks that lead nowhere

    def __len__(self) -> int:
        return len(self.paths)

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if s in set(self.splits)]

    def with_val_from_train(self, fraction: float) -> "Dataset":
        """A copy whose val split is a stable share of train (by path hash, as splits are), for data that
        has no val/; every class keeps at least one training image."""
        splits = list(self.splits)
        for c in range(len(self.classes)):
            rows = [i for i, s in enumerate(splits) if s == "train" and self.labels[i] == c]
            hashes = {i: unit_hash(self.name_in_class(i), seed=VAL_SEED) for i in rows}
            carved = [i for i in rows if hashes[i] < fraction]
            if len(carved) == len(rows) and rows:
                carved.remove(max(rows, key=hashes.get))
            for i in carved:
                splits[i] = "val"
        return replace(self, splits=splits, split_source=f"{self.split_source}+val:{fraction:g}")

    def name_in_class(self, i: int) -> str:
        """File ``i``'s path below its class folder: what hashed splits hash, so a renamed class keeps them."""
        return self.paths[i].split("/", 2 if self.split_source.startswith("folders") else 1)[-1]

    def without(self, excluded) -> "Dataset":
        """A copy without the files ``excluded`` names (paths relative to the root, e.g. from ``featx audit
        --write-exclude``); splits of the others do not move."""
        drop = set(excluded)
        keep = [i for i, p in enumerate(self.paths) if p not in drop]
        return replace(self, paths=[self.paths[i] for i in keep], labels=self.labels[keep],
                       splits=[self.splits[i] for i in keep])

    def subset(self, split: str) -> tuple[list[str], np.ndarray]:
        idx = [i for i, s in enumerate(self.splits) if s == split]
        return [self.paths[i] for i in idx], self.labels[idx]


def resolve(data: str | os.PathLike, root: str | os.PathLike | None = None,
            download: bool = True) -> tuple[str, Path, DatasetSpec | None]:
    """Turn ``--data`` into (name, folder, spec): an existing path wins, else a registered name."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path.resolve()
        return path.name, path, DATASETS.get(path.name)
    name = str(data)
    if name not in DATASETS:
        raise FeatxError(
            f"dataset '{data}' is neither a folder nor a registered name; "
            f"pass a folder of class folders or one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = (data_root(root) / name).resolve()
    if not folder.is_dir():
        if name == "digits":
            materialise_digits(folder)
        elif download:
            fetch(spec, folder)
        else:
            raise FeatxError(missing_message(spec, folder))
    return name, folder, spec


def missing_message(spec: DatasetSpec, folder: Path) -> str:
    how = spec.manual or f"download {spec.url} and unpack it there"
    return (f"dataset '{spec.name}' is not at {folder}: {how} "
            f"(or point --data-root / $FEATX_DATA at a folder that holds '{spec.name}/')")


def load(data: str | os.PathLike, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Resolve and list a dataset; errors name the folder and how to fix it. One class folder is a dataset
    too (to extract, or to evaluate a model on); what trains needs two, and says so."""
    name, folder, spec = resolve(data, root, download)
    return scan(folder, name=name, spec=spec)


def scan(folder: Path, name: str | None = None, spec: DatasetSpec | None = None) -> Dataset:
    folder = Path(folder)
    split_dirs = [s for s in SPLITS if (folder / s).is_dir()]
    broken: list = []
    seen = folders_seen(folder, split_dirs)
    if split_dirs:
        per_split = {s: class_files(folder / s, broken, f"{s}/", seen) for s in split_dirs}
        classes = sorted({c for files in per_split.values() for c in files})
        paths, labels, splits = [], [], []
        for s, files in per_split.items():
            for c, names in files.items():
                for n in names:
                    paths.append(f"{s}/{c}/{n}")
                    labels.append(classes.index(c))
                    splits.append(s)
        source = "folders"
    else:
        files = class_files(folder, broken, "", seen)
        classes = sorted(files)
        paths = [f"{c}/{n}" for c in classes for n in files[c]]
        labels = [classes.index(p.split("/", 1)[0]) for p in paths]
        splits = hashed_split([p.split("/", 1)[1] for p in paths], np.asarray(labels),
                              spec.train_per_class if spec else None)
        source = f"{SPLIT_SCHEME}:{SPLIT_SEED}"
    if not paths:
        raise FeatxError(f"no images under {folder}: expected train/, val/, test/ or class folders holding images")
    labels = np.asarray(labels, dtype=np.int64)
    counts = {s: {c: int(((labels == i) & (np.asarray(splits) == s)).sum()) for i, c in enumerate(classes)}
              for s in SPLITS if s in splits}
    return Dataset(name or folder.name, folder, classes, paths, labels, splits, source, spec, counts, broken)


def class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in listing(folder) if d.is_dir() and not d.name.startswith("."))


def folders_seen(root: Path, split_dirs: list) -> set:
    """The real paths of the dataset folder, its split folders and every class folder: a sub-folder that links
    to one of them (or to one read already) is not read again, so no image is listed twice, under another
    class or in another split."""
    parents = [root / s for s in split_dirs] or [root]
    return {os.path.realpath(p) for p in [root, *parents, *(d / c for d in parents for c in class_folders(d))]}


def class_files(folder: Path, broken: list, prefix: str, seen: set) -> dict[str, list[str]]:
    """Files per class folder, sub-folders included (as torchvision's ImageFolder reads them; hidden ones
    excluded), each as its path below the class folder; format is decided later, by content. Symbolic links
    that lead nowhere go to ``broken`` as (relative path, reason) instead of vanishing silently."""
    out = {}
    for c in class_folders(folder):
        names = files_below(folder / c, "", broken, f"{prefix}{c}/", seen)
        if not names:
            raise FeatxError(f"class folder {folder / c} is empty: add images or remove the folder")
        out[c] = names
    return out


def files_below(folder: Path, below: str, broken: list, prefix: str, seen: set) -> list[str]:
    """The files under ``folder`` as paths starting with ``below``, in sorted order; a sub-folder whose real
    path is in ``seen`` (a dataset, split or class folder, or one read already) is not read (again)."""
    names = []
    for f in sorted(listing(folder)):
        if f.name.startswith("."):
            continue
        if f.is_file():
            names.append(below + f.name)
        elif f.is_dir():
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                names += files_below(f, f"{below}{f.name}/", broken, prefix, seen)
        elif f.is_symlink() and not f.exists():
            broken.append((f"{prefix}{below}{f.name}", symlink_problem(f)))
    return names


def listing(folder: Path) -> list[Path]:
    """The entries of a folder, or one line naming it when it cannot be listed (permissions, I/O)."""
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise FeatxError(f"cannot list {folder} ({exc.strerror or exc}): make it readable (chmod u+rx) or move it "
                         "out of the dataset") from None


def symlink_problem(link: Path) -> str:
    try:
        os.stat(link)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop: the link leads back to itself"
    return f"dangling symlink: its target {os.readlink(link)} does not exist"


def unit_hash(key: str, seed: int = SPLIT_SEED) -> float:
    """A number in [0, 1) fixed by ``key`` and ``seed`` alone: the same on every machine and every run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def hashed_split(names: list[str], labels: np.ndarray, train_per_class: int | None = None,
                 seed: int = SPLIT_SEED) -> list[str]:
    """Train/val/test by a seeded hash of each file's path below its class folder, so adding or removing
    files never moves another file (a model fitted earlier is never tested on its own training images), and
    renaming or relabelling a class moves none either. The 70/15/15 fractions hold on average per class. With ``train_per_class`` (Caltech-256's
    fixed 60), the files with the smallest hashes train and the rest are val; a file added there can
    move at most one other file, the one it displaces from train."""
    u = np.asarray([unit_hash(n, seed) for n in names])
    if train_per_class is None:
        edges = np.cumsum([SPLIT_FRACTIONS["train"], SPLIT_FRACTIONS["val"]])
        return np.asarray(SPLITS)[np.searchsorted(edges, u, side="right")].tolist()
    splits = np.full(len(names), "val", dtype=object)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        splits[rows[np.argsort(u[rows])[:train_per_class]]] = "train"
    return splits.tolist()


VERIFY = ("stat", "content")


def fingerprint(path: Path, verify: str = "stat") -> str:
    """What says a file is unchanged since its row was cached. ``stat``: size, mtime, inode and ctime from
    one stat call, so files swapped with ``mv`` or rewritten with their old timestamp (unzip, tar,
    ``cp -p``, ``rsync -a``) are seen as changed. ``content``: size and SHA-256 of the bytes, for
    datasets copied around (a copy with the same content keeps its rows)."""
    st = path.stat()
    if verify == "content":
        return f"{st.st_size}-sha256:{file_digest(path)}"
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{st.st_ctime_ns}"


def materialise_digits(folder: Path) -> None:
    """Write sklearn's bundled digits as 8x8 grey PNGs in class folders (atomically)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        (tmp / str(target)).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(tmp / str(target) / f"{i:04d}.png")
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)


def fetch(spec: DatasetSpec, folder: Path) -> None:
    """Download, verify and unpack a registered dataset into ``folder``."""
    if spec.url is None:
        raise FeatxError(missing_message(spec, folder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    archive = folder.parent / Path(spec.url).name
    if not archive.exists():
        partial = archive.with_name(archive.name + ".partial")
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (urllib.error.URLError, OSError) as exc:
            partial.unlink(missing_ok=True)
            reason = getattr(exc, "reason", exc)
            raise FeatxError(f"could not download '{spec.name}' ({reason}); "
                             + missing_message(spec, folder)) from None
        os.replace(partial, archive)
    unpack(spec, archive, folder)


def unpack(spec: DatasetSpec, archive: Path, folder: Path) -> None:
    """Check the archive's checksum (or image count) and unpack it atomically into ``folder``."""
    if spec.checksum:
        algorithm, expected = spec.checksum
        actual = file_digest(archive, algorithm)
        if actual != expected:
            raise FeatxError(f"{archive} has {algorithm} {actual}, expected {expected}: "
                             "delete it and download again")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    root = tmp / spec.archive_root if spec.archive_root else tmp
    if not root.is_dir():
        raise FeatxError(f"{archive} has no '{spec.archive_root}/' folder: delete it and download again")
    if spec.expected_images is not None:
        found = sum(1 for p in root.rglob("*") if p.is_file())
        if found != spec.expected_images:
            raise FeatxError(f"{archive} unpacked to {found} files, expected {spec.expected_images}: "
                             "delete it and download again")
    os.replace(root, folder)
    shutil.rmtree(tmp, ignore_errors=True)


def write_exclude(path: str | os.PathLike, paths: list) -> None:
    """An ``--exclude`` FILE: ``paths`` one a line, a file name that is not UTF-8 with its own bytes."""
    Path(path).write_text("".join(f"{p}\n" for p in paths), errors="surrogateescape")


def catalogue(root: Path) -> list[dict]:
    """Each registered dataset: its name, what it is, whether it is under ``root``, and where it comes from."""
    return [{"name": s.name, "description": s.description, "present": (root / s.name).is_dir() or s.name == "digits",
             "path": str(root / s.name), "source": s.url or s.manual or "bundled with scikit-learn"}
            for s in DATASETS.values()]


def read_exclude(path: str | os.PathLike | None) -> list[str]:
    """The paths an ``--exclude`` FILE lists, one a line (blank lines and ``#`` comments ignored)."""
    if path is None:
        return []
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise FeatxError(f"--exclude {path} cannot be read ({exc.strerror or exc}): pass a text file with one "
                         "path a line, as featx audit --write-exclude writes it") from None
    if b"\0" in raw:
        raise FeatxError(f"--exclude {path} is not a text file (byte {raw.index(0)} is NUL): pass a text file with "
                         "one path a line, as featx audit --write-exclude writes it")
    lines = raw.decode("utf-8", "surrogateescape").splitlines()  # a file name that is not UTF-8 keeps its bytes
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def match_exclude(lines: list[str], paths, root: str | os.PathLike, option: str = "--exclude") -> list[str]:
    """The dataset paths (relative to ``root``) that ``--exclude`` lines name: relative to the dataset folder as
    ``featx audit --write-exclude`` writes them, absolute, or relative to the working folder. Lines that match no
    image are counted and warned about on stderr; a file where no line matches is an error naming its first line."""
    import sys

    if not lines:
        return []
    known, root = set(map(str, paths)), Path(root)
    roots = {root.absolute(), root.resolve()}
    matched, unmatched = set(), []

    def lookup(line: str) -> str | None:
        given = Path(line)
        if not given.is_absolute() and given.as_posix() in known:
            return given.as_posix()
        whole = Path(os.path.normpath(given if given.is_absolute() else Path.cwd() / given))
        for base in roots:
            if whole.is_relative_to(base) and whole.relative_to(base).as_posix() in known:
                return whole.relative_to(base).as_posix()
        return None

    for line in lines:
        found = lookup(line)
        if found is None:
            unmatched.append(line)
        else:
            matched.add(found)
    if not matched:
        raise FeatxError(f"{option}: none of its {len(lines)} lines names an image of {root} (the first: '{lines[0]}'):"
                         " list paths relative to the dataset folder (e.g. train/cats/1.jpg, as featx audit "
                         "--write-exclude writes them) or absolute ones")
    if unmatched:
        print(f"featx: warning: {len(unmatched)} of the {len(lines)} {option} lines match no image of {root} "
              f"(the first: '{unmatched[0]}'); they are ignored", file=sys.stderr)
    return sorted(matched)
