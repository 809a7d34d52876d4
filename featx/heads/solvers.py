"""Solvers: the numerical kernels under the heads that scikit-learn does not provide fast enough.

``SquaredHinge`` solves liblinear's linear SVM objective (scikit-learn's ``LinearSVC``: squared hinge,
one-vs-rest, intercept as a regularised feature of value 1) to a certified duality gap, warm-started
along a C path; ``LinearSVC`` itself took 11-38 s for one fit of 120 classes x 1,280 features on 2 cores,
and a selection needs about a hundred. Also: standardisation and cosine nearest neighbours in
memory-bounded chunks. numpy and scipy only.
"""
from __future__ import annotations

import numpy as np

SVM_GAP = 1e-9  # relative duality gap at which a squared-hinge column counts as converged: the model a head keeps
SVM_SELECT_GAP = 1e-4  # the same for the fits that only score a C on held-out rows (tests/heads/test_heads.py: their
# held-out decisions and accuracies agree with LinearSVC's at each C)
SVM_LBFGS_ITER = 200  # L-BFGS iterations before unconverged columns are handed to Newton's method
SVM_LBFGS_ROUND = 5  # L-BFGS iterations between two checks of the duality gap
SVM_NEWTON_ITER = 100


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

    The matrix (with its column of ones) is rotated once into its row space (an SVD, or the eigenvectors of
    its columns' Gram matrix when it has more rows than columns), where the Hessian of the all-active
    problem is diagonal. scipy's L-BFGS-B runs on that diagonally preconditioned form in float64, all
    columns at once; a column it leaves unconverged (large C, few active rows) is finished by Newton's
    method on its active rows with backtracking. Each column stops on its relative duality gap
    (``SVM_GAP``), which bounds the distance to the optimum whatever C is. numpy and scipy only: torch's
    optimisers import torch._dynamo on first use (874 modules), which a fresh ``fit-head`` paid."""

    def __init__(self, X: np.ndarray, signs: np.ndarray, weights: np.ndarray | None = None):
        Xa = np.hstack([X, np.ones((len(X), 1))]).astype(np.float64, copy=False)  # hstack already promoted float32
        if Xa.shape[0] > Xa.shape[1]:  # more rows than columns: the columns' Gram matrix is cheaper than an SVD
            eigenvalues, V = np.linalg.eigh(Xa.T @ Xa)  # (8,000 x 2,049: 3.2 s against 6.4 s)
            self.S, self.Vh, self.Z = np.sqrt(eigenvalues.clip(min=0)), V.T, Xa @ V
        else:
            U, self.S, self.Vh = np.linalg.svd(Xa, full_matrices=False)
            self.Z = U * self.S
        self.ZT = np.ascontiguousarray(self.Z.T)  # its transpose laid out for the gradient (6 ms a product, not 11)
        self.signs = np.asarray(signs, dtype=np.float64)
        self.weights = np.ones_like(self.signs) if weights is None else \
            np.array(np.broadcast_to(weights, signs.shape), dtype=np.float64)
        self.gamma = np.zeros((len(self.S), signs.shape[1]))  # warm start along the path

    def _objective(self, gamma, C: float, cols=slice(None)):
        """(primal objective per column, hinge margins) of ``gamma`` for the columns ``cols``."""
        margin = (1 - self.signs[:, cols] * (self.Z @ gamma)).clip(min=0)
        return 0.5 * (gamma * gamma).sum(0) + C * (self.weights[:, cols] * margin * margin).sum(0), margin

    def gaps(self, C: float, gamma=None) -> np.ndarray:
        """(primal - dual) / primal per column at ``gamma`` (the current solution); the dual point is
        alpha = 2 C weight margin."""
        primal, margin = self._objective(self.gamma if gamma is None else gamma, C)
        alpha = 2 * C * self.weights * margin
        v = self.ZT @ (alpha * self.signs)
        dual = alpha.sum(0) - 0.5 * (v * v).sum(0) - (alpha * alpha / (4 * C * self.weights)).sum(0)
        return (primal - dual) / np.maximum(primal, 1e-300)

    def solve(self, C: float, gap: float = SVM_GAP) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """(coef k x d, intercept k, iterations, converged to ``gap``) at C, starting from the last solution."""
        from scipy.optimize import minimize

        precondition = 1 / np.sqrt(1 + 2 * C * self.S * self.S)[:, None]
        shape = self.gamma.shape

        def objective(eta):  # the value and its gradient by hand, in the preconditioned variables
            gamma = precondition * eta.reshape(shape)
            value, margin = self._objective(gamma, C)
            return value.sum(), (precondition * (gamma - 2 * C * self.ZT @ (self.weights * margin * self.signs))).ravel()

        steps = [0]

        def converged(intermediate_result) -> None:  # scipy passes the iterate under this name; the gap is checked
            steps[0] += 1  # every SVM_LBFGS_ROUND iterations: a warm start at a loose gap often needs only a few
            if steps[0] % SVM_LBFGS_ROUND == 0 and \
                    (self.gaps(C, precondition * intermediate_result.x.reshape(shape)) <= gap).all():
                raise StopIteration

        iterations = 0
        if (self.gaps(C) > gap).any():
            # never stopped by L-BFGS-B's own tests (ftol, gtol 0): by the gap, or its iteration limit
            result = minimize(objective, (self.gamma / precondition).ravel(), jac=True, method="L-BFGS-B",
                              callback=converged, options={"maxiter": SVM_LBFGS_ITER, "maxcor": 20, "ftol": 0,
                                                           "gtol": 0})
            self.gamma, iterations = precondition * result.x.reshape(shape), steps[0]
        for column in np.flatnonzero(self.gaps(C) > gap).tolist():
            iterations += self._newton(C, column, gap)
        W = self.Vh.T @ self.gamma
        return W[:-1].T.copy(), W[-1].copy(), iterations, bool((self.gaps(C) <= gap).all())

    def _newton(self, C: float, column: int, gap: float) -> int:
        """Newton's method on one column (the generalised Hessian of its active rows), with backtracking;
        returns its iterations."""
        cols = slice(column, column + 1)
        gamma, signs, weights = self.gamma[:, cols].copy(), self.signs[:, column], self.weights[:, column]
        eye = np.eye(len(gamma))
        for iteration in range(1, SVM_NEWTON_ITER + 1):
            value, margin = self._objective(gamma, C, cols)
            active = margin[:, 0] > 0
            Z, w = self.Z[active], weights[active]
            grad = gamma - 2 * C * Z.T @ (w * signs[active] * margin[active, 0])[:, None]
            step = np.linalg.solve(eye + 2 * C * Z.T @ (w[:, None] * Z), -grad)
            t, slope = 1.0, float((grad * step).sum())
            while float(self._objective(gamma + t * step, C, cols)[0][0]) > float(value[0]) + 1e-4 * t * slope and t > 1e-12:
                t /= 2
            gamma = gamma + t * step
            self.gamma[:, cols] = gamma
            if float(self.gaps(C)[column]) <= gap:
                break
        return iteration


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
