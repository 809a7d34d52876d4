"""Heads, stage 2: classifiers on cached features: linear SVM, logistic regression, kNN and a small torch MLP.

Each head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba``) whose model
selection cannot leak: preprocessing is fitted inside each cross-validation fold, and ``cv`` may be a
``PredefinedSplit`` to select on a validation split instead. The linear heads solve scikit-learn's
objectives with full-batch L-BFGS in torch, warm-started along the C path; kNN scores every k
from one similarity matrix per fold.
After fitting, a head keeps only plain arrays (``arrays()``) and predicts from them, so the saved
model is exactly the evaluated one and loading it executes no code.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split

from .devices import resolve_device
from .errors import FeatxError
from .solvers import fit_linear, nearest_labels, normalise, scaling, softmax, standardise, vote

DEFAULT_CS = np.logspace(-6, 4, 21)  # the linear-probe literature's sweep, 21 log-spaced values
DEFAULT_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)
PREPROCESSING = {"logreg": "standardise (mean/std of the training rows)", "svm": "standardise",
                 "knn": "L2-normalise, cosine similarity", "mlp": "standardise"}
PATH_PATIENCE = 5  # stop the C path after this many values (a factor 10^2.5) strictly below the best


def check_xy(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise FeatxError(f"features must be (n, d) with one label each; got {X.shape} and {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise FeatxError("the training split has one class: a classifier needs at least two")
    return X, y


def folds(cv, y) -> object:
    """An int becomes stratified, shuffled, seeded folds, capped by the smallest class."""
    if not isinstance(cv, int):
        return cv
    smallest = np.bincount(np.unique(y, return_inverse=True)[1]).min()
    if smallest < 2:
        raise FeatxError("a class has a single training image: cross-validation needs at least two per class")
    return StratifiedKFold(min(cv, smallest), shuffle=True, random_state=0)


def proba_over(head: "Head", X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every dataset class, also when training lacked some of them."""
    p = head.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(head.classes_, dtype=int)] = p
    return full


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares: labels, probabilities from arrays, and export to arrays."""

    kind = "head"

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

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
    ``loss='svm'``: linear SVM (squared hinge, one-vs-rest) with Platt-sigmoid probabilities fitted on
    the selection folds' out-of-fold decision values. C is chosen from ``Cs`` by cross-validation on the training
    data, each fold standardised on its own training part; then the head is refitted on all of it."""

    def __init__(self, loss: str = "logreg", Cs=None, cv=5):
        self.loss, self.Cs, self.cv = loss, Cs, cv

    @property
    def kind(self) -> str:
        return self.loss

    def fit(self, X, y):
        X, y = check_xy(X, y)
        if self.loss not in ("logreg", "svm"):
            raise FeatxError(f"unknown linear loss '{self.loss}': use logreg or svm")
        self.classes_, codes = np.unique(y, return_inverse=True)
        Cs = np.sort(DEFAULT_CS if self.Cs is None else np.asarray(self.Cs, dtype=float))
        splits = []
        for train, test in folds(self.cv, codes).split(X, codes):  # each fold standardised on its own train part
            _, _, Xtr, Xte = standardise(X[train], X[test])
            splits.append((Xtr, torch.as_tensor(codes[train]), Xte, test))
        states, scores, out_of_fold = [None] * len(splits), [], []
        for C in Cs:  # most to least regularised, each fit warm-started from the last
            decision = None
            for f, (Xtr, ytr, Xte, test) in enumerate(splits):
                states[f] = fit_linear(Xtr, ytr, len(self.classes_), C, self.loss, states[f])
                z = (Xte @ states[f][0] + states[f][1]).double().numpy()
                decision = np.zeros((len(X), z.shape[1])) if decision is None else decision
                decision[test] = z
            out_of_fold.append(decision)
            scores.append(float((self._labels(decision) == codes).mean()))
            last_at_best = max(i for i, a in enumerate(scores) if a >= max(scores) - 1e-12)
            if len(scores) - 1 - last_at_best >= PATH_PATIENCE:
                break  # CV accuracy stayed below its best for PATH_PATIENCE values: weaker regularisation overfits
        best = int(np.argmax(scores))  # ties go to the smaller C: more regularisation
        C = float(Cs[best])
        self.selected_ = {"C": C, "cv_accuracy": float(scores[best]), "candidates": len(Cs),
                          "evaluated": len(scores)}
        self.mean_, self.scale_, Xall = standardise(X)
        W, b = fit_linear(Xall, torch.as_tensor(codes), len(self.classes_), C, self.loss)
        self.coef_, self.intercept_ = W.T.double().numpy(), b.double().numpy()
        if self.loss == "svm":
            self._calibrate(out_of_fold[best], codes)
        return self

    @staticmethod
    def _labels(z: np.ndarray) -> np.ndarray:
        return (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else z.argmax(1)

    def _calibrate(self, decision: np.ndarray, codes: np.ndarray) -> None:
        """Platt scaling: a sigmoid per decision column, fitted on the cross-validation folds'
        out-of-fold decision values at the chosen C (no extra fits)."""
        targets = codes[:, None] == (np.arange(decision.shape[1]) + (1 if decision.shape[1] == 1 else 0))
        a, b = [], []
        for col in range(decision.shape[1]):
            platt = LogisticRegression(C=1e6).fit(decision[:, [col]], targets[:, col])
            a.append(-platt.coef_[0, 0])
            b.append(-platt.intercept_[0])
        self.calib_a_, self.calib_b_ = np.asarray(a), np.asarray(b)

    def decision_function(self, X) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if self.loss == "svm":  # p = 1 / (1 + exp(a * d + b)) per column, normalised
            p = 1.0 / (1.0 + np.exp(self.calib_a_ * z + self.calib_b_))
            if p.shape[1] == 1:
                return np.hstack([1 - p, p])
            return p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        return softmax(z)

    def arrays(self) -> dict:
        out = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_}
        if self.loss == "svm":
            out |= {"calib_a": self.calib_a_, "calib_b": self.calib_b_}
        return out


class KNNHead(Head):
    """L2-normalised features, cosine similarity, majority vote of the k nearest; k chosen by CV."""

    kind = "knn"

    def __init__(self, ks=None, cv=5):
        self.ks, self.cv = ks, cv

    def fit(self, X, y):
        X, y = check_xy(X, y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        splitter = folds(self.cv, codes)
        smallest_fold_train = min(len(t) for t, _ in splitter.split(X, codes))
        ks = [k for k in (self.ks or DEFAULT_KS) if k <= smallest_fold_train] or [1]
        correct = np.zeros(len(ks))
        for train, test in splitter.split(X, codes):  # one similarity matrix per fold serves every k
            neighbours = nearest_labels(normalise(X[test]), normalise(X[train]), codes[train], max(ks))
            for j, k in enumerate(ks):
                correct[j] += (vote(neighbours[:, :k], len(self.classes_)).argmax(1) == codes[test]).sum()
        best = int(np.argmax(correct))
        k = ks[best]
        self.selected_ = {"k": k, "cv_accuracy": float(correct[best] / len(X)), "candidates": len(ks)}
        self.train_ = normalise(X)
        self.train_labels_ = codes.astype(np.int64)
        self.k_ = np.array([min(k, len(X))])  # 1-d: safetensors keeps no 0-d arrays
        return self

    def predict_proba(self, X) -> np.ndarray:
        k = int(self.k_[0])
        neighbours = nearest_labels(normalise(np.asarray(X, np.float32)), self.train_, self.train_labels_, k)
        return vote(neighbours, len(self.classes_)) / k

    def arrays(self) -> dict:
        return {"train": self.train_, "train_labels": self.train_labels_, "k": self.k_}


class MLP(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int, dropout: float):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Dropout(dropout / 2), torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def mlp_arrays(mean: np.ndarray, scale: np.ndarray, state: dict) -> dict:
    """An MLP's scaler and state dict in the flat array form MLPHead stores (dots become '__')."""
    return {"mean": np.asarray(mean, np.float64), "scale": np.asarray(scale, np.float64),
            **{k.replace(".", "__"): v.detach().cpu().numpy() for k, v in state.items()}}


class MLPHead(Head):
    """Standardised features -> one hidden layer with dropout, AdamW, early stopping on a held-out
    part of the training split. Seeded; on the GPU when present."""

    kind = "mlp"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-2,
                 max_epochs: int = 200, patience: int = 15, batch_size: int = 64, holdout: float = 0.15,
                 device: str = "auto", random_state: int = 0):
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.max_epochs, self.patience, self.batch_size, self.holdout = max_epochs, patience, batch_size, holdout
        self.device, self.random_state = device, random_state

    def fit(self, X, y):
        X, y = check_xy(X, y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        device = resolve_device(self.device)
        torch.manual_seed(self.random_state)
        tr, ho = train_test_split(np.arange(len(X)), test_size=self.holdout, stratify=codes,
                                  random_state=self.random_state)
        self.mean_, self.scale_ = scaling(X[tr])
        Xs = torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32, device=device)
        ys = torch.as_tensor(codes, device=device)
        net = MLP(X.shape[1], self.hidden, len(self.classes_), self.dropout).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(self.random_state)
        tr_t, ho_t = torch.as_tensor(tr, device=device), torch.as_tensor(ho, device=device)
        best, best_state, since, epochs = np.inf, None, 0, 0
        for epoch in range(self.max_epochs):
            net.train()
            order = tr_t[torch.randperm(len(tr), generator=generator).to(device)]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                opt.zero_grad()
                loss_fn(net(Xs[batch]), ys[batch]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                held = loss_fn(net(Xs[ho_t]), ys[ho_t]).item()
            epochs = epoch + 1
            if held < best - 1e-4:
                best, since = held, 0
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= self.patience:
                    break
        self.selected_ = {"epochs": epochs, "best_holdout_loss": float(best), "holdout": len(ho)}
        self.load_arrays(mlp_arrays(self.mean_, self.scale_, best_state))
        return self

    def load_arrays(self, arrays: dict) -> None:
        arrays = dict(arrays)
        self.mean_, self.scale_ = arrays.pop("mean"), arrays.pop("scale")
        self.state_ = {k: np.asarray(v) for k, v in arrays.items()}
        dim, hidden = self.state_["net__1__weight"].shape[1], self.state_["net__1__weight"].shape[0]
        self.net_ = MLP(dim, hidden, self.state_["net__4__weight"].shape[0], self.dropout).eval()
        self.net_.load_state_dict({k.replace("__", "."): torch.as_tensor(v) for k, v in self.state_.items()})

    def predict_proba(self, X) -> np.ndarray:
        x = torch.as_tensor((np.asarray(X, np.float64) - self.mean_) / self.scale_, dtype=torch.float32)
        with torch.no_grad():
            return torch.softmax(self.net_(x), 1).numpy().astype(np.float64)

    def arrays(self) -> dict:
        return {"mean": self.mean_, "scale": self.scale_, **self.state_}


def make_head(clf: str, cv=5, device: str = "auto") -> Head:
    """The head for ``--clf``; ``cv`` is a fold count or a ``PredefinedSplit`` for ``--select-on val``."""
    if clf in ("logreg", "svm"):
        return LinearHead(loss=clf, cv=cv)
    if clf == "knn":
        return KNNHead(cv=cv)
    if clf == "mlp":
        return MLPHead(device=device)
    raise FeatxError(f"unknown head '{clf}': use svm, logreg, knn or mlp")


def load_head(arrays: dict, config: dict) -> Head:
    arrays = dict(arrays)
    head = make_head(config["kind"], device="cpu")
    head.classes_ = arrays.pop("classes")
    head.selected_ = config.get("selected", {})
    head.load_arrays(arrays)
    return head
