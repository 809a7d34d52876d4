"""scikit-learn's own estimator checks: the heads are classifiers and FeatureExtractor a transformer
over image files, as a user of Pipeline, GridSearchCV or cross_val_score expects."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import (check_get_params_invariance, check_no_attributes_set_in_init,
                                            check_parameters_default_constructible, check_set_params,
                                            parametrize_with_checks)

import featx
from featx import heads

HEADS = [heads.LogRegHead(Cs=[0.1, 1.0], cv=3), heads.SVMHead(Cs=[0.1, 1.0], cv=3),
         heads.KNNHead(cv=3), heads.MLPHead(max_epochs=20, device="cpu")]


@parametrize_with_checks(HEADS)
def test_heads_honour_the_estimator_contract(estimator, check):
    check(estimator)


def test_a_head_inside_cross_val_score():
    X = np.random.default_rng(0).normal(size=(60, 8))
    y = np.repeat(["ants", "bees", "wasps"], 20)
    X[y == "bees"] += 2.0
    X[y == "wasps"] -= 2.0
    assert cross_val_score(heads.LogRegHead(cv=3), X, y, cv=3).mean() > 0.9


@pytest.mark.parametrize("check", [check_get_params_invariance, check_set_params, check_no_attributes_set_in_init,
                                   check_parameters_default_constructible])
def test_feature_extractor_parameter_checks(check):
    check("FeatureExtractor", featx.FeatureExtractor())


def test_feature_extractor_fit_transform_and_names(tiny, dataset):
    extractor = featx.FeatureExtractor(tiny, layer="block1", workers=0)
    with pytest.raises(NotFittedError):
        extractor.transform([dataset / "train" / "a" / "000.jpg"])
    copy = clone(extractor)
    assert copy.get_params() == extractor.get_params() and copy is not extractor
    assert extractor.fit() is extractor
    assert extractor.n_features_out_ == 16 and len(extractor.get_feature_names_out()) == 16  # known after fit
    out = extractor.transform(sorted(dataset.glob("train/*/*.jpg")))
    assert out.shape == (12, 16) and extractor.set_params(layer="block2").fit().n_features_out_ == 32
