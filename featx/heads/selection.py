"""Selection: which rows may score a hyper-parameter, and how probabilities are calibrated on them.

Few-shot data is the normal case here (1 to 9 images per class), so folds adapt: as many stratified
folds as the largest class allows (at most ``cv``), a class with one image is always trained on and
never scored, and when no class has two images nothing is scored and a documented default is used.
Every score, tie-break and calibration uses held-out rows only.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold

from featx import threads

SEED = 0


class Folds:
    """(train, test) index pairs, the rows they score, and the classes that cannot be scored."""

    def __init__(self, pairs: list, n: int, unscored_classes: list, how: str):
        self.pairs, self.unscored_classes, self.how = pairs, unscored_classes, how
        self.scored = np.zeros(n, bool)
        for _, test in pairs:
            self.scored[test] = True

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def describe(self) -> dict:
        return {"selection": self.how, "scored_rows": int(self.scored.sum()),
                "unscored_classes": [int(c) for c in self.unscored_classes]}


def make_folds(cv, codes: np.ndarray) -> Folds:
    """``cv`` is a fold count, or an object with ``split`` (e.g. a ``PredefinedSplit`` for a val split)."""
    n = len(codes)
    if not isinstance(cv, int):
        return Folds([(tr, te) for tr, te in cv.split(np.zeros((n, 1)), codes)], n, [], "val split")
    counts = np.bincount(codes)
    singles = np.flatnonzero(counts == 1)
    always = np.flatnonzero(np.isin(codes, singles))
    scorable = np.flatnonzero(~np.isin(codes, singles))
    if cv < 2 or len(scorable) == 0:
        return Folds([], n, singles.tolist(), "none: no class has two training images, so nothing can be scored")
    k = int(min(cv, counts.max()))
    with warnings.catch_warnings():  # classes smaller than k are fine: they are scored in fewer folds
        warnings.filterwarnings("ignore", message="The least populated class")
        split = StratifiedKFold(k, shuffle=True, random_state=SEED).split(scorable, codes[scorable])
        pairs = [(np.sort(np.r_[scorable[tr], always]), scorable[te]) for tr, te in split]
    return Folds(pairs, n, singles.tolist(), f"{k}-fold stratified cross-validation on train")


def holdout(cv, codes: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, held-out rows, how) for early stopping: ``cv``'s val rows when it is a split object,
    else a seeded stratified share that leaves every class at least one training image."""
    n = len(codes)
    if not isinstance(cv, int):
        (train, test), = cv.split(np.zeros((n, 1)), codes)
        return train, test, "val split"
    rng = np.random.default_rng(SEED)
    held = []
    for c in np.unique(codes):
        rows = rng.permutation(np.flatnonzero(codes == c))
        held += rows[:min(len(rows) - 1, round(len(rows) * fraction))].tolist()
    held = np.sort(np.asarray(held, dtype=int))
    how = f"{len(held)} held-out train images ({fraction:.0%} per class)" if len(held) else \
        "none: classes too small to hold any image out"
    return np.setdiff1d(np.arange(n), held), held, how


def best_index(accuracy: list, loss: list, n: int) -> int:
    """The documented rule: candidates whose mean held-out accuracy is within one standard error of the
    best (sqrt(p(1-p)/n) over the ``n`` scored images: on 600 images 0.983 and 0.982 are the same figure)
    tie, and the tie goes to the lowest held-out log-loss (a proper score; the most regularised candidate
    would give timid probabilities), then to the first candidate."""
    top = max(accuracy)
    tolerance = (top * (1 - top) / max(n, 1)) ** 0.5 + 1e-12
    return min((i for i, a in enumerate(accuracy) if a >= top - tolerance), key=lambda i: (loss[i], i))


def edge_note(name: str, index: int, candidates: list, floor=None) -> str | None:
    """A warning when the chosen value is the smallest or largest of several tried: the best may lie beyond
    (not below ``floor``, the smallest value there is, such as k = 1)."""
    if len(candidates) < 2 or 0 < index < len(candidates) - 1 or candidates[index] == floor:
        return None
    return f"{name} at the {'smallest' if index == 0 else 'largest'} value tried ({candidates[index]:g})"


def log_loss_of(proba: np.ndarray, codes: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(codes)), codes], 1e-15, 1.0)).mean())


class HeldOutDecisions(ClassifierMixin, BaseEstimator):
    """A fitted classifier whose decision values are its input: lets scikit-learn's
    ``CalibratedClassifierCV`` calibrate decisions that were computed on held-out rows."""

    def __init__(self, n_classes: int = 2):
        self.n_classes = n_classes
        self.classes_ = np.arange(n_classes)

    def fit(self, X, y=None):
        return self

    def decision_function(self, X):
        X = np.asarray(X, dtype=np.float64)
        return X[:, 0] if X.shape[1] == 1 else X

    def predict(self, X):
        z = self.decision_function(X)
        return (z > 0).astype(int) if z.ndim == 1 else z.argmax(1)


def calibrate(decision: np.ndarray, codes: np.ndarray, n_classes: int, class_weight: np.ndarray | None = None) -> dict:
    """scikit-learn's calibration of held-out decision values: Platt's sigmoid (slope and intercept) for one
    decision column, temperature scaling for several. ``class_weight`` (one per class) weighs the rows as the
    fit weighed them, so calibration keeps the prior that ``--class-weight`` asked for. Returns the arrays
    the SVM head predicts with."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    method = "sigmoid" if decision.shape[1] == 1 else "temperature"
    # one weightless row per class keeps scikit-learn's label encoding equal to the decision columns when
    # some class has no held-out row (a class with one image is never scored)
    decision = np.vstack([decision, np.zeros((n_classes, decision.shape[1]))])
    weights = np.r_[np.ones(len(codes)) if class_weight is None else class_weight[codes], np.zeros(n_classes)]
    # one BLAS thread: scipy's L-BFGS-B on a two-parameter problem ran 5x slower on two threads than on one
    # (``threads.limited``: threadpoolctl's kept controller; a fresh ``threadpool_limits`` scan took 5 ms a call)
    with warnings.catch_warnings(), threads.limited(1):
        warnings.filterwarnings("ignore", message=".*sample weights will only be used for the calibration")
        everything = [(np.arange(len(weights)), np.arange(len(weights)))]  # one "fold": it only replays decisions
        fitted = CalibratedClassifierCV(FrozenEstimator(HeldOutDecisions(n_classes)), method=method, cv=everything).fit(
            decision, np.r_[codes, np.arange(n_classes)], sample_weight=weights)
    calibrator = fitted.calibrated_classifiers_[0].calibrators[0]
    if method == "sigmoid":
        return {"calib_a": np.array([float(calibrator.a_)]), "calib_b": np.array([float(calibrator.b_)])}
    return {"temperature": np.array([1.0 / float(calibrator.beta_)])}


def wilson(accuracy: float, n: int) -> list:
    """The 95% Wilson score interval of an accuracy measured on ``n`` images (scipy's)."""
    from scipy.stats import binomtest

    interval = binomtest(int(round(accuracy * n)), n).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def paired_comparison(leader: np.ndarray, other: np.ndarray) -> dict:
    """Two classifiers right or wrong on the same rows: ``other`` minus ``leader`` in accuracy, with McNemar's
    exact test. Only the discordant rows (one right, the other wrong) carry information; given their number m,
    the count that only ``other`` gets right is binomial(m, 1/2) when the two are equally accurate, so the
    p-value is that binomial test's, and the 95% interval of the difference, m / n * (2 pi - 1), comes from the
    Clopper-Pearson interval of pi, the share of discordant rows ``other`` wins. No discordant row: a
    difference of 0, [0, 0]. Far narrower than two separate intervals when the classifiers err on the same
    images, and exact for the small n of few-shot data (a normal interval is not)."""
    from scipy.stats import binomtest

    leader, other = np.asarray(leader, bool), np.asarray(other, bool)
    n = len(leader)
    only_other, only_leader = int(np.sum(other & ~leader)), int(np.sum(leader & ~other))
    discordant = only_other + only_leader
    if discordant == 0:
        return {"margin": 0.0, "interval95": [0.0, 0.0], "p_value": 1.0, "discordant": 0, "told_apart": False}
    test = binomtest(only_other, discordant, 0.5)
    low, high = test.proportion_ci(0.95, method="exact")
    interval = [discordant / n * (2 * low - 1), discordant / n * (2 * high - 1)]
    return {"margin": (only_other - only_leader) / n, "interval95": interval, "p_value": float(test.pvalue),
            "discordant": discordant, "told_apart": bool(interval[0] > 0 or interval[1] < 0)}


def choose_tap(layers: list, heads: list) -> tuple[int, dict]:
    """Which of several taps' heads (fitted on the same training rows, in ``layers``' network order) to keep, by
    the rule ``best_index`` applies to C and k: taps whose held-out accuracy (``Head.held_out_right_``: the rows
    that chose each head's C or k, the same rows for every tap, as their folds depend on the labels only) is within one standard error of the best tie, and the tie goes to the later tap
    (the deeper features, the usual choice). The record holds every tap's accuracy with its Wilson interval,
    and the kept tap's margin over the last tap (over the best other when the last is kept) with its paired
    interval (``paired_comparison``). Without held-out rows the last tap is kept and the record says why. Returns (index, record)."""
    held = [head.held_out_ for head in heads]
    if any(h is None for h in held):
        last = len(layers) - 1
        return last, {"layer": layers[last], "layer_selection": "none: nothing held out to compare taps on, so "
                      "the last one", "layers": [{"layer": name} for name in layers]}
    correct = [dict(zip(rows.tolist(), head.held_out_right_)) for head, (rows, _) in zip(heads, held)]
    common = sorted(set.intersection(*(set(c) for c in correct)))  # every tap ranked on the same rows
    correct = [{r: c[r] for r in common} for c in correct]
    accuracy = [float(np.mean(list(c.values()))) for c in correct]
    best = best_index(accuracy, [-i for i in range(len(layers))], len(common))  # a tie goes to the later tap
    other = len(layers) - 1 if best != len(layers) - 1 else \
        max(range(len(layers) - 1), key=lambda i: (accuracy[i], i))
    paired = paired_comparison(np.array([correct[other][r] for r in common]),
                               np.array([correct[best][r] for r in common]))
    return best, {
        "layer": layers[best], "layer_selection": "held-out accuracy: the later of the taps within one standard "
                                                  "error of the best",
        "layers": [{"layer": name, "accuracy": a, "interval95": wilson(a, len(c)), "scored_rows": len(c),
                    "chosen": i == best} for i, (name, a, c) in enumerate(zip(layers, accuracy, correct))],
        "layer_margin": {"over": layers[other], "margin": paired["margin"], "interval95": paired["interval95"],
                         "rows": len(common), "told_apart": paired["interval95"][0] > 0}}
