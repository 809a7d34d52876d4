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
    head = heads.LinearHead("logreg", Cs=[C]).fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, tol=1e-8)).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(Xt), ref.predict_proba(Xt), atol=2e-3)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_agrees_with_linearsvc_and_calibrates(blobs, n_classes):
    X, y, Xt, yt = blobs
    keep, keep_t = y < n_classes, yt < n_classes
    head = heads.LinearHead("svm", Cs=[0.05]).fit(X[keep], y[keep])
    ref = make_pipeline(StandardScaler(), LinearSVC(C=0.05, max_iter=20000, tol=1e-6)).fit(X[keep], y[keep])
    z, z_ref = head.decision_function(Xt[keep_t]), ref.decision_function(Xt[keep_t]).reshape(len(Xt[keep_t]), -1)
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
    head = heads.LinearHead("logreg").fit(X, y)
    assert head.selected_["candidates"] >= 20 and heads.DEFAULT_CS.min() <= 1e-6 and heads.DEFAULT_CS.max() >= 1e4
    assert head.selected_["C"] in heads.DEFAULT_CS


def test_select_on_predefined_validation_split(blobs):
    """Selection on val must use val: a val set with flipped labels drives C to the most regularised value."""
    X, y, Xt, yt = blobs
    Xall = np.vstack([X, Xt])
    flipped = np.r_[y, (yt + 1) % 3]
    cv = PredefinedSplit(np.r_[np.full(len(y), -1), np.zeros(len(yt), int)])
    head = heads.LinearHead("logreg", Cs=[1e-4, 1.0], cv=cv).fit(Xall, flipped)
    assert head.selected_["C"] == 1e-4


def test_bad_training_input():
    with pytest.raises(FeatxError, match="one class"):
        heads.make_head("logreg").fit(np.zeros((4, 3)), [1, 1, 1, 1])
    with pytest.raises(FeatxError, match="single training image"):
        heads.make_head("logreg").fit(np.random.rand(3, 3), [0, 0, 1])
    with pytest.raises(FeatxError, match="unknown head"):
        heads.make_head("forest")
