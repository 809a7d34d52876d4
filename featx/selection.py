"""Selection: which rows may score a hyper-parameter, and how probabilities are calibrated on them.

Few-shot data is the normal case here (1 to 9 images per class), so folds adapt: as many stratified
folds as the largest class allows (at most ``cv``), a class with one image is always trained on and
never scored, and when no class has two images nothing is scored and a documented default is used.
Every score, tie-break and calibration uses held-out rows only.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold

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


def tied(accuracy: list, n: int) -> list[int]:
    """Candidates whose held-out accuracy is within one standard error of the best (sqrt(p(1-p)/n) over
    ``n`` scored images): on 600 images, 0.985 and 0.982 are the same figure."""
    top = max(accuracy)
    tolerance = (top * (1 - top) / max(n, 1)) ** 0.5
    return [i for i, a in enumerate(accuracy) if a >= top - tolerance - 1e-12]


def best_index(accuracy: list, loss: list, n: int) -> int:
    """Among the candidates tied on held-out accuracy, the one with the lowest held-out loss (not the
    most regularised: that gives timid probabilities)."""
    return min(tied(accuracy, n), key=lambda i: loss[i])


def log_loss_of(proba: np.ndarray, codes: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(codes)), codes], 1e-15, 1.0)).mean())


def fit_sigmoid(decision: np.ndarray, positive: np.ndarray) -> float:
    """Platt scaling without intercept for one decision column: p = sigmoid(a * d), a fitted on held-out
    rows. Without an intercept p = 0.5 stays at d = 0, so probabilities and decisions agree on every
    label; a fit that would reverse the ranking (a <= 0) falls back to a = 1."""
    from sklearn.linear_model import LogisticRegression

    if positive.all() or not positive.any():
        return 1.0
    a = float(LogisticRegression(C=1e6, fit_intercept=False).fit(decision.reshape(-1, 1), positive).coef_[0, 0])
    return a if a > 0 else 1.0


def fit_temperature(decision: np.ndarray, codes: np.ndarray) -> float:
    """Temperature scaling for several decision columns: p = softmax(d / T), T fitted on held-out rows by
    log-loss. One T for all columns keeps the argmax of probabilities equal to that of the decisions."""
    from scipy.optimize import minimize_scalar
    from .solvers import softmax

    def nll(log_t: float) -> float:
        return log_loss_of(softmax(decision / np.exp(log_t)), codes)

    return float(np.exp(minimize_scalar(nll, bounds=(-7, 7), method="bounded").x))
