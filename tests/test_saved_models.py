"""Model files written before the heads became one class each still load and predict what they predicted."""
from pathlib import Path

import numpy as np
import pytest

from featx.heads import load_head
from featx.modelfile import ModelFile

DATA = Path(__file__).parent / "data"
KINDS = {"logreg": "logreg", "svm2": "svm", "svm3": "svm", "knn": "knn", "mlp": "mlp"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_an_older_model_file_predicts_the_same_probabilities(name):
    model = ModelFile.load(DATA / f"{name}.featx")
    head = load_head(model.head_arrays, model.head_config)
    expected = np.load(DATA / "head_probabilities.npz")
    assert head.kind == KINDS[name] == model.head_config["kind"]
    np.testing.assert_allclose(head.predict_proba(expected["query"]), expected[name], rtol=0, atol=1e-12)
    assert np.allclose(head.predict_proba(expected["query"]).sum(1), 1)
