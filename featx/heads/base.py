"""The base of every head: scikit-learn's input contract, labels from probabilities, export to plain arrays.

After fitting, a head keeps only plain arrays (``arrays()``) and predicts from them, so the saved model is exactly
the evaluated one and loading it executes no code. Predicting needs numpy only (torch is imported by the fits and
by ``to_torch``), so ``featx predict`` starts without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.errors import FeatxError
from .solvers import balanced_weights

if TYPE_CHECKING:
    import torch


def proba_over(head: "Head", X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every dataset class, also when training lacked some of them."""
    p = head.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(head.classes_, dtype=int)] = p
    return full


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares. After ``fit``, ``held_out_`` is (training rows, their probabilities from models that
    never saw them, at the selected hyper-parameter), or None when nothing could be held out, and
    ``held_out_right_`` whether each of those rows was predicted right by the rule ``cv_accuracy`` counts: what
    compares taps and heads row by row. ``to_torch`` is the head's one torch form (features -> probabilities)."""

    kind = "head"
    preprocessing = ""  # in words, for the model file

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

    def to_torch(self) -> "torch.nn.Module":
        """A torch module from features to the probabilities ``predict_proba`` gives (export, prediction in torch)."""
        raise NotImplementedError

    def arrays(self) -> dict:
        """Everything prediction needs, as named numpy arrays."""
        raise NotImplementedError

    def export(self) -> tuple[dict, dict]:
        """(arrays, JSON-able config) that ``load_head`` turns back into an equivalent head."""
        return {**self.arrays(), "classes": np.asarray(self.classes_)}, {
            "kind": self.kind, "preprocessing": self.preprocessing, "selected": getattr(self, "selected_", {})}

    def load_arrays(self, arrays: dict) -> None:
        for name, value in arrays.items():
            setattr(self, name + "_", value)


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
