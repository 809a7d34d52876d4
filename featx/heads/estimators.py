"""Heads, stage 2: classifiers on cached features: linear SVM, logistic regression, kNN and a small torch MLP.

Each head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba``) whose model
selection cannot leak: preprocessing is fitted inside each cross-validation fold, and ``cv`` may be a
``PredefinedSplit`` to select on a validation split instead. The numbers are scikit-learn's: ``logreg`` is
``LogisticRegression`` (warm-started along the C path) after ``StandardScaler``; ``svm`` solves
``LinearSVC``'s objective (``solvers.SquaredHinge``, faster on many classes) and is calibrated by
``CalibratedClassifierCV`` on held-out decisions; ``knn`` takes its neighbours from ``KNeighborsClassifier``
on L2-normalised rows. Selection is one rule for every head (``selection.best_index``).
After fitting, a head keeps only plain arrays (``arrays()``) and predicts from them, so the saved
model is exactly the evaluated one and loading it executes no code. Predicting needs numpy only (torch
is imported by the fits), so ``featx predict`` starts without torch.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featx import threads
from featx.devices import resolve_device
from featx.errors import FeatxError
from .selection import Folds, best_index, calibrate, edge_note, holdout, log_loss_of, make_folds
from .solvers import (SVM_GAP, SVM_SELECT_GAP, SquaredHinge, balanced_weights, nearest_labels, normalise, ovr_signs,
                      ovr_weights, scaling, sigmoid_pair, softmax, vote)

if TYPE_CHECKING:
    import torch

DEFAULT_CS = np.logspace(-6, 4, 21)  # the linear-probe literature's sweep, 21 log-spaced values
DEFAULT_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)
FALLBACK_C, FALLBACK_K, FALLBACK_EPOCHS = 1.0, 1, 30  # used when no held-out row exists to select with
LOGREG_MAX_ITER = 1000  # LogisticRegression's lbfgs iterations (its default, 100, stops short on wide features)
KNN_SMOOTHING = 1.0  # add-one smoothing of kNN votes when nothing is held out to fit it on
PREPROCESSING = {"logreg": "standardise (mean/std of the training rows)", "svm": "standardise",
                 "knn": "L2-normalise, cosine similarity", "mlp": "standardise"}
PATH_PATIENCE = 5  # stop the C path once the chosen C and the lowest held-out loss are this many values behind


def proba_over(head: "Head", X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every dataset class, also when training lacked some of them."""
    p = head.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(head.classes_, dtype=int)] = p
    return full


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares: scikit-learn's input contract, labels from probabilities, export to arrays.
    After ``fit``, ``held_out_`` is (training rows, their probabilities from models that never saw them, at the
    selected hyper-parameter), or None when nothing could be held out, and ``held_out_right_`` whether each of
    those rows was predicted right by the rule ``cv_accuracy`` counts: what compares taps and heads row by row."""

    kind = "head"

    def _fit_data(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Validated (X, class codes); sets ``classes_`` and ``n_features_in_``."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise FeatxError(f"the training data has one class ({self.classes_[0]}): a classifier needs at least two")
        return X, codes

    def _data(self, X, dtype=np.float64) -> np.ndarray:
        """X for prediction: the head must be fitted and X must have the training width."""
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=dtype)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitting and input first
        return self.classes_[proba.argmax(1)]

    def predict_proba(self, X) -> np.ndarray:
        raise NotImplementedError

    def arrays(self) -> dict:
        """Everything prediction needs, as named numpy arrays."""
        raise NotImplementedError

    def export(self) -> tuple[dict, dict]:
        """(arrays, JSON-able config) that ``load_head`` turns back into an equivalent head."""
        return {**self.arrays(), "classes": np.asarray(self.classes_)}, {
            "kind": self.kind, "preprocessing": PREPROCESSING[self.kind], "selected": getattr(self, "selected_", {})}

    def load_arrays(self, arrays: dict) -> None:
        for name, value in arrays.items():
            setattr(self, name + "_", value)


class LinearHead(Head):
    """Standardised features -> one linear layer. ``loss='logreg'``: scikit-learn's ``LogisticRegression``
    (multinomial; one logit for two classes); ``loss='svm'``: ``LinearSVC``'s problem (squared hinge,
    one-vs-rest, regularised intercept) whose probabilities are calibrated on held-out decision values by
    ``CalibratedClassifierCV`` (Platt's sigmoid for two classes, temperature scaling for more). The fit is
    three named steps: ``_select`` C on held-out rows (``selection.make_folds``, each fold standardised on its
    own training part), ``_refit`` on all rows, ``_calibrate`` (svm). ``class_weight`` is scikit-learn's."""

    def __init__(self, loss: str = "logreg", Cs=None, cv=5, class_weight: str | dict | None = None):
        self.loss, self.Cs, self.cv, self.class_weight = loss, Cs, cv, class_weight

    @property
    def kind(self) -> str:
        return self.loss

    def fit(self, X, y):
        from sklearn.exceptions import ConvergenceWarning

        if self.loss not in ("logreg", "svm"):
            raise FeatxError(f"unknown linear loss '{self.loss}': use logreg or svm")
        X, codes = self._fit_data(X, y)
        check_class_weight(self.class_weight)
        Cs = np.sort(DEFAULT_CS if self.Cs is None else np.asarray(self.Cs, dtype=float).ravel())
        folds = make_folds(self.cv, codes)
        unconverged = []  # one entry per SVM fit left short of its duality gap
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            C, held_out = self._select(X, codes, Cs, folds, unconverged)
            with threads.limited(threads.for_fit(self.kind, *X.shape, len(self.classes_)), self.loss == "svm"):
                self._refit(X, codes, C, unconverged)
        unconverged = len(unconverged) + sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if unconverged:
            self.selected_["warnings"] = [f"{unconverged} of {self.selected_['fits']} fits stopped at their iteration "
                                          "limit before converging (" + ("short of the duality gap" if self.loss == "svm"
                                                                         else "scikit-learn's ConvergenceWarning") + ")"]
        if self.loss == "svm":
            self._calibrate(held_out, codes[folds.scored] if folds else None, self._class_weights(codes))
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
        torch_solver = self.loss == "svm"  # folds side by side, one thread each (threads.side_by_side)
        paths = threads.side_by_side(lambda pair: self._fold_path(X[pair[0]], codes[pair[0]], X[pair[1]], unconverged),
                                     folds.pairs, torch_solver)
        scored, class_weight = codes[folds.scored], self._class_weights(codes)
        scores, losses, decisions, probas = [], [], [], []
        for C in Cs:
            held = np.zeros((len(X), self._columns()))
            fold_held = threads.side_by_side(lambda path: path(C), paths, torch_solver)
            for (_, test), part in zip(folds.pairs, fold_held):
                held[test] = part
            held = held[folds.scored]
            proba = self._held_out_proba(held, scored, class_weight)
            right = self._predicted(held if self.loss == "svm" else proba) == scored
            scores.append(float(right.mean()))
            losses.append(log_loss_of(proba, scored))
            decisions.append(held)
            probas.append((proba, right))
            best = best_index(scores, losses, len(scored))
            if min(len(scores) - 1 - best, len(scores) - 1 - int(np.argmin(losses))) >= PATH_PATIENCE:
                break
        self.selected_["fits"] = len(scores) * len(paths)
        C = float(Cs[best])
        if self.loss == "svm":  # the chosen C's held-out decisions calibrate the kept model: to its gap, not 1e-4
            held = np.zeros((len(X), self._columns()))
            for (_, test), part in zip(folds.pairs, threads.side_by_side(lambda path: path(C, SVM_GAP), paths, True)):
                held[test] = part
            decisions[best] = held[folds.scored]
            proba = self._held_out_proba(decisions[best], scored, class_weight)
            right = self._predicted(decisions[best]) == scored  # scored on the raw decisions, as every C was
            scores[best], losses[best], probas[best] = float(right.mean()), log_loss_of(proba, scored), (proba, right)
            self.selected_["fits"] += len(paths)
        self.selected_ |= {"C": C, "cv_accuracy": scores[best], "cv_log_loss": losses[best], "evaluated": len(scores)}
        proba, self.held_out_right_ = probas[best]
        if self.loss == "svm":  # probabilities to hand on (audit): each row calibrated without it
            proba = self._cross_fitted(decisions[best], scored, class_weight)
        self.held_out_ = (np.flatnonzero(folds.scored), proba)
        if note := edge_note("C", best, list(Cs)):
            self.selected_["edge"] = note
        return C, decisions[best]

    def _columns(self) -> int:
        return 1 if len(self.classes_) == 2 else len(self.classes_)

    def _class_weights(self, codes: np.ndarray) -> np.ndarray | None:
        return class_weights(self.class_weight, codes, list(self.classes_))

    def _fold_path(self, X_train, codes_train, X_test, unconverged: list):
        """A function (C, gap) -> held-out decision values of this fold's model at C, warm-started from the last
        C (``gap``: the SVM's duality gap; by default ``SVM_SELECT_GAP``, enough to score C)."""
        if self.loss == "logreg":
            model = self._logreg(warm_start=True)

            def decisions(C, gap=None):
                model.set_params(logisticregression__C=C).fit(X_train, codes_train)
                return self._logits(model, X_test)
            return decisions
        mean, scale = scaling(X_train)
        X_train, X_test = (X_train - mean) / scale, (X_test - mean) / scale
        problem = self._svm_problem(X_train, codes_train)

        def decisions(C, gap=SVM_SELECT_GAP):
            coef, intercept, _, converged = problem.solve(C, gap=gap)
            if not converged:
                unconverged.append(C)
            return X_test @ coef.T + intercept
        return decisions

    def _logreg(self, **options):
        """scikit-learn's pipeline for logreg: ``StandardScaler`` then ``LogisticRegression``."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=LOGREG_MAX_ITER, class_weight=self._sklearn_class_weight(), **options))

    def _sklearn_class_weight(self):
        """``class_weight`` keyed by class code, as scikit-learn receives it."""
        if isinstance(self.class_weight, dict):
            return {code: float(self.class_weight.get(c, 1.0)) for code, c in enumerate(self.classes_)}
        return self.class_weight

    def _logits(self, model, X) -> np.ndarray:
        """A fitted LogisticRegression's decision values in this head's columns (a fold may lack a class:
        it gets a logit that no probability notices)."""
        z, present = model.decision_function(X), model.classes_
        if len(self.classes_) == 2:
            return z.reshape(-1, 1)
        if len(present) == len(self.classes_):
            return z
        full = np.full((len(X), len(self.classes_)), -np.inf)
        full[:, present] = np.c_[-z, z] / 2 if z.ndim == 1 else z
        return full

    def _svm_problem(self, X, codes) -> SquaredHinge:
        weights = self._class_weights(codes)
        return SquaredHinge(X, ovr_signs(codes, len(self.classes_)),
                            None if weights is None else ovr_weights(codes, weights))

    @staticmethod
    def _predicted(values: np.ndarray) -> np.ndarray:
        """Class codes from decision values or probabilities: the sign of a single column, else the argmax."""
        return (values[:, 0] > 0).astype(int) if values.shape[1] == 1 else values.argmax(1)

    def _held_out_proba(self, decision: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        """Probabilities whose log-loss breaks accuracy ties between values of C: logreg's own; the SVM's
        calibrated on those same decisions. The SVM's accuracy is never read from these: Platt's intercept,
        fitted on the rows it scores, moves the threshold (pure-noise labels, 40 rows: .58 against .50), so
        it is counted on the raw decisions, as ``LinearSVC.predict`` would label them."""
        if self.loss == "logreg":
            return sigmoid_pair(decision) if decision.shape[1] == 1 else softmax(decision)
        return self._calibrated(decision, calibrate(decision, codes, len(self.classes_), class_weight))

    def _cross_fitted(self, decision: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        """The SVM's held-out probabilities with every row calibrated on the others (stratified folds), never
        on itself; too few rows to split: uncalibrated."""
        from sklearn.model_selection import StratifiedKFold

        folds = int(min(5, np.bincount(codes).max()))
        if folds < 2:
            return self._calibrated(decision, self._uncalibrated())
        proba = np.zeros((len(codes), len(self.classes_)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            for fit_rows, rows in StratifiedKFold(folds, shuffle=True, random_state=0).split(decision, codes):
                proba[rows] = self._calibrated(decision[rows], calibrate(decision[fit_rows], codes[fit_rows],
                                                                          len(self.classes_), class_weight))
        return proba

    def _uncalibrated(self) -> dict:
        return {"calib_a": np.array([-1.0]), "calib_b": np.array([0.0])} if len(self.classes_) == 2 else \
            {"temperature": np.array([1.0])}

    def _refit(self, X, codes: np.ndarray, C: float, unconverged: list) -> None:
        if self.loss == "logreg":
            scaler, model = self._logreg(C=C).fit(X, codes).steps
            self.mean_, self.scale_ = scaler[1].mean_, scaler[1].scale_
            self.coef_, self.intercept_ = model[1].coef_.astype(np.float64), model[1].intercept_.astype(np.float64)
            self.selected_["refit_iterations"] = int(np.max(model[1].n_iter_))
        else:
            self.mean_, self.scale_ = scaling(X)
            coef, intercept, iterations, converged = self._svm_problem((X - self.mean_) / self.scale_, codes).solve(C)
            self.coef_, self.intercept_ = coef, intercept
            self.selected_["refit_iterations"] = iterations
            if not converged:
                unconverged.append(C)
        self.selected_["fits"] += 1

    def _calibrate(self, decision: np.ndarray | None, codes: np.ndarray | None, class_weight) -> None:
        """Probabilities from held-out decision values at the chosen C (none held out: uncalibrated,
        a sigmoid of slope 1 or T = 1, and ``selected_`` says so)."""
        self.selected_["calibration"] = "held-out decisions" if decision is not None else "none (nothing held out)"
        self.load_arrays(self._uncalibrated() if decision is None else
                         calibrate(decision, codes, len(self.classes_), class_weight))

    def margins(self, X) -> np.ndarray:
        """The linear decision values, one column per class or one for two classes (for svm, what
        ``LinearSVC.decision_function`` gives)."""
        return ((self._data(X) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def decision_function(self, X) -> np.ndarray:
        """Log-odds that agree with ``predict``, in scikit-learn's shape (1-D for two classes, positive
        favours ``classes_[1]``): logreg's logits; the svm's calibrated ones (its margins are ``margins``)."""
        z = self.margins(X)
        if self.loss == "svm":
            z = z / self.temperature_[0] if hasattr(self, "temperature_") else -(self.calib_a_ * z + self.calib_b_)
        if len(self.classes_) == 2:
            return z[:, 0] if z.shape[1] == 1 else z[:, 1] - z[:, 0]
        return z

    def predict_proba(self, X) -> np.ndarray:
        z = self.margins(X)
        if self.loss == "logreg":
            return sigmoid_pair(z) if z.shape[1] == 1 else softmax(z)
        return self._calibrated(z, {k: getattr(self, k + "_") for k in ("temperature", "calib_a", "calib_b")
                                    if hasattr(self, k + "_")})

    @staticmethod
    def _calibrated(z: np.ndarray, calibration: dict) -> np.ndarray:
        if "temperature" in calibration:
            return softmax(z / calibration["temperature"][0])
        p = 1.0 / (1.0 + np.exp(calibration["calib_a"] * z + calibration["calib_b"]))  # scikit-learn's Platt sigmoid
        if p.shape[1] == 1:
            return np.hstack([1 - p, p])
        return p / np.maximum(p.sum(1, keepdims=True), 1e-300)  # model files written before temperature scaling

    def arrays(self) -> dict:
        out = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_}
        if self.loss == "svm":
            out |= {"temperature": self.temperature_} if hasattr(self, "temperature_") else \
                {"calib_a": self.calib_a_, "calib_b": self.calib_b_}
        return out


class KNNHead(Head):
    """L2-normalised features, cosine similarity, the k nearest training rows vote (scikit-learn's
    ``KNeighborsClassifier`` finds them); k chosen on held-out rows. Probabilities are the smoothed votes
    (votes + a) / (k + a x classes), a fitted on held-out votes by log-loss (1 when nothing is held out),
    so no class is ever given probability 0."""

    kind = "knn"

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


def mlp_module(dim: int, hidden: int, classes: int, dropout: float) -> torch.nn.Module:
    """The MLP head as a torch module (its tensors named ``net.1.weight`` ..., as model files store them)."""
    from torch import nn

    return nn.Sequential(OrderedDict(net=nn.Sequential(nn.Dropout(dropout / 2), nn.Linear(dim, hidden), nn.ReLU(),
                                                       nn.Dropout(dropout), nn.Linear(hidden, classes))))


def mlp_arrays(mean: np.ndarray, scale: np.ndarray, state: dict) -> dict:
    """An MLP's scaler and state dict in the flat array form MLPHead stores (dots become '__')."""
    return {"mean": np.asarray(mean, np.float64), "scale": np.asarray(scale, np.float64),
            **{k.replace(".", "__"): v.detach().cpu().numpy() for k, v in state.items()}}


class MLPHead(Head):
    """Standardised features -> one hidden layer with dropout, AdamW, early stopping on held-out rows:
    ``cv``'s val rows when it is a split object (``--select-on val``), else ``holdout`` of each class
    that has images to spare. With nothing to hold out it trains ``FALLBACK_EPOCHS`` epochs and says so.
    Seeded; on the GPU when present."""

    kind = "mlp"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-2,
                 max_epochs: int = 200, patience: int = 15, batch_size: int = 64, holdout: float = 0.15,
                 cv=5, device: str = "auto", random_state: int = 0, class_weight: str | None = None):
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.max_epochs, self.patience, self.batch_size, self.holdout = max_epochs, patience, batch_size, holdout
        self.cv, self.device, self.random_state, self.class_weight = cv, device, random_state, class_weight

    def fit(self, X, y):
        """Early stopping on the held-out rows picks the number of epochs; the head is then trained afresh on
        every row (train + val under ``--select-on val``) for that many epochs."""
        X, codes = self._fit_data(X, y)
        train, held, how = holdout(self.cv, codes, self.holdout)
        max_epochs = self.max_epochs if len(held) else min(self.max_epochs, FALLBACK_EPOCHS)
        with threads.limited(threads.for_fit(self.kind, *X.shape, self.hidden), uses_torch=True):
            epochs, best, proba = self._train(X, codes, train, held, max_epochs)
            if len(held):
                self._train(X, codes, np.arange(len(X)), np.array([], int), epochs)
        self.held_out_ = (held, proba) if len(held) else None
        self.held_out_right_ = proba.argmax(1) == codes[held] if len(held) else None
        self.selected_ = {"epochs": epochs, "best_holdout_loss": best, "holdout": len(held), "selection": how,
                          "cv_accuracy": float((proba.argmax(1) == codes[held]).mean()) if len(held) else None,
                          "scored_rows": len(held),
                          "refit": f"on all {len(X)} rows for {epochs} epochs" if len(held) else "none"}
        return self

    def _train(self, X, codes, train: np.ndarray, held: np.ndarray, max_epochs: int) -> tuple[int, float | None, np.ndarray]:
        """Train a fresh, seeded MLP on ``train`` rows, standardised on them, for up to ``max_epochs``; with
        ``held`` rows, stop ``patience`` epochs after their loss last improved and keep the best epoch's
        weights. Stores the arrays; returns (epochs kept, best held-out loss, held-out probabilities then)."""
        import torch

        device = resolve_device(self.device)
        torch.manual_seed(self.random_state)
        mean, scale = scaling(X[train])
        Xs = torch.as_tensor((X - mean) / scale, dtype=torch.float32, device=device)
        ys = torch.as_tensor(codes, device=device)
        net = mlp_module(X.shape[1], self.hidden, len(self.classes_), self.dropout).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weights = class_weights(self.class_weight, codes[train], list(self.classes_))
        loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else
                                            torch.as_tensor(weights, dtype=torch.float32, device=device))
        generator = torch.Generator().manual_seed(self.random_state)
        train_t, held_t = torch.as_tensor(train, device=device), torch.as_tensor(held, device=device)
        best, best_state, best_epochs, since, best_proba = np.inf, None, 0, 0, None
        for epoch in range(max_epochs):
            net.train()
            order = train_t[torch.randperm(len(train), generator=generator).to(device)]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                opt.zero_grad()
                loss_fn(net(Xs[batch]), ys[batch]).backward()
                opt.step()
            if not len(held):
                continue
            net.eval()
            with torch.no_grad():
                logits = net(Xs[held_t])
                loss = loss_fn(logits, ys[held_t]).item()
            if loss < best - 1e-4:
                best, best_epochs, since = loss, epoch + 1, 0
                best_proba = torch.softmax(logits.double(), 1).cpu().numpy()
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= self.patience:
                    break
        if best_state is None:  # nothing held out: the last epoch's weights
            best_epochs, best_state = max_epochs, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        self.load_arrays(mlp_arrays(mean, scale, best_state))
        return best_epochs, float(best) if len(held) else None, best_proba

    def load_arrays(self, arrays: dict) -> None:
        arrays = dict(arrays)
        self.mean_, self.scale_ = arrays.pop("mean"), arrays.pop("scale")
        self.state_ = {k: np.asarray(v) for k, v in arrays.items()}

    def module(self) -> torch.nn.Module:
        """The fitted MLP as a torch module in eval mode (to warm-start fine-tuning)."""
        import torch

        (hidden, dim), classes = self.state_["net__1__weight"].shape, self.state_["net__4__weight"].shape[0]
        net = mlp_module(dim, hidden, classes, self.dropout).eval()
        net.load_state_dict({k.replace("__", "."): torch.as_tensor(v) for k, v in self.state_.items()})
        return net

    def predict_proba(self, X) -> np.ndarray:
        """The eval-mode forward pass (dropout off) in float32, as torch computed it in training."""
        x = ((self._data(X) - self.mean_) / self.scale_).astype(np.float32)  # checks fitting and input first
        s = {k: v.astype(np.float32, copy=False) for k, v in self.state_.items()}
        hidden = np.maximum(x @ s["net__1__weight"].T + s["net__1__bias"], 0)
        return softmax((hidden @ s["net__4__weight"].T + s["net__4__bias"]).astype(np.float64))

    def arrays(self) -> dict:
        return {"mean": self.mean_, "scale": self.scale_, **self.state_}


def check_class_weight(class_weight) -> None:
    if class_weight is not None and not isinstance(class_weight, dict) and class_weight != "balanced":
        raise FeatxError(f"--class-weight {class_weight} is not supported: use balanced, or leave it out")


def class_weights(class_weight, codes: np.ndarray, classes) -> np.ndarray | None:
    """None, or one weight per class: ``balanced`` (from ``codes``), or scikit-learn's {class label: weight}
    (classes left out weigh 1)."""
    check_class_weight(class_weight)
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        return np.array([float(class_weight.get(c, 1.0)) for c in classes])
    return balanced_weights(codes, len(classes))


def make_head(clf: str, cv=5, device: str = "auto", C: float | None = None, k: int | None = None,
              class_weight: str | None = None) -> Head:
    """The head for ``--clf``; ``cv`` is a fold count or a ``PredefinedSplit`` for ``--select-on val``.
    ``C`` / ``k`` fix the hyper-parameter instead of selecting it (held-out rows still score it).
    ``class_weight='balanced'`` weighs the linear heads' and the MLP's loss (kNN votes are not weighted)."""
    if C is not None and clf not in ("logreg", "svm") or k is not None and clf != "knn":
        raise FeatxError(f"--C applies to logreg and svm, --k to knn; not to --clf {clf}")
    if class_weight is not None and clf == "knn":
        raise FeatxError("--class-weight applies to logreg, svm and mlp; kNN's votes are not weighted")
    if clf in ("logreg", "svm"):
        return LinearHead(loss=clf, Cs=None if C is None else [C], cv=cv, class_weight=class_weight)
    if clf == "knn":
        return KNNHead(ks=None if k is None else [k], cv=cv)
    if clf == "mlp":
        return MLPHead(cv=cv, device=device, class_weight=class_weight)
    raise FeatxError(f"unknown head '{clf}': use svm, logreg, knn or mlp")


def load_head(arrays: dict, config: dict) -> Head:
    arrays = dict(arrays)
    head = make_head(config["kind"], device="cpu")
    head.classes_ = arrays.pop("classes")
    head.selected_ = config.get("selected", {})
    head.n_features_in_ = len(arrays["mean"]) if "mean" in arrays else arrays["train"].shape[1]
    head.load_arrays(arrays)
    return head
