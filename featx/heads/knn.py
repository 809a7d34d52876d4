"""k nearest neighbours: L2-normalised features, cosine similarity, smoothed votes; k chosen on held-out rows."""
from __future__ import annotations

import numpy as np

from featx import threads
from featx.errors import FeatxError
from .base import Head
from .selection import Folds, best_index, edge_note, log_loss_of, make_folds
from .solvers import nearest_labels, normalise, vote

DEFAULT_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)
FALLBACK_K = 1  # used when no held-out row exists to select with
KNN_SMOOTHING = 1.0  # add-one smoothing of kNN votes when nothing is held out to fit it on


class KNNHead(Head):
    """L2-normalised features, cosine similarity, the k nearest training rows vote (scikit-learn's
    ``KNeighborsClassifier`` finds them); k chosen on held-out rows. Probabilities are the smoothed votes
    (votes + a) / (k + a x classes), a fitted on held-out votes by log-loss (1 when nothing is held out),
    so no class is ever given probability 0."""

    kind = "knn"
    preprocessing = "L2-normalise, cosine similarity"

    def __init__(self, ks=None, cv=5):
        self.ks, self.cv = ks, cv

    def fit(self, X, y):
        X, codes = self._fit_data(X, y)
        folds = make_folds(self.cv, codes)
        asked = sorted(self.ks or DEFAULT_KS)
        if folds:
            k, alpha = self._select(X, codes, asked, folds)
        else:
            if asked[0] > len(X):
                raise FeatxError(f"--k {asked[0]} is more than the {len(X)} training images: use --k {len(X)} or less")
            k, alpha = (asked[0] if len(asked) == 1 else FALLBACK_K), KNN_SMOOTHING
            self.selected_ = {"k": k, "cv_accuracy": None, "candidates": len(asked), **folds.describe()}
            self.held_out_ = self.held_out_right_ = None
        self.selected_["smoothing"] = alpha
        self.train_ = normalise(X)
        self.train_labels_ = codes.astype(np.int64)
        self.k_ = np.array([k])  # 1-d: safetensors keeps no 0-d arrays
        self.smoothing_ = np.array([alpha])
        return self

    def _select(self, X, codes, asked: list, folds: Folds) -> tuple[int, float]:
        """(k, smoothing) by ``best_index`` over held-out votes; a k larger than a fold's training part is not
        tried (said in ``selected_``), and a single ``--k`` that large is refused."""
        from sklearn.neighbors import KNeighborsClassifier

        limit = min(len(train) for train, _ in folds.pairs)
        ks = [k for k in asked if k <= limit]
        if not ks:
            raise FeatxError(f"--k {asked[0]} is more than the {limit} training images of the smallest "
                             f"cross-validation fold: use --k {limit} or less")
        votes = {k: np.zeros((len(X), len(self.classes_))) for k in ks}

        def neighbours_of(pair):  # one neighbour search per fold serves every k
            train, test = pair
            search = KNeighborsClassifier(n_neighbors=max(ks), algorithm="brute").fit(normalise(X[train]), codes[train])
            return codes[train][search.kneighbors(normalise(X[test]), return_distance=False)]

        for (_, test), neighbours in zip(folds.pairs, threads.side_by_side(neighbours_of, folds.pairs)):
            for k in ks:
                votes[k][test] = vote(neighbours[:, :k], len(self.classes_))
        scored = codes[folds.scored]
        scores, losses, alphas = [], [], []
        for k in ks:
            held = votes[k][folds.scored]
            alphas.append(fit_smoothing(held, scored, k))
            scores.append(float((held.argmax(1) == scored).mean()))
            losses.append(log_loss_of(smoothed(held, k, alphas[-1]), scored))
        best = best_index(scores, losses, len(scored))
        self.selected_ = {"k": ks[best], "cv_accuracy": scores[best], "cv_log_loss": losses[best],
                          "candidates": len(ks), **folds.describe()}
        self.held_out_ = (np.flatnonzero(folds.scored), smoothed(votes[ks[best]][folds.scored], ks[best], alphas[best]))
        self.held_out_right_ = votes[ks[best]][folds.scored].argmax(1) == scored
        if len(ks) < len(asked):
            self.selected_["warnings"] = [f"k above {limit} not tried: a cross-validation fold trains on {limit} images"]
        if note := edge_note("k", best, ks, floor=1):
            self.selected_["edge"] = note
        return ks[best], alphas[best]

    def predict_proba(self, X) -> np.ndarray:
        X = self._data(X, np.float32)
        k = int(self.k_[0])
        neighbours = nearest_labels(normalise(X), self.train_, self.train_labels_, k)
        alpha = float(self.smoothing_[0]) if hasattr(self, "smoothing_") else 0.0  # files before smoothing: 0
        return smoothed(vote(neighbours, len(self.classes_)), k, alpha)

    def to_torch(self):
        raise FeatxError("a knn head does not export: its training features and vote are not a network; export a "
                         "logreg, svm or mlp model instead")

    def arrays(self) -> dict:
        return {"train": self.train_, "train_labels": self.train_labels_, "k": self.k_, "smoothing": self.smoothing_}


def smoothed(votes: np.ndarray, k: int, alpha: float) -> np.ndarray:
    return (votes + alpha) / (k + alpha * votes.shape[1])


def fit_smoothing(votes: np.ndarray, codes: np.ndarray, k: int) -> float:
    """The vote smoothing with the lowest log-loss on held-out votes, between 1e-4 and 100."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_a: log_loss_of(smoothed(votes, k, np.exp(log_a)), codes),
                            bounds=(np.log(1e-4), np.log(100.0)), method="bounded")
    return float(np.exp(found.x))
