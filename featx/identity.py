"""The feature identity: what makes two sets of features interchangeable.

The cache names its files by it, the model file records it, and fine-tuning and prediction check it
before they trust a head with features: same backbone, same weights (by content), same tap, same
preprocessing, same version of featx's feature code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields


FEATURE_CODE = "1"  # featx's preprocessing and tap code: bump it when a change there changes any feature
UNRECORDED_CODE = "1"  # files written before the version was recorded were made by version 1's code


@dataclass(frozen=True)
class FeatureIdentity:
    backbone: str
    weights: str  # what the weights are called: an enum name, a package, file:<name>, finetuned:<sha>
    weights_sha256: str
    layer: str
    transform: str  # Preprocess.key(): resize, crop, interpolation, mean, std
    precision: str = "fp32"  # fp32, or the autocast dtype the network ran under (bf16, fp16)
    tta: str = "none"  # test-time augmentation: none, or flip (the mean of an image's and its mirror's features)
    code: str = FEATURE_CODE  # the version of featx's preprocessing and tap code that computed the features

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, mapping) -> "FeatureIdentity":
        """From a model manifest's ``identity`` or a cache file's attributes (extra keys ignored; files
        written before precision or tta was recorded are fp32, without tta)."""
        missing = [f.name for f in fields(cls) if f.name not in mapping and f.default is MISSING]
        if missing:
            raise KeyError(f"feature identity lacks {', '.join(missing)}")
        return cls(**{"code": UNRECORDED_CODE,
                      **{f.name: str(mapping[f.name]) for f in fields(cls) if f.name in mapping}})

    def digest(self, **extra) -> str:
        """A short digest of the identity plus storage options (e.g. dtype), for file names."""
        key = json.dumps({**self.as_dict(), **extra}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:10]

    def differences(self, other: "FeatureIdentity") -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]
