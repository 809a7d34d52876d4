"""Linear SVM: ``LinearSVC``'s problem (squared hinge, one-vs-rest, regularised intercept; ``solvers.SquaredHinge``,
faster on many classes) on standardised features, calibrated on held-out decision values by scikit-learn's
``CalibratedClassifierCV``: Platt's sigmoid for two classes, temperature scaling for more."""
from __future__ import annotations

import warnings

import numpy as np

from .linear import LinearHead, logit_proba
from .selection import Folds, calibrate
from .solvers import SVM_GAP, SVM_SELECT_GAP, SquaredHinge, ovr_signs, ovr_weights, scaling


def calibration_map(calibration: dict) -> tuple[float, float]:
    """(slope, offset) taking SVM margins to calibrated logits: 1 / T for temperature scaling; for Platt,
    p = 1 / (1 + exp(a z + b)) (scikit-learn's sigmoid) is the sigmoid of -(a z + b). The numpy prediction
    applies it to margins, the torch form folds it into its linear layer (``LinearHead.folded``)."""
    if "temperature" in calibration:
        return 1.0 / float(calibration["temperature"][0]), 0.0
    return -float(calibration["calib_a"][0]), -float(calibration["calib_b"][0])


def calibrated(z: np.ndarray, calibration: dict) -> np.ndarray:
    slope, offset = calibration_map(calibration)
    return logit_proba(slope * z + offset)


class SVMHead(LinearHead):
    """Standardised features -> a linear SVM, C chosen on held-out rows, probabilities calibrated on the chosen
    C's held-out decisions. Its ``cv_accuracy`` is counted on the raw decisions, as ``LinearSVC.predict`` labels."""

    kind = "svm"
    unconverged_means = "short of the duality gap"

    def _fold_path(self, X_train, codes_train, X_test, unconverged: list):
        """(C, gap) -> held-out decisions; ``gap`` by default ``SVM_SELECT_GAP``, enough to score C."""
        mean, scale = scaling(X_train)
        X_train, X_test = (X_train - mean) / scale, (X_test - mean) / scale
        problem = self._problem(X_train, codes_train)

        def decisions(C, gap=SVM_SELECT_GAP):
            coef, intercept, _, converged = problem.solve(C, gap=gap)
            if not converged:
                unconverged.append(C)
            return X_test @ coef.T + intercept
        return decisions

    def _problem(self, X, codes) -> SquaredHinge:
        weights = self._class_weights(codes)
        return SquaredHinge(X, ovr_signs(codes, len(self.classes_)),
                            None if weights is None else ovr_weights(codes, weights))

    def _held_out_proba(self, decision: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        """Probabilities whose log-loss breaks accuracy ties between values of C, calibrated on those same
        decisions. Accuracy is never read from these: Platt's intercept, fitted on the rows it scores, moves the
        threshold (pure-noise labels, 40 rows: .58 against .50), so it is counted on the raw decisions."""
        return calibrated(decision, calibrate(decision, codes, len(self.classes_), class_weight))

    def _labelled_by(self, decision: np.ndarray, proba: np.ndarray) -> np.ndarray:
        return decision

    def _polish(self, C: float, paths: list, folds: Folds, n: int) -> np.ndarray:
        """The chosen C's held-out decisions, which calibrate the kept model, solved to its gap, not 1e-4."""
        return self._held_out(paths, folds, n, lambda path: path(C, SVM_GAP))

    def _handed_on(self, decision: np.ndarray, proba: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        """The held-out probabilities with every row calibrated on the others (stratified folds), never on
        itself; too few rows to split: uncalibrated."""
        from sklearn.model_selection import StratifiedKFold

        folds = int(min(5, np.bincount(codes).max()))
        if folds < 2:
            return calibrated(decision, self._uncalibrated())
        proba = np.zeros((len(codes), len(self.classes_)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            for fit_rows, rows in StratifiedKFold(folds, shuffle=True, random_state=0).split(decision, codes):
                proba[rows] = calibrated(decision[rows], calibrate(decision[fit_rows], codes[fit_rows],
                                                                   len(self.classes_), class_weight))
        return proba

    def _uncalibrated(self) -> dict:
        return {"calib_a": np.array([-1.0]), "calib_b": np.array([0.0])} if len(self.classes_) == 2 else \
            {"temperature": np.array([1.0])}

    def _refit(self, X, codes: np.ndarray, C: float, unconverged: list) -> None:
        self.mean_, self.scale_ = scaling(X)
        coef, intercept, iterations, converged = self._problem((X - self.mean_) / self.scale_, codes).solve(C)
        self.coef_, self.intercept_ = coef, intercept
        self.selected_["refit_iterations"] = iterations
        if not converged:
            unconverged.append(C)

    def _finish(self, decision: np.ndarray | None, codes: np.ndarray | None, class_weight) -> None:
        """Probabilities from held-out decision values at the chosen C (none held out: uncalibrated,
        a sigmoid of slope 1 or T = 1, and ``selected_`` says so)."""
        self.selected_["calibration"] = "held-out decisions" if decision is not None else "none (nothing held out)"
        self.load_arrays(self._uncalibrated() if decision is None else
                         calibrate(decision, codes, len(self.classes_), class_weight))

    def _calibration_arrays(self) -> dict:
        return {k: getattr(self, k + "_") for k in ("temperature", "calib_a", "calib_b") if hasattr(self, k + "_")}

    def calibration(self) -> tuple[float, float]:
        return calibration_map(self._calibration_arrays())

    def _per_column_platt(self) -> bool:
        """A model file written before temperature scaling: one Platt sigmoid per column, normalised."""
        return not hasattr(self, "temperature_") and self.coef_.shape[0] > 1

    def predict_proba(self, X) -> np.ndarray:
        z = self.logits(X)  # checks fitting and input first
        if self._per_column_platt():
            p = 1.0 / (1.0 + np.exp(-z))
            return p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        return logit_proba(z)

    def to_torch(self):
        if not self._per_column_platt():
            return super().to_torch()
        import torch
        from torch import nn

        from .torch_forms import Cast, Normalise

        return nn.Sequential(Cast(torch.float64), self.torch_logits(torch.float64), nn.Sigmoid(), Normalise())

    def arrays(self) -> dict:
        return super().arrays() | self._calibration_arrays()
