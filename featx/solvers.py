"""Solvers: the numerical kernels under the heads that scikit-learn does not provide fast enough.

``SquaredHinge`` solves liblinear's linear SVM objective (scikit-learn's ``LinearSVC``: squared hinge,
one-vs-rest, intercept as a regularised feature of value 1) to a certified duality gap, warm-started
along a C path; ``LinearSVC`` itself took 11-38 s for one fit of 120 classes x 1,280 features on 2 cores,
and a selection needs about a hundred. Also: standardisation and cosine nearest neighbours in
memory-bounded chunks. torch is imported by the fits, so predicting with a fitted head needs only numpy.
"""
from __future__ import annotations

import numpy as np

SVM_GAP = 1e-9  # relative duality gap at which a squared-hinge fit counts as converged
SVM_MAX_ITER = 5000


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def sigmoid_pair(z: np.ndarray) -> np.ndarray:
    """Two columns (1 - p, p) from one logit column, p = 1 / (1 + exp(-z))."""
    p = 0.5 * (1 + np.tanh(0.5 * z[:, :1]))  # tanh form: no overflow
    return np.hstack([1 - p, p])


def balanced_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``class_weight='balanced'``, per class: n / (classes present x rows of the class)."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return len(codes) / (np.count_nonzero(counts) * np.maximum(counts, 1))


def ovr_signs(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """One-vs-rest targets (+1 / -1) as liblinear sets them: one column for two classes (+1 = class 1)."""
    signs = np.where(codes[:, None] == np.arange(n_classes), 1.0, -1.0)
    return signs[:, 1:] if n_classes == 2 else signs


def ovr_weights(codes: np.ndarray, class_weight: np.ndarray) -> np.ndarray:
    """liblinear's per-row weights of each one-vs-rest problem: for two classes each row weighs its class's
    weight; for more, problem k weighs its positive rows by class k's weight and every other row by 1."""
    if len(class_weight) == 2:
        return class_weight[codes][:, None]
    return np.where(codes[:, None] == np.arange(len(class_weight)), class_weight[None, :], 1.0)


class SquaredHinge:
    """liblinear's L2-regularised squared-hinge problems on one training matrix, at any C:
    per column k, min 0.5 (|w_k|^2 + b_k^2) + C sum_i weight_ik max(0, 1 - sign_ik (x_i w_k + b_k))^2.

    The matrix (with its column of ones) is rotated once into its row space by an SVD, where the
    Hessian of the all-active problem is diagonal; L-BFGS runs on that diagonally preconditioned form in
    float64 and stops on the relative duality gap (``SVM_GAP``), which bounds the distance to the optimum
    whatever C is."""

    def __init__(self, X: np.ndarray, signs: np.ndarray, weights: np.ndarray | None = None):
        import torch

        Xa = torch.as_tensor(np.hstack([X, np.ones((len(X), 1))]), dtype=torch.float64)
        U, self.S, self.Vh = torch.linalg.svd(Xa, full_matrices=False)
        self.Z = U * self.S
        self.signs = torch.as_tensor(signs, dtype=torch.float64)
        self.weights = torch.ones_like(self.signs) if weights is None else \
            torch.as_tensor(np.broadcast_to(weights, signs.shape), dtype=torch.float64)
        self.gamma = torch.zeros(len(self.S), signs.shape[1], dtype=torch.float64)  # warm start along the path

    def _objective(self, gamma, C: float):
        margin = (1 - self.signs * (self.Z @ gamma)).clamp_min(0)
        return 0.5 * (gamma * gamma).sum() + C * (self.weights * margin * margin).sum(), margin

    def gap(self, C: float) -> float:
        """(primal - dual) / primal at the current solution; the dual point is alpha = 2 C weight margin."""
        import torch

        with torch.no_grad():
            primal, margin = self._objective(self.gamma, C)
            alpha = 2 * C * self.weights * margin
            v = self.Z.T @ (alpha * self.signs)
            dual = alpha.sum() - 0.5 * (v * v).sum() - (alpha * alpha / (4 * C * self.weights)).sum()
            return float((primal - dual) / primal.clamp_min(1e-300))

    def solve(self, C: float) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """(coef k x d, intercept k, L-BFGS iterations, converged) at C, starting from the last solution."""
        import torch

        precondition = (1 + 2 * C * self.S * self.S).rsqrt()[:, None]
        eta = (self.gamma / precondition).requires_grad_(True)
        iterations = 0
        while (converged := self.gap(C) <= SVM_GAP) is False and iterations < SVM_MAX_ITER:
            opt = torch.optim.LBFGS([eta], lr=1, max_iter=25, history_size=20, tolerance_grad=0, tolerance_change=0,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                value = self._objective(precondition * eta, C)[0]
                value.backward()
                return value

            opt.step(closure)
            iterations += opt.state[opt._params[0]]["n_iter"]
            self.gamma = (precondition * eta).detach()
        W = (self.Vh.T @ self.gamma).numpy()
        return W[:-1].T.copy(), W[-1].copy(), iterations, converged


def scaling(X_fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where constant) of the rows a head is fitted on, as
    scikit-learn's ``StandardScaler``."""
    mean = X_fit.mean(0, dtype=np.float64)
    scale = X_fit.std(0, dtype=np.float64)
    scale[scale == 0] = 1.0
    return mean, scale


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
