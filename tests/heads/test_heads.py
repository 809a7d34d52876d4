import json

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from featx import heads
from featx.heads import knn, linear, logreg
from featx.errors import FeatxError


@pytest.fixture(scope="module")
def blobs():
    X, y = make_classification(n_samples=360, n_features=40, n_informative=10, n_classes=3, n_clusters_per_class=1,
                               class_sep=2.0, random_state=0)
    return X[:240].astype(np.float32), y[:240], X[240:].astype(np.float32), y[240:]


@pytest.mark.parametrize("clf", ["logreg", "svm", "knn", "mlp"])
def test_each_head_learns_and_round_trips(blobs, clf):
    X, y, Xt, yt = blobs
    head = heads.make_head(clf, device="cpu").fit(X, y)
    assert head.score(Xt, yt) >= 0.9
    proba = head.predict_proba(Xt)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    arrays, config = head.export()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    again = heads.load_head(arrays, json.loads(json.dumps(config)))
    np.testing.assert_allclose(again.predict_proba(Xt), proba, atol=1e-6)
    assert set(head.selected_) & {"C", "k", "epochs"}


@pytest.mark.parametrize("C", [1e-3, 0.1])
def test_logreg_solves_sklearns_problem(blobs, C):
    """Same objective as scikit-learn's LogisticRegression at the same C: same probabilities."""
    X, y, Xt, _ = blobs
    head = heads.LogRegHead(Cs=[C]).fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-8)).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(Xt), ref.predict_proba(Xt), atol=2e-3)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_agrees_with_linearsvc_and_calibrates(blobs, n_classes):
    X, y, Xt, yt = blobs
    keep, keep_t = y < n_classes, yt < n_classes
    head = heads.SVMHead(Cs=[0.05]).fit(X[keep], y[keep])
    ref = make_pipeline(StandardScaler(), LinearSVC(C=0.05, max_iter=20000, tol=1e-6)).fit(X[keep], y[keep])
    z, z_ref = head.margins(Xt[keep_t]), ref.decision_function(Xt[keep_t])
    assert np.corrcoef(z.ravel(), z_ref.ravel())[0, 1] > 0.99
    p = head.predict_proba(Xt[keep_t])
    confident = p.max(1) > 0.9
    assert (p.argmax(1)[confident] == yt[keep_t][confident]).mean() >= 0.95


def test_knn_matches_sklearn_cosine(blobs):
    X, y, Xt, _ = blobs
    head = heads.KNNHead(ks=[5]).fit(X, y)
    ref = make_pipeline(Normalizer(), KNeighborsClassifier(5, algorithm="brute")).fit(X, y)
    assert (head.predict(Xt) == ref.predict(Xt)).mean() >= 0.99
    assert head.selected_["k"] == 5


def test_selection_sweeps_wide_c_range(blobs):
    X, y, _, _ = blobs
    head = heads.LogRegHead().fit(X, y)
    assert head.selected_["candidates"] >= 20 and linear.DEFAULT_CS.min() <= 1e-6 and linear.DEFAULT_CS.max() >= 1e4
    assert head.selected_["C"] in linear.DEFAULT_CS


def test_select_on_predefined_validation_split(blobs):
    """Selection on val must use val: a val set with flipped labels drives C to the most regularised value."""
    X, y, Xt, yt = blobs
    Xall = np.vstack([X, Xt])
    flipped = np.r_[y, (yt + 1) % 3]
    cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yt), int)])
    head = heads.LogRegHead(Cs=[1e-4, 1.0], cv=cv).fit(Xall, flipped)
    assert head.selected_["C"] == 1e-4


def test_bad_training_input():
    with pytest.raises(FeatxError, match="one class"):
        heads.make_head("logreg").fit(np.zeros((4, 3)), [1, 1, 1, 1])
    with pytest.raises(FeatxError, match="unknown head"):
        heads.make_head("forest")
    with pytest.raises(FeatxError, match="--C applies to logreg and svm"):
        heads.make_head("mlp", C=1.0)


def few_shot(n_classes=12, seed=0):
    """Classes with 1, 2, ... 9 training images (cycled), Gaussian clusters, plus 5 test rows per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, 20))
    counts = [1 + c % 9 for c in range(n_classes)]
    y = np.repeat(np.arange(n_classes), counts)
    yt = np.repeat(np.arange(n_classes), 5)
    X, Xt = centres[y] + rng.normal(size=(len(y), 20)), centres[yt] + rng.normal(size=(len(yt), 20))
    return X.astype(np.float32), y, Xt.astype(np.float32), yt


@pytest.mark.parametrize("clf", ["logreg", "svm", "knn", "mlp"])
def test_every_head_runs_on_few_shot_classes(clf):
    X, y, Xt, yt = few_shot()
    head = heads.make_head(clf, device="cpu").fit(X, y)
    assert head.score(Xt, yt) >= 0.8
    if clf != "mlp":
        singles = [c for c in range(12) if (y == c).sum() == 1]
        assert head.selected_["unscored_classes"] == singles and head.selected_["cv_accuracy"] is not None
        assert head.selected_["scored_rows"] == len(y) - len(singles)


def test_folds_train_on_single_image_classes_and_never_score_them():
    from featx.heads.selection import make_folds

    _, y, _, _ = few_shot()
    folds = make_folds(5, y)
    singles = np.flatnonzero(np.bincount(y) == 1)
    for train, test in folds.pairs:
        assert np.isin(np.flatnonzero(np.isin(y, singles)), train).all()
        assert not np.isin(y[test], singles).any()
        assert np.isin(y[test], y[train]).all()  # every scored image's class was trained on in its fold
    assert folds.scored.sum() == len(y) - len(singles)


@pytest.mark.parametrize("clf,key,default", [("logreg", "C", linear.FALLBACK_C), ("knn", "k", knn.FALLBACK_K)])
def test_nothing_to_score_falls_back_and_says_so(clf, key, default):
    X = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    head = heads.make_head(clf).fit(X, [0, 1, 2])
    assert head.selected_[key] == default and head.selected_["selection"].startswith("none")
    assert head.selected_["cv_accuracy"] is None and head.predict(X).tolist() == [0, 1, 2]


def test_fixed_c_and_k_are_used():
    X, y, _, _ = few_shot()
    assert heads.make_head("logreg", C=0.5).fit(X, y).selected_["C"] == 0.5
    assert heads.make_head("knn", k=3).fit(X, y).selected_["k"] == 3


def test_select_on_val_scores_only_val_rows(blobs):
    """The held-out accuracy is val's own accuracy, not diluted by the train rows nobody scored."""
    X, y, Xt, yt = blobs
    cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yt), int)])
    for clf in ("logreg", "knn"):
        head = heads.make_head(clf, cv=cv, C=0.1 if clf == "logreg" else None, k=5 if clf == "knn" else None)
        head.fit(np.vstack([X, Xt]), np.r_[y, yt])
        alone = heads.make_head(clf, C=0.1 if clf == "logreg" else None, k=5 if clf == "knn" else None).fit(X, y)
        assert abs(head.selected_["cv_accuracy"] - alone.score(Xt, yt)) <= 1 / len(yt) + 1e-9
        assert head.selected_["scored_rows"] == len(yt)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_probabilities_are_calibrated(blobs, n_classes):
    from featx.heads.selection import log_loss_of
    from featx.heads.solvers import softmax

    X, y, Xt, yt = blobs
    keep, keep_t = y < n_classes, yt < n_classes
    cv = PredefinedSplit(np.r_[np.full(keep.sum(), -1), np.zeros(keep_t.sum() // 2, int)])
    Xs, ys = np.vstack([X[keep], Xt[keep_t][:keep_t.sum() // 2]]), np.r_[y[keep], yt[keep_t][:keep_t.sum() // 2]]
    head = heads.SVMHead(cv=cv).fit(Xs, ys)
    Xtest, ytest = Xt[keep_t][keep_t.sum() // 2:], yt[keep_t][keep_t.sum() // 2:]
    z = head.margins(Xtest)  # the uncalibrated decision values, one column for two classes
    raw = np.c_[-z / 2, z / 2] if z.shape[1] == 1 else z
    assert log_loss_of(head.predict_proba(Xtest), ytest) <= log_loss_of(softmax(raw), ytest)


def test_c_ties_go_to_the_lowest_held_out_loss(blobs):
    """Easy data: many C values tie at full accuracy; the smallest C would give timid probabilities."""
    from featx.heads.selection import log_loss_of

    X, y, Xt, yt = blobs
    head = heads.LogRegHead().fit(X, y)
    assert head.selected_["C"] > linear.DEFAULT_CS.min()
    timid = heads.LogRegHead(Cs=[linear.DEFAULT_CS.min()]).fit(X, y)
    assert log_loss_of(head.predict_proba(Xt), yt) < log_loss_of(timid.predict_proba(Xt), yt)
    assert head.selected_["refit_iterations"] < 1000


def test_mlp_honours_a_val_split(blobs):
    X, y, Xt, yt = blobs
    cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yt), int)])
    head = heads.MLPHead(cv=cv, device="cpu", max_epochs=20).fit(np.vstack([X, Xt]), np.r_[y, yt])
    assert head.selected_["holdout"] == len(yt) and head.selected_["selection"] == "val split"


def imbalanced(blobs):
    """Class 0 cut to a tenth of its rows."""
    X, y, Xt, yt = blobs
    keep = (y != 0) | (np.cumsum(y == 0) <= 8)
    return X[keep], y[keep], Xt, yt


@pytest.mark.parametrize("C", [1e-3, 0.1])
def test_balanced_logreg_solves_sklearns_balanced_problem(blobs, C):
    X, y, Xt, _ = imbalanced(blobs)
    head = heads.LogRegHead(Cs=[C], class_weight="balanced").fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000,
                                                             tol=1e-8)).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(Xt), ref.predict_proba(Xt), atol=2e-3)
    plain = heads.LogRegHead(Cs=[C]).fit(X, y)
    assert head.predict_proba(Xt)[:, 0].mean() > plain.predict_proba(Xt)[:, 0].mean() + 0.01


@pytest.mark.parametrize("clf", ["svm", "mlp"])
def test_balanced_weights_favour_the_rare_class(blobs, clf):
    X, y, Xt, _ = imbalanced(blobs)
    plain = heads.make_head(clf, device="cpu", C=1e-3 if clf == "svm" else None).fit(X, y)
    balanced = heads.make_head(clf, device="cpu", C=1e-3 if clf == "svm" else None, class_weight="balanced").fit(X, y)
    assert balanced.predict_proba(Xt)[:, 0].mean() > plain.predict_proba(Xt)[:, 0].mean()


def test_class_weight_is_checked():
    with pytest.raises(FeatxError, match="--class-weight applies to logreg, svm and mlp"):
        heads.make_head("knn", class_weight="balanced")
    with pytest.raises(FeatxError, match="use balanced"):
        heads.LogRegHead(class_weight="even").fit(np.eye(4), [0, 1, 0, 1])


def test_squared_hinge_path_solves_each_c_as_linearsvc_does(blobs):
    """Warm-started along the path, every C is solved to its own optimum (the old solver copied the previous
    C's model from C = 316 up): the decisions equal a cold LinearSVC's at that C."""
    from featx.heads.solvers import SquaredHinge, ovr_signs, scaling

    X, y, _, _ = blobs
    mean, scale = scaling(X)
    Xs = (X - mean) / scale
    problem = SquaredHinge(Xs, ovr_signs(y, 3))
    for C in (1e-3, 1e-1, 10.0, 1e3):
        coef, intercept, iterations, converged = problem.solve(C)
        ref = LinearSVC(C=C, tol=1e-12, max_iter=1_000_000).fit(Xs, y)
        z, z_ref = Xs @ coef.T + intercept, ref.decision_function(Xs)
        assert converged and iterations > 0, C
        np.testing.assert_allclose(z, z_ref, atol=1e-4 * np.abs(z_ref).max())


def test_binary_logreg_is_fitted_at_c_not_2c(blobs):
    X, y, Xt, _ = blobs
    two = y < 2
    head = heads.make_head("logreg", C=0.01).fit(X[two], y[two])
    at_c = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=logreg.LOGREG_MAX_ITER))
    np.testing.assert_allclose(head.predict_proba(Xt), at_c.fit(X[two], y[two]).predict_proba(Xt), atol=1e-6)


def test_a_k_larger_than_a_fold_is_refused_in_one_line_and_the_grid_says_what_it_skipped():
    X, y, _, _ = few_shot()  # 12 classes, 60 images: a fold trains on about 48
    with pytest.raises(FeatxError, match=r"^--k 201 is more than the \d+ training images of the smallest "
                                         r"cross-validation fold: use --k \d+ or less$"):
        heads.make_head("knn", k=201).fit(X, y)
    head = heads.make_head("knn").fit(X[:30], y[:30])
    assert head.selected_["k"] <= 21 and "k above" in head.selected_["warnings"][0]


def test_knn_probabilities_are_smoothed_never_zero(blobs):
    from featx.heads.selection import log_loss_of

    X, y, Xt, yt = blobs
    head = heads.make_head("knn", k=3).fit(X, y)
    proba = head.predict_proba(Xt)
    assert proba.min() > 0 and 0 < head.smoothing_[0] < 100 and np.isfinite(log_loss_of(proba, yt))
    votes = KNeighborsClassifier(3, algorithm="brute").fit(X / np.linalg.norm(X, axis=1, keepdims=True), y)
    np.testing.assert_allclose(proba, knn.smoothed(votes.predict_proba(
        Xt / np.linalg.norm(Xt, axis=1, keepdims=True)) * 3, 3, head.smoothing_[0]), atol=1e-9)


def test_mlp_refits_on_train_and_val_for_the_selected_epochs(blobs):
    X, y, Xt, yt = blobs
    cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yt), int)])
    Xall = np.vstack([X, Xt])
    head = heads.MLPHead(cv=cv, device="cpu", max_epochs=30).fit(Xall, np.r_[y, yt])
    np.testing.assert_allclose(head.mean_, Xall.mean(0, dtype=np.float64))  # scaled on every row, not train's
    assert head.selected_["refit"] == f"on all {len(Xall)} rows for {head.selected_['epochs']} epochs"


def test_chosen_value_at_the_edge_of_the_grid_is_flagged(blobs):
    X, y, _, _ = blobs
    head = heads.LogRegHead(Cs=[1e-6, 1.0]).fit(X, y)
    assert head.selected_["C"] == 1.0 and head.selected_["edge"] == "C at the largest value tried (1)"
    assert "edge" not in heads.LogRegHead(Cs=[1e-6, 1.0, 1e6]).fit(X, y).selected_


def test_convergence_warnings_reach_the_summary(blobs, monkeypatch):
    X, y, _, _ = blobs
    monkeypatch.setattr(logreg, "LOGREG_MAX_ITER", 1)
    head = heads.LogRegHead(Cs=[1.0]).fit(X, y)
    assert head.selected_["warnings"] == [f"{head.selected_['fits']} of {head.selected_['fits']} fits stopped at "
                                          "their iteration limit before converging (scikit-learn's ConvergenceWarning)"]


def test_model_files_before_smoothing_predict_as_they_did(blobs):
    X, y, Xt, _ = blobs
    arrays, config = heads.make_head("knn", k=5).fit(X, y).export()
    del arrays["smoothing"]  # a kNN file written before smoothing: its plain vote shares
    old = heads.load_head(arrays, config)
    np.testing.assert_allclose(old.predict_proba(Xt) * 5, np.round(old.predict_proba(Xt) * 5), atol=1e-9)


def test_k_of_one_is_not_flagged_as_an_edge():
    from featx.heads.selection import edge_note

    assert edge_note("k", 0, [1, 3, 5], floor=1) is None
    assert edge_note("k", 2, [1, 3, 5], floor=1) == "k at the largest value tried (5)"
    assert edge_note("k", 0, [3, 5], floor=1) == "k at the smallest value tried (3)"


def test_the_svm_scores_each_c_as_linearsvc_at_the_selection_tolerance():
    """The fits that only score C stop at ``SVM_SELECT_GAP``, not 1e-9: on each fold, along the warm-started
    path, their held-out decisions are LinearSVC's (fitted directly on the same standardised rows) to 1% of
    their range, and the held-out accuracy of every C is LinearSVC's to one image."""
    from featx.heads.selection import make_folds
    from featx.heads.solvers import SVM_SELECT_GAP, SquaredHinge, ovr_signs, scaling

    X, y = make_classification(n_samples=300, n_features=60, n_informative=12, n_classes=4, n_clusters_per_class=1,
                               class_sep=1.0, flip_y=0.05, random_state=1)
    for train, test in make_folds(5, y).pairs[:2]:
        mean, scale = scaling(X[train])
        Xs, Xt = (X[train] - mean) / scale, (X[test] - mean) / scale
        problem = SquaredHinge(Xs, ovr_signs(y[train], 4))
        for C in (1e-4, 1e-2, 1.0, 100.0):
            coef, intercept, _, converged = problem.solve(C, gap=SVM_SELECT_GAP)
            z = Xt @ coef.T + intercept
            ref = LinearSVC(C=C, tol=1e-10, max_iter=1_000_000).fit(Xs, y[train])
            z_ref = ref.decision_function(Xt)
            assert converged, C
            np.testing.assert_allclose(z, z_ref, atol=1e-2 * np.abs(z_ref).max())
            assert abs((z.argmax(1) == y[test]).sum() - (ref.predict(Xt) == y[test]).sum()) <= 1, C


def test_the_mlps_adamw_steps_as_torchs_optimiser_does():
    """``mlp.AdamW`` (torch's functional step, fused, no optimiser class) against ``torch.optim.AdamW(fused=True)``
    at the MLP's settings: the same weights, bit for bit, after 20 steps."""
    import torch

    from featx.heads.mlp import AdamW, mlp_module

    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    ours, theirs = mlp_module(6, 8, 3, 0.0), mlp_module(6, 8, 3, 0.0)
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    optimisers = AdamW(ours.parameters(), lr=1e-2, weight_decay=1e-2), \
        torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    for _ in range(20):
        for net, opt in zip((ours, theirs), optimisers):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not any(torch.equal(v, start[k]) for k, v in ours.state_dict().items())  # every tensor moved
