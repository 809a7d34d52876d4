"""The model file: one typed object, ``ModelFile``, saved as safetensors and verified on load.

A model file holds tensors only (loading it cannot execute code); its metadata holds a JSON manifest
(classes, the feature identity its head was fitted on, the head's kind and selected hyper-parameters)
and a SHA-256 digest over manifest and tensors. Loading refuses files without a matching digest.
Heads fitted on cached features and fine-tuned networks share the format: a fine-tuned model also
carries the backbone's tensors. How tensors are named inside the file is private to this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx import __version__
from .errors import FeatxError
from .files import atomic_write
from .identity import FEATURE_CODE, FeatureIdentity

FORMAT = "featx-model-1"
MODEL_NAME = "model.featx"
HEAD, BACKBONE = "head.", "backbone."  # tensor-name prefixes inside the file
KNOWN = {"kind", "classes", "identity", "preprocess", "head", "weights_file", "format", "featx_version", "created"}


def digest(manifest_json: str, tensors: dict) -> str:
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype.str}|{t.shape}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


@dataclass
class ModelFile:
    """What ``model.featx`` holds. ``kind`` is ``head`` (stage 2) or ``finetuned`` (stage 3, with
    ``backbone_state``); ``info`` keeps the rest of the manifest (dataset, selection, run options)."""

    kind: str
    classes: list
    identity: FeatureIdentity
    preprocess: dict
    head_config: dict
    head_arrays: dict
    backbone_state: dict | None = None
    weights_file: str | None = None
    info: dict = field(default_factory=dict)
    path: Path | None = None

    def manifest(self) -> dict:
        return {**self.info, "kind": self.kind, "classes": self.classes, "identity": self.identity.as_dict(),
                "preprocess": self.preprocess, "head": self.head_config, "weights_file": self.weights_file}

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {HEAD + k: np.ascontiguousarray(v) for k, v in self.head_arrays.items()}
        tensors |= {BACKBONE + k: np.ascontiguousarray(v) for k, v in (self.backbone_state or {}).items()}
        manifest = {**self.manifest(), "format": FORMAT, "featx_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = json.dumps(manifest, sort_keys=True, default=str)
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "manifest": text,
                                                   "sha256": digest(text, tensors)})
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelFile":
        """A file featx wrote, verified; anything else is refused with one line."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FeatxError(f"model file {path} does not exist: pass the model.featx that fit-head or finetune wrote")
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            raise FeatxError(f"{path} is not a featx model file: pass the model.featx that fit-head or finetune "
                             "wrote") from None
        if meta.get("format") != FORMAT or "manifest" not in meta:
            raise FeatxError(f"{path} was not written by featx ({FORMAT}): refit it with featx fit-head")
        if digest(meta["manifest"], tensors) != meta.get("sha256"):
            raise FeatxError(f"{path} fails its SHA-256 check (changed after featx wrote it): refit or restore it")
        m = json.loads(meta["manifest"])
        identity = FeatureIdentity.from_mapping(m["identity"])
        if identity.code != FEATURE_CODE:
            raise FeatxError(f"{path} was fitted on features of featx's feature code {identity.code}, and this featx "
                             f"computes version {FEATURE_CODE}: refit it with featx fit-head (or finetune)")
        backbone = {k[len(BACKBONE):]: v for k, v in tensors.items() if k.startswith(BACKBONE)}
        return cls(kind=m["kind"], classes=m["classes"], identity=identity,
                   preprocess=m["preprocess"], head_config=m["head"],
                   head_arrays={k[len(HEAD):]: v for k, v in tensors.items() if k.startswith(HEAD)},
                   backbone_state=backbone or None, weights_file=m.get("weights_file"),
                   info={k: v for k, v in m.items() if k not in KNOWN}, path=path)


def stored_manifest(path: str | os.PathLike) -> dict:
    """A model file's manifest, read without its tensors (for showing what it records; ``load`` verifies)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return json.loads((f.metadata() or {}).get("manifest", "{}"))
