"""Network: a backbone as a runtime module, uint8 images in, features at one tap out.

``backbones.create_backbone`` builds it; the registry itself (``backbones.py``) holds specs as data and
imports no torch, so a command that only needs to know a cache is up to date never loads torch.
"""
from __future__ import annotations

import torch
from torch import nn

from .specs import BackboneSpec, Preprocess, feature_identity
from .identity import FeatureIdentity


class StopForward(Exception):
    """Raised by the tap hook so the network stops once the requested features exist."""


class Backbone(nn.Module):
    """A pretrained network that takes uint8 NCHW images and returns features at one tap.

    Normalisation lives inside, so callers feed the uint8 tensors that data loading produces and
    the float conversion happens on the device.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, tap: str, preprocess: Preprocess,
                 weights_id: str, weights_sha256: str):
        super().__init__()
        self.spec, self.model, self.tap_name, self.preprocess = spec, model, tap, preprocess
        self.weights_id, self.weights_sha256 = weights_id, weights_sha256
        self.precision, self.tta = "fp32", "none"
        self.tap = spec.taps[tap]
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255, persistent=False)
        self._captured = None
        module = model.get_submodule(self.tap.module)
        if self.tap.kind == "input":
            module.register_forward_pre_hook(self._grab_input)
        else:
            module.register_forward_hook(self._grab_output)

    def _grab_input(self, module, args):
        self._captured = args[0]
        raise StopForward

    def _grab_output(self, module, args, output):
        self._captured = output
        raise StopForward

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features at the tap; with ``tta="flip"``, the mean of the image's and its mirror's."""
        if self.tta == "flip":
            return (self.tap_features(images) + self.tap_features(images.flip(3))) / 2
        return self.tap_features(images)

    def tap_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images) if images.dtype == torch.uint8 else images
        try:
            self.model(x)
        except StopForward:
            pass
        out, self._captured = self._captured, None
        if out is None:
            raise RuntimeError(f"tap {self.tap_name} ({self.tap.module}) was never reached")
        if self.tap.kind == "gap" and out.dim() == 4:
            out = out.mean(dim=(2, 3))
        return out.flatten(1)

    def identity(self) -> FeatureIdentity:
        return feature_identity(self.spec, (self.weights_id, self.weights_sha256), self.tap_name, self.preprocess,
                                self.precision, self.tta)

    def block_parameters(self, block: str) -> list[nn.Parameter]:
        prefixes = self.spec.blocks[block]
        return [p for n, p in self.model.named_parameters() if any(n == q or n.startswith(f"{q}.") for q in prefixes)]
