"""What logreg and svm share: standardised features -> one linear layer, C chosen along a warm-started path.

The fit is three named steps: ``_select`` C on held-out rows (``selection.make_folds``, each fold standardised
on its own training part), ``_refit`` on all rows, ``_finish`` (the svm calibrates). Each subclass says how a fold
is solved along C, how held-out decisions become probabilities, and how its margins become logits
(``calibration``: one affine map, used by the numpy prediction and folded into the torch layer alike).
"""
from __future__ import annotations

import warnings

import numpy as np

from featx import threads
from .base import Head, check_class_weight, class_weights
from .selection import Folds, best_index, edge_note, log_loss_of, make_folds
from .solvers import sigmoid_pair, softmax

DEFAULT_CS = np.logspace(-6, 4, 21)  # the linear-probe literature's sweep, 21 log-spaced values
FALLBACK_C = 1.0  # used when no held-out row exists to select with
PATH_PATIENCE = 5  # stop the C path once the chosen C and the lowest held-out loss are this many values behind


class LinearHead(Head):
    """The shared base of ``LogRegHead`` and ``SVMHead``. ``class_weight`` is scikit-learn's."""

    preprocessing = "standardise"
    unconverged_means = ""

    def __init__(self, Cs=None, cv=5, class_weight: str | dict | None = None):
        self.Cs, self.cv, self.class_weight = Cs, cv, class_weight

    def fit(self, X, y):
        from sklearn.exceptions import ConvergenceWarning

        X, codes = self._fit_data(X, y)
        check_class_weight(self.class_weight)
        Cs = np.sort(DEFAULT_CS if self.Cs is None else np.asarray(self.Cs, dtype=float).ravel())
        folds = make_folds(self.cv, codes)
        unconverged = []  # one entry per fit left short of its tolerance
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            C, held_out = self._select(X, codes, Cs, folds, unconverged)
            with threads.limited(threads.for_fit(self.kind, *X.shape, len(self.classes_))):
                self._refit(X, codes, C, unconverged)
            self.selected_["fits"] += 1
        unconverged = len(unconverged) + sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if unconverged:
            self.selected_["warnings"] = [f"{unconverged} of {self.selected_['fits']} fits stopped at their iteration "
                                          f"limit before converging ({self.unconverged_means})"]
        self._finish(held_out, codes[folds.scored] if folds else None, self._class_weights(codes))
        return self

    def _select(self, X, codes: np.ndarray, Cs: np.ndarray, folds: Folds,
                unconverged: list) -> tuple[float, np.ndarray | None]:
        """(C, held-out decisions at C): the C path from the most to the least regularised, warm-started per
        fold, scored by ``best_index``; without held-out rows the one C given, else ``FALLBACK_C``."""
        self.selected_ = {"candidates": len(Cs), "fits": 0, **folds.describe()}
        if not folds:
            C = float(Cs[0]) if len(Cs) == 1 else FALLBACK_C
            self.selected_ |= {"C": C, "cv_accuracy": None}
            self.held_out_ = self.held_out_right_ = None
            return C, None
        paths = threads.side_by_side(lambda pair: self._fold_path(X[pair[0]], codes[pair[0]], X[pair[1]], unconverged),
                                     folds.pairs)
        scored, class_weight = codes[folds.scored], self._class_weights(codes)
        scores, losses, decisions, probas = [], [], [], []
        for C in Cs:
            held = self._held_out(paths, folds, len(X), lambda path: path(C))
            proba, right, loss = self._scored(held, scored, class_weight)
            scores.append(float(right.mean()))
            losses.append(loss)
            decisions.append(held)
            probas.append((proba, right))
            best = best_index(scores, losses, len(scored))
            if min(len(scores) - 1 - best, len(scores) - 1 - int(np.argmin(losses))) >= PATH_PATIENCE:
                break
        self.selected_["fits"] = len(scores) * len(paths)
        C = float(Cs[best])
        if (polished := self._polish(C, paths, folds, len(X))) is not None:
            decisions[best] = polished
            proba, right, losses[best] = self._scored(polished, scored, class_weight)
            scores[best], probas[best] = float(right.mean()), (proba, right)
            self.selected_["fits"] += len(paths)
        self.selected_ |= {"C": C, "cv_accuracy": scores[best], "cv_log_loss": losses[best], "evaluated": len(scores)}
        proba, self.held_out_right_ = probas[best]
        self.held_out_ = (np.flatnonzero(folds.scored), self._handed_on(decisions[best], proba, scored, class_weight))
        if note := edge_note("C", best, list(Cs)):
            self.selected_["edge"] = note
        return C, decisions[best]

    def _held_out(self, paths: list, folds: Folds, n: int, solve) -> np.ndarray:
        """The scored rows' decisions, each from the fold model that did not see it (``solve(path)``)."""
        held = np.zeros((n, self._columns()))
        for (_, test), part in zip(folds.pairs, threads.side_by_side(solve, paths)):
            held[test] = part
        return held[folds.scored]

    def _scored(self, held: np.ndarray, scored: np.ndarray, class_weight) -> tuple[np.ndarray, np.ndarray, float]:
        """(probabilities, which rows are right, log-loss) of held-out decisions at one C."""
        proba = self._held_out_proba(held, scored, class_weight)
        return proba, self._predicted(self._labelled_by(held, proba)) == scored, log_loss_of(proba, scored)

    def _columns(self) -> int:
        return 1 if len(self.classes_) == 2 else len(self.classes_)

    def _class_weights(self, codes: np.ndarray) -> np.ndarray | None:
        return class_weights(self.class_weight, codes, list(self.classes_))

    @staticmethod
    def _predicted(values: np.ndarray) -> np.ndarray:
        """Class codes from decision values or probabilities: the sign of a single column, else the argmax."""
        return (values[:, 0] > 0).astype(int) if values.shape[1] == 1 else values.argmax(1)

    # --- what each linear head says for itself
    def _fold_path(self, X_train, codes_train, X_test, unconverged: list):
        """A function of C (and the head's own precision: the svm's gap, logreg's tolerance) -> held-out decision
        values of this fold's model at C, warm-started from the last C."""
        raise NotImplementedError

    def _held_out_proba(self, decision: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        raise NotImplementedError

    def _labelled_by(self, decision: np.ndarray, proba: np.ndarray) -> np.ndarray:
        """What ``cv_accuracy`` reads labels from: the probabilities, unless a head says otherwise."""
        return proba

    def _polish(self, C: float, paths: list, folds: Folds, n: int) -> np.ndarray | None:
        """The chosen C's held-out decisions solved again more tightly, or None when the scoring fits suffice."""
        return None

    def _handed_on(self, decision: np.ndarray, proba: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        """The held-out probabilities ``held_out_`` hands on (to the audit, the tap choice)."""
        return proba

    def _refit(self, X, codes: np.ndarray, C: float, unconverged: list) -> None:
        """Sets ``mean_``, ``scale_``, ``coef_`` and ``intercept_`` from a fit on every row at C."""
        raise NotImplementedError

    def _finish(self, decision: np.ndarray | None, codes: np.ndarray | None, class_weight) -> None:
        """After the refit (the svm calibrates on the held-out decisions)."""

    def calibration(self) -> tuple[float, float]:
        """(slope, offset): the head's logits are slope * margins + offset (logreg: its margins are its logits)."""
        return 1.0, 0.0

    # --- prediction: numpy and torch from the same arrays
    def margins(self, X) -> np.ndarray:
        """The linear decision values, one column per class or one for two classes (for svm, what
        ``LinearSVC.decision_function`` gives)."""
        return ((self._data(X) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def logits(self, X) -> np.ndarray:
        z = self.margins(X)  # checks fitting and input first
        slope, offset = self.calibration()
        return slope * z + offset

    def decision_function(self, X) -> np.ndarray:
        """Log-odds that agree with ``predict``, in scikit-learn's shape (1-D for two classes, positive
        favours ``classes_[1]``): logreg's logits; the svm's calibrated ones (its margins are ``margins``)."""
        z = self.logits(X)
        if len(self.classes_) == 2:
            return z[:, 0] if z.shape[1] == 1 else z[:, 1] - z[:, 0]
        return z

    def predict_proba(self, X) -> np.ndarray:
        return logit_proba(self.logits(X))

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) with standardisation and calibration folded in: softmax(x @ W.T + b) is ``predict_proba``
        (one logit column becomes two with the same difference)."""
        slope, offset = self.calibration()
        W = slope * self.coef_ / self.scale_
        b = slope * self.intercept_ - W @ self.mean_ + offset
        if W.shape[0] == 1:
            W, b = np.vstack([-W / 2, W / 2]), np.r_[-b / 2, b / 2]
        return W, b

    def torch_logits(self, dtype=None):
        """One ``nn.Linear`` from raw features to the head's logits (the fine-tuning warm start trains it)."""
        import torch

        from .torch_forms import linear_layer

        return linear_layer(*self.folded(), dtype or torch.float32)

    def to_torch(self):
        import torch

        from .torch_forms import probabilities

        return probabilities(self.torch_logits(torch.float64))

    def arrays(self) -> dict:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_}


def logit_proba(z: np.ndarray) -> np.ndarray:
    """Probabilities from logits: the sigmoid pair of a single column, else the softmax."""
    return sigmoid_pair(z) if z.shape[1] == 1 else softmax(z)
