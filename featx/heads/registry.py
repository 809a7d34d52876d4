"""The one entry point to the heads: ``make_head`` for ``--clf`` and ``load_head`` for a model file, over one
registry from a head's kind to its class (a model file's manifest names the kind)."""
from __future__ import annotations

from featx.errors import FeatxError
from .base import Head
from .knn import KNNHead
from .logreg import LogRegHead
from .mlp import MLPHead
from .svm import SVMHead

HEADS = {head.kind: head for head in (SVMHead, LogRegHead, KNNHead, MLPHead)}
LINEAR = ("logreg", "svm")


def make_head(clf: str, cv=5, device: str = "auto", C: float | None = None, k: int | None = None,
              class_weight: str | None = None) -> Head:
    """The head for ``--clf``; ``cv`` is a fold count or a ``PredefinedSplit`` for ``--select-on val``.
    ``C`` / ``k`` fix the hyper-parameter instead of selecting it (held-out rows still score it).
    ``class_weight='balanced'`` weighs the linear heads' and the MLP's loss (kNN votes are not weighted)."""
    if clf not in HEADS:
        raise FeatxError(f"unknown head '{clf}': use svm, logreg, knn or mlp")
    if C is not None and clf not in LINEAR or k is not None and clf != "knn":
        raise FeatxError(f"--C applies to logreg and svm, --k to knn; not to --clf {clf}")
    if class_weight is not None and clf == "knn":
        raise FeatxError("--class-weight applies to logreg, svm and mlp; kNN's votes are not weighted")
    if clf in LINEAR:
        return HEADS[clf](Cs=None if C is None else [C], cv=cv, class_weight=class_weight)
    if clf == "knn":
        return KNNHead(ks=None if k is None else [k], cv=cv)
    return MLPHead(cv=cv, device=device, class_weight=class_weight)


def load_head(arrays: dict, config: dict) -> Head:
    """The head a model file holds (its manifest's kind, its arrays), ready to predict."""
    arrays = dict(arrays)
    head = make_head(config["kind"], device="cpu")
    head.classes_ = arrays.pop("classes")
    head.selected_ = config.get("selected", {})
    head.n_features_in_ = len(arrays["mean"]) if "mean" in arrays else arrays["train"].shape[1]
    head.load_arrays(arrays)
    return head
