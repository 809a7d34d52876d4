"""Stage 2 heads on cached features: linear SVM, logistic regression, kNN and a small torch MLP.

Each head is a scikit-learn classifier (``fit`` / ``predict`` / ``predict_proba``). Fitting uses
scikit-learn with model selection that cannot leak: the preprocessing sits inside the cross-validated
pipeline, and ``cv`` may be a ``PredefinedSplit`` to select on a validation split instead. After
fitting, a head keeps only plain arrays (``arrays()``), and prediction runs from those arrays, so the
saved model is exactly the evaluated one and loading it executes no code.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from .errors import FeatxError

DEFAULT_CS = np.logspace(-6, 4, 21)  # the linear-probe literature's sweep, 21 log-spaced values
DEFAULT_KS = (1, 3, 5, 7, 9, 11, 15, 21, 31)


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


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


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
            "kind": self.kind, "selected": getattr(self, "selected_", {})}

    def load_arrays(self, arrays: dict) -> None:
        for name, value in arrays.items():
            setattr(self, name + "_", value)


class LinearHead(Head):
    """Standardised features -> one linear layer. ``loss='logreg'``: multinomial logistic regression;
    ``loss='svm'``: linear SVM with sigmoid-calibrated probabilities (Platt, 3-fold)."""

    def __init__(self, loss: str = "logreg", Cs=None, cv=5, max_iter: int = 2000, n_jobs: int | None = None):
        self.loss, self.Cs, self.cv, self.max_iter, self.n_jobs = loss, Cs, cv, max_iter, n_jobs

    @property
    def kind(self) -> str:
        return self.loss

    def fit(self, X, y):
        X, y = check_xy(X, y)
        if self.loss == "logreg":
            clf = LogisticRegression(max_iter=self.max_iter)
        elif self.loss == "svm":
            clf = LinearSVC(max_iter=self.max_iter * 5)
        else:
            raise FeatxError(f"unknown linear loss '{self.loss}': use logreg or svm")
        Cs = DEFAULT_CS if self.Cs is None else np.asarray(self.Cs, dtype=float)
        pipe = make_pipeline(StandardScaler(), clf)
        param = f"{type(clf).__name__.lower()}__C"
        search = GridSearchCV(pipe, {param: Cs}, cv=folds(self.cv, y), n_jobs=self.n_jobs, refit=True).fit(X, y)
        C = float(search.best_params_[param])
        self.selected_ = {"C": C, "cv_accuracy": float(search.best_score_), "candidates": len(Cs)}
        best = search.best_estimator_
        if self.loss == "svm":
            calibrated = CalibratedClassifierCV(best, method="sigmoid", cv=folds(3, y), ensemble=False).fit(X, y)
            fitted = calibrated.calibrated_classifiers_[0]
            best = fitted.estimator
            self.calib_a_ = np.array([c.a_ for c in fitted.calibrators], dtype=np.float64)
            self.calib_b_ = np.array([c.b_ for c in fitted.calibrators], dtype=np.float64)
        scaler, model = best.steps[0][1], best.steps[1][1]
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        self.coef_, self.intercept_ = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
        self.classes_ = model.classes_
        return self

    def decision_function(self, X) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if self.loss == "svm":  # sklearn's _SigmoidCalibration: p = 1 / (1 + exp(a * d + b)), per class
            p = 1.0 / (1.0 + np.exp(self.calib_a_ * z + self.calib_b_))
            if p.shape[1] == 1:
                return np.hstack([1 - p, p])
            p_sum = p.sum(1, keepdims=True)
            return np.where(p_sum > 0, p / np.where(p_sum > 0, p_sum, 1), 1.0 / p.shape[1])
        if z.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-z))
            return np.hstack([1 - p, p])
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
        splitter = folds(self.cv, y)
        smallest_fold_train = min(len(t) for t, _ in splitter.split(X, y))
        ks = [k for k in (self.ks or DEFAULT_KS) if k <= smallest_fold_train] or [1]
        pipe = make_pipeline(Normalizer(), KNeighborsClassifier(algorithm="brute"))
        search = GridSearchCV(pipe, {"kneighborsclassifier__n_neighbors": ks}, cv=splitter).fit(X, y)
        k = int(search.best_params_["kneighborsclassifier__n_neighbors"])
        self.selected_ = {"k": k, "cv_accuracy": float(search.best_score_), "candidates": len(ks)}
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.train_ = normalise(X)
        self.train_labels_ = codes.astype(np.int64)
        self.k_ = np.array([min(k, len(X))])  # 1-d: safetensors keeps no 0-d arrays
        return self

    def predict_proba(self, X) -> np.ndarray:
        sims = normalise(np.asarray(X, np.float32)) @ self.train_.T
        k = int(self.k_[0])
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = self.train_labels_[nearest]
        counts = np.stack([(votes == c).sum(1) for c in range(len(self.classes_))], axis=1)
        return counts / k

    def arrays(self) -> dict:
        return {"train": self.train_, "train_labels": self.train_labels_, "k": self.k_}


def normalise(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class MLP(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int, dropout: float):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Dropout(dropout / 2), torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


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
        from .extract import resolve_device

        X, y = check_xy(X, y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        device = resolve_device(self.device)
        torch.manual_seed(self.random_state)
        tr, ho = train_test_split(np.arange(len(X)), test_size=self.holdout, stratify=codes,
                                  random_state=self.random_state)
        self.mean_ = X[tr].mean(0).astype(np.float64)
        self.scale_ = np.where(X[tr].std(0) > 0, X[tr].std(0), 1.0).astype(np.float64)
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
        self.load_arrays({"mean": self.mean_, "scale": self.scale_,
                          **{k.replace(".", "__"): v.numpy() for k, v in best_state.items()}})
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
