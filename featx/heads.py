"""Heads, stage 2: classifiers on cached features: linear SVM, logistic regression, kNN and a small torch MLP.

Each head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba``) whose model
selection cannot leak: preprocessing is fitted inside each cross-validation fold, and ``cv`` may be a
``PredefinedSplit`` to select on a validation split instead. The linear heads solve scikit-learn's
objectives with full-batch L-BFGS in torch, warm-started along the C path; kNN scores every k
from one similarity matrix per fold.
After fitting, a head keeps only plain arrays (``arrays()``) and predicts from them, so the saved
model is exactly the evaluated one and loading it executes no code. Predicting needs numpy only (torch
is imported by the fits), so ``featx predict`` starts without torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .devices import resolve_device
from .errors import FeatxError
from .selection import Folds, best_index, fit_sigmoid, fit_temperature, holdout, log_loss_of, make_folds, tied
from .solvers import balanced_weights, fit_linear, nearest_labels, normalise, scaling, softmax, standardise, vote

if TYPE_CHECKING:
    import torch

DEFAULT_CS = np.logspace(-6, 4, 21)  # the linear-probe literature's sweep, 21 log-spaced values
DEFAULT_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)
FALLBACK_C, FALLBACK_K, FALLBACK_EPOCHS = 1.0, 1, 30  # used when no held-out row exists to select with
PREPROCESSING = {"logreg": "standardise (mean/std of the training rows)", "svm": "standardise",
                 "knn": "L2-normalise, cosine similarity", "mlp": "standardise"}
PATH_PATIENCE = 5  # stop the C path after this many values (a factor 10^2.5) that no longer help


def proba_over(head: "Head", X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every dataset class, also when training lacked some of them."""
    p = head.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(head.classes_, dtype=int)] = p
    return full


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares: scikit-learn's input contract, labels from probabilities, export to arrays."""

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
    """Standardised features -> one linear layer. ``loss='logreg'``: multinomial logistic regression;
    ``loss='svm'``: linear SVM (squared hinge, one-vs-rest) whose probabilities are calibrated on held-out
    decision values (Platt sigmoid for two classes, one temperature for more). C is chosen from ``Cs`` on
    held-out rows (``selection.make_folds``), each fold standardised on its own training part, ties
    broken by held-out loss; then the head is refitted on all rows. ``class_weight='balanced'`` weighs each
    row's loss by n / (classes x its class's rows), as scikit-learn does."""

    def __init__(self, loss: str = "logreg", Cs=None, cv=5, class_weight: str | None = None):
        self.loss, self.Cs, self.cv, self.class_weight = loss, Cs, cv, class_weight

    @property
    def kind(self) -> str:
        return self.loss

    def fit(self, X, y):
        import torch

        if self.loss not in ("logreg", "svm"):
            raise FeatxError(f"unknown linear loss '{self.loss}': use logreg or svm")
        X, codes = self._fit_data(X, y)
        Cs = np.sort(DEFAULT_CS if self.Cs is None else np.asarray(self.Cs, dtype=float).ravel())
        folds = make_folds(self.cv, codes)
        scores, losses, held_out = self._path(X, codes, Cs, folds) if folds else ([], [], [])
        if folds:
            best = best_index(scores, losses, int(folds.scored.sum()))
            C = float(Cs[best])
            self.selected_ = {"C": C, "cv_accuracy": scores[best], "cv_loss": losses[best],
                              "candidates": len(Cs), "evaluated": len(scores), **folds.describe()}
        else:
            C = float(Cs[0]) if len(Cs) == 1 else FALLBACK_C
            self.selected_ = {"C": C, "cv_accuracy": None, "candidates": len(Cs), **folds.describe()}
        self.mean_, self.scale_, Xall = standardise(X)
        W, b, iterations = fit_linear(Xall, torch.as_tensor(codes), len(self.classes_), C, self.loss, max_iter=1000,
                                      weights=self._weights(codes))
        self.selected_["refit_iterations"] = iterations
        self.coef_, self.intercept_ = W.T.double().numpy(), b.double().numpy()
        if self.loss == "svm":
            scored = folds.scored
            self._calibrate(held_out[best][scored] if folds else None, codes[scored])
        return self

    def _path(self, X, codes, Cs, folds: Folds):
        """Held-out accuracy, loss and decisions for each C, most to least regularised, warm-started."""
        import torch

        splits = []
        for train, test in folds.pairs:  # each fold standardised on its own train part
            _, _, Xtr, Xte = standardise(X[train], X[test])
            splits.append((Xtr, torch.as_tensor(codes[train]), Xte, test, self._weights(codes[train])))
        states, scores, losses, decisions = [None] * len(splits), [], [], []
        scored = folds.scored
        for C in Cs:
            decision = np.zeros((len(X), 1 if self.loss == "svm" and len(self.classes_) == 2 else len(self.classes_)))
            for f, (Xtr, ytr, Xte, test, weights) in enumerate(splits):
                states[f] = fit_linear(Xtr, ytr, len(self.classes_), C, self.loss, states[f][:2] if states[f] else None,
                                       weights=weights)
                decision[test] = (Xte @ states[f][0] + states[f][1]).double().numpy()
            decisions.append(decision)
            scores.append(float((self._labels(decision[scored]) == codes[scored]).mean()))
            losses.append(self._held_out_loss(decision[scored], codes[scored]))
            since_tied = len(scores) - 1 - max(tied(scores, int(scored.sum())))
            since_lowest_loss = len(scores) - 1 - int(np.argmin(losses))
            if max(since_tied, since_lowest_loss) >= PATH_PATIENCE:
                break  # held-out accuracy fell out of the tie, or the held-out loss rose, for PATH_PATIENCE values
        return scores, losses, decisions

    def _weights(self, codes: np.ndarray) -> torch.Tensor | None:
        return class_weights(self.class_weight, codes, list(self.classes_))

    def _held_out_loss(self, z: np.ndarray, codes: np.ndarray) -> float:
        """The head's own loss on held-out rows: cross-entropy for logreg, squared hinge for svm."""
        if self.loss == "logreg":
            return log_loss_of(softmax(z), codes)
        signs = np.where(codes[:, None] == (np.arange(z.shape[1]) + (z.shape[1] == 1)), 1.0, -1.0)
        return float(np.square(np.clip(1 - signs * z, 0, None)).sum(1).mean())

    @staticmethod
    def _labels(z: np.ndarray) -> np.ndarray:
        return (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else z.argmax(1)

    def _calibrate(self, decision: np.ndarray | None, codes: np.ndarray) -> None:
        """Probabilities from held-out decision values at the chosen C (none held out: uncalibrated,
        a = 1 or T = 1, and ``selected_`` says so)."""
        self.selected_["calibration"] = "held-out decisions" if decision is not None else "none (nothing held out)"
        if len(self.classes_) == 2:
            a = fit_sigmoid(decision[:, 0], codes == 1) if decision is not None else 1.0
            self.calib_a_, self.calib_b_ = np.array([-a]), np.array([0.0])
        else:
            self.temperature_ = np.array([fit_temperature(decision, codes) if decision is not None else 1.0])

    def _decisions(self, X) -> np.ndarray:
        """One column per class, or a single column for a binary SVM."""
        return ((self._data(X) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def decision_function(self, X) -> np.ndarray:
        """scikit-learn's convention: 1-D for two classes (positive favours ``classes_[1]``), else one column
        per class."""
        z = self._decisions(X)
        if len(self.classes_) == 2:
            return z[:, 0] if z.shape[1] == 1 else z[:, 1] - z[:, 0]
        return z

    def predict_proba(self, X) -> np.ndarray:
        z = self._decisions(X)
        if self.loss == "logreg":
            return softmax(z)
        if hasattr(self, "temperature_"):
            return softmax(z / self.temperature_[0])
        p = 1.0 / (1.0 + np.exp(self.calib_a_ * z + self.calib_b_))  # p = 1 / (1 + exp(a * d + b)) per column
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
    """L2-normalised features, cosine similarity, majority vote of the k nearest; k chosen on held-out rows."""

    kind = "knn"

    def __init__(self, ks=None, cv=5):
        self.ks, self.cv = ks, cv

    def fit(self, X, y):
        X, codes = self._fit_data(X, y)
        folds = make_folds(self.cv, codes)
        asked = list(self.ks or DEFAULT_KS)
        if folds:
            smallest_fold_train = min(len(t) for t, _ in folds.pairs)
            ks = [k for k in asked if k <= smallest_fold_train] or [1]
            correct = np.zeros(len(ks))
            for train, test in folds.pairs:  # one similarity matrix per fold serves every k
                neighbours = nearest_labels(normalise(X[test]), normalise(X[train]), codes[train], max(ks))
                for j, k in enumerate(ks):
                    correct[j] += (vote(neighbours[:, :k], len(self.classes_)).argmax(1) == codes[test]).sum()
            best = int(np.argmax(correct))  # ties go to the smaller k
            k, accuracy = ks[best], float(correct[best] / folds.scored.sum())
        else:
            ks, k, accuracy = asked, asked[0] if len(asked) == 1 else FALLBACK_K, None
        self.selected_ = {"k": k, "cv_accuracy": accuracy, "candidates": len(ks), **folds.describe()}
        self.train_ = normalise(X)
        self.train_labels_ = codes.astype(np.int64)
        self.k_ = np.array([min(k, len(X))])  # 1-d: safetensors keeps no 0-d arrays
        return self

    def predict_proba(self, X) -> np.ndarray:
        X = self._data(X, np.float32)
        k = int(self.k_[0])
        neighbours = nearest_labels(normalise(X), self.train_, self.train_labels_, k)
        return vote(neighbours, len(self.classes_)) / k

    def arrays(self) -> dict:
        return {"train": self.train_, "train_labels": self.train_labels_, "k": self.k_}


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
        import torch

        X, codes = self._fit_data(X, y)
        device = resolve_device(self.device)
        torch.manual_seed(self.random_state)
        tr, ho, how = holdout(self.cv, codes, self.holdout)
        max_epochs = self.max_epochs if len(ho) else min(self.max_epochs, FALLBACK_EPOCHS)
        self.mean_, self.scale_ = scaling(X[tr])
        Xs = torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32, device=device)
        ys = torch.as_tensor(codes, device=device)
        net = mlp_module(X.shape[1], self.hidden, len(self.classes_), self.dropout).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weights = class_weights(self.class_weight, codes[tr], list(self.classes_), per_class=True)
        loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else weights.float().to(device))
        generator = torch.Generator().manual_seed(self.random_state)
        tr_t, ho_t = torch.as_tensor(tr, device=device), torch.as_tensor(ho, device=device)
        best, best_state, since, epochs = np.inf, None, 0, 0
        for epoch in range(max_epochs):
            net.train()
            order = tr_t[torch.randperm(len(tr), generator=generator).to(device)]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                opt.zero_grad()
                loss_fn(net(Xs[batch]), ys[batch]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                held = loss_fn(net(Xs[ho_t]), ys[ho_t]).item() if len(ho) else -epoch  # nothing held out: last wins
            epochs = epoch + 1
            if held < best - 1e-4:
                best, since = held, 0
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= self.patience:
                    break
        self.selected_ = {"epochs": epochs, "best_holdout_loss": float(best) if len(ho) else None,
                          "holdout": len(ho), "selection": how}
        self.load_arrays(mlp_arrays(self.mean_, self.scale_, best_state))
        return self

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


def class_weights(class_weight, codes: np.ndarray, classes, per_class: bool = False) -> torch.Tensor | None:
    """None, or weights per row (per class with ``per_class``): ``balanced``, or scikit-learn's
    {class label: weight} (classes left out weigh 1)."""
    if class_weight is None:
        return None
    if isinstance(class_weight, dict):
        weights = np.array([float(class_weight.get(c, 1.0)) for c in classes])
    elif class_weight == "balanced":
        weights = balanced_weights(codes, len(classes))
    else:
        raise FeatxError(f"--class-weight {class_weight} is not supported: use balanced, or leave it out")
    import torch

    return torch.as_tensor(weights if per_class else weights[codes])


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
