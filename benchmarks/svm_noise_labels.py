"""The svm's held-out accuracy on pure-noise labels at one fixed C (so choosing C adds no bias), 30 seeds, 16-d
Gaussian features: featx's rule (raw held-out decisions) against the old one (Platt fitted on the scored rows,
then argmax), cross-fitted Platt, and logreg. Chance is 0.5. Run: python benchmarks/svm_noise_labels.py"""
import numpy as np

from featx.heads import make_head
from featx.heads.selection import calibrate
from featx.heads.svm import SVMHead, calibrated

captured = {}
cross_fitted = SVMHead._handed_on


def spy(self, decision, proba, codes, class_weight):  # the held-out decisions at the chosen C
    captured["decision"], captured["codes"] = decision, codes
    return cross_fitted(self, decision, proba, codes, class_weight)


SVMHead._handed_on = spy
for n in (20, 40, 100):
    raw, in_sample, cross, logreg = [], [], [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        X, y = rng.normal(size=(n, 16)), rng.permutation(np.arange(n) % 2)
        head = make_head("svm", C=1.0).fit(X, y)
        raw.append(head.selected_["cv_accuracy"])
        d, c = captured["decision"], captured["codes"]
        in_sample.append((calibrated(d, calibrate(d, c, 2)).argmax(1) == c).mean())
        cross.append((head.held_out_[1].argmax(1) == c).mean())
        logreg.append(make_head("logreg", C=1.0).fit(X, y).selected_["cv_accuracy"])
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    print(f"n={n}: svm raw {np.mean(raw):.3f}±{se(raw):.3f}  Platt fitted on the scored rows {np.mean(in_sample):.3f}"
          f"±{se(in_sample):.3f}  cross-fitted Platt {np.mean(cross):.3f}±{se(cross):.3f}  logreg "
          f"{np.mean(logreg):.3f}±{se(logreg):.3f}")
