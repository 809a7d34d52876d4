"""The scikit-learn transformer over image files: stage 1 as a ``FeatureExtractor`` in a Pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.extraction.backbones import create_backbone
from .devices import resolve_device
from .errors import FeatxError
from featx.extraction.runner import iter_features
from featx.extraction.runtimes import resolve_runtime


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: image paths in, backbone features out.

    ``Pipeline([("features", FeatureExtractor("efficientnet_lite0")), ("clf", LogisticRegression())])``
    trains on a list of image files. Unlike ``extract`` it caches nothing and refuses unreadable
    files, because a transformer must return one row per input. ``fit`` builds the backbone and learns
    the output width (``n_features_out_``); ``transform`` before ``fit`` raises ``NotFittedError``, as
    every scikit-learn transformer does.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", layer: str | None = None, weights: str | None = None,
                 device: str = "auto", batch_size: int = 32, workers: int = 0, input_size: int | None = None,
                 pretrained: bool = True, decode: str = "pil", runtime: str = "auto", cache_dir: str = "cache"):
        self.backbone, self.layer, self.weights, self.device = backbone, layer, weights, device
        self.batch_size, self.workers, self.input_size, self.pretrained = batch_size, workers, input_size, pretrained
        self.decode, self.runtime, self.cache_dir = decode, runtime, cache_dir

    def fit(self, X=None, y=None):
        """Build the backbone (X and y are not needed: the network is pretrained)."""
        self.backbone_ = create_backbone(self.backbone, self.layer, self.weights, pretrained=self.pretrained,
                                         input_size=self.input_size)
        self.device_ = resolve_device(self.device)
        self.runtime_ = resolve_runtime(self.runtime, str(self.device_), self.backbone_.precision)
        size = self.backbone_.preprocess.input_size
        with torch.inference_mode():  # one blank image tells the width of any tap
            self.n_features_out_ = int(self.backbone_(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1])
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self)
        files = [Path(x) for x in X]
        out = [None] * len(files)
        for indices, feats, failures in iter_features(self.backbone_, files, self.device_, self.batch_size,
                                                      self.workers, progress=False, decode=self.decode,
                                                      runtime=self.runtime_, cache_dir=self.cache_dir):
            if failures:
                i, reason = failures[0]
                raise FeatxError(f"{files[i]} could not be read ({reason}): remove it or replace it with an image")
            for i, row in zip(indices, feats):
                out[i] = row
        return np.stack(out).astype(np.float32) if out else np.zeros((0, self.n_features_out_), np.float32)

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self)
        return np.asarray([f"{self.backbone}_{i}" for i in range(self.n_features_out_)], dtype=object)
