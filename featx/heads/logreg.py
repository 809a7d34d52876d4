"""Logistic regression: scikit-learn's ``LogisticRegression`` (multinomial; one logit for two classes) after
``StandardScaler``, warm-started along the C path."""
from __future__ import annotations

import numpy as np

from .linear import LinearHead, logit_proba

LOGREG_MAX_ITER = 1000  # LogisticRegression's lbfgs iterations (its default, 100, stops short on wide features)
LOGREG_SELECT_TOL = 1e-3  # lbfgs's tolerance along the C path: enough to rank C; the chosen C is solved at
# scikit-learn's default (1e-4) again (``_polish``), so its held-out probabilities, which the audit and the tap
# choice read, are as exact as before. On the few-shot test set (53 x 32, 15 classes) it halved the path's time.


class LogRegHead(LinearHead):
    """Standardised features -> multinomial logistic regression, C chosen on held-out rows."""

    kind = "logreg"
    preprocessing = "standardise (mean/std of the training rows)"
    unconverged_means = "scikit-learn's ConvergenceWarning"

    def _fold_path(self, X_train, codes_train, X_test, unconverged: list):
        model = self.pipeline(warm_start=True)

        def decisions(C, tol=LOGREG_SELECT_TOL):
            model.set_params(logisticregression__C=C, logisticregression__tol=tol).fit(X_train, codes_train)
            return self._fold_logits(model, X_test)
        return decisions

    def _polish(self, C: float, paths: list, folds, n: int) -> np.ndarray:
        """The chosen C's held-out decisions solved again at scikit-learn's default tolerance (warm-started)."""
        from sklearn.linear_model import LogisticRegression

        return self._held_out(paths, folds, n, lambda path: path(C, LogisticRegression().tol))

    def pipeline(self, **options):
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

    def _fold_logits(self, model, X) -> np.ndarray:
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

    def _held_out_proba(self, decision: np.ndarray, codes: np.ndarray, class_weight) -> np.ndarray:
        return logit_proba(decision)

    def _refit(self, X, codes: np.ndarray, C: float, unconverged: list) -> None:
        scaler, model = self.pipeline(C=C).fit(X, codes).steps
        self.mean_, self.scale_ = scaler[1].mean_, scaler[1].scale_
        self.coef_, self.intercept_ = model[1].coef_.astype(np.float64), model[1].intercept_.astype(np.float64)
        self.selected_["refit_iterations"] = int(np.max(model[1].n_iter_))
