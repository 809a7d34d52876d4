"""Solvers: the numerical kernels under the heads. Full-batch L-BFGS for scikit-learn's linear objectives
in torch (several times faster than liblinear/lbfgs on wide features), standardisation, and cosine
k-nearest-neighbour voting in memory-bounded chunks. torch is imported by the functions that fit, so
predicting with a fitted head needs only numpy."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@lru_cache(maxsize=1)
def affine():
    """``Affine.apply``: X @ W + b whose weight gradient is computed as (G^T X)^T: BLAS is several times
    faster at that than at the transposed product autograd would use for tall, skinny problems."""
    import torch

    class Affine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X, W, b):
            ctx.save_for_backward(X)
            k = W.shape[1]
            padded = torch.nn.functional.pad(W, (0, -k % 16))  # 16 columns: measured ~2x faster than 10 on AVX2
            return torch.addmm(torch.nn.functional.pad(b, (0, -k % 16)), X, padded)[:, :k]

        @staticmethod
        def backward(ctx, grad):
            (X,) = ctx.saved_tensors
            return None, (grad.t() @ X).t(), grad.sum(0)

    return Affine.apply


def balanced_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``class_weight='balanced'``, per class: n / (classes present x rows of the class)."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return len(codes) / (np.count_nonzero(counts) * np.maximum(counts, 1))


def fit_linear(X: torch.Tensor, codes: torch.Tensor, n_classes: int, C: float, loss: str,
               init: tuple | None = None, max_iter: int = 100,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-batch L-BFGS on mean loss + ||W||^2 / (2 C n): the minimiser of scikit-learn's
    ``C * sum(loss) + ||W||^2 / 2``. ``logreg``: multinomial cross-entropy; ``svm``: one-vs-rest
    squared hinge (LinearSVC's default loss). ``weights`` scale each row's loss (``class_weight``).
    Warm-started from ``init`` along a C path.
    Returns (W, b, iterations); fewer iterations than ``max_iter`` means L-BFGS met its tolerance."""
    import torch

    n, d = X.shape
    weights = torch.ones(n, dtype=X.dtype) if weights is None else weights.to(X.dtype)
    k = 1 if (loss == "svm" and n_classes == 2) else n_classes
    signs = (torch.nn.functional.one_hot(codes, n_classes).to(X.dtype) * 2 - 1) if k > 1 else \
        (codes.to(X.dtype) * 2 - 1)[:, None]
    if init is None:  # the optimum at W = 0, so heavily regularised fits start converged
        prior = torch.bincount(codes, weights, minlength=n_classes).to(X.dtype) / weights.sum()
        init = (torch.zeros(d, k, dtype=X.dtype), prior.clamp_min(1e-12).log() if loss == "logreg" else signs.mean(0))
    W, b = init[0].clone().requires_grad_(True), init[1].clone().requires_grad_(True)
    penalty = 1.0 / (2 * C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = affine()(X, W, b)
        per_row = torch.nn.functional.cross_entropy(z, codes, reduction="none") if loss == "logreg" else \
            torch.clamp(1 - signs * z, min=0).pow(2).sum(1)
        data = (weights * per_row).mean()
        value = data + penalty * (W * W).sum()
        value.backward()
        return value

    opt.step(closure)
    return W.detach(), b.detach(), int(opt.state[opt._params[0]]["n_iter"])


def scaling(X_fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where constant) of the rows a head is fitted on."""
    mean = X_fit.mean(0, dtype=np.float64)
    scale = X_fit.std(0, dtype=np.float64)
    scale[scale == 0] = 1.0
    return mean, scale


def standardise(X_fit: np.ndarray, *others: np.ndarray) -> tuple:
    import torch

    mean, scale = scaling(X_fit)
    return (mean, scale, *(torch.as_tensor((x - mean) / scale, dtype=torch.float32) for x in (X_fit, *others)))


def nearest_labels(queries: np.ndarray, train: np.ndarray, labels: np.ndarray, k: int, chunk: int = 2048):
    """Labels of the k most cosine-similar training rows, nearest first (rows are L2-normalised)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable"), 1)
        out[start:start + chunk] = labels[order]
    return out


def vote(neighbour_labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([(neighbour_labels == c).sum(1) for c in range(n_classes)], axis=1)


def normalise(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
