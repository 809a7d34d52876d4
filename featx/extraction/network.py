"""Network: a backbone as a runtime module, uint8 images in, features at one tap or several out.

``backbones.create_backbone`` builds it; the registry itself (``backbones.py``) holds specs as data and
imports no torch, so a command that only needs to know a cache is up to date never loads torch.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from .specs import BackboneSpec, Preprocess, feature_identity
from featx.identity import FeatureIdentity


class StopForward(Exception):
    """Raised by a tap hook once every requested tap has its features, so the network runs no further."""


class Backbone(nn.Module):
    """A pretrained network that takes uint8 NCHW images and returns features at one tap or several.

    Several taps come from one forward pass (a hook per tap; the pass stops once the deepest has fired),
    concatenated in ``tap_names`` order; ``split`` cuts such rows back into one array per tap.
    Normalisation lives inside, so callers feed the uint8 tensors that data loading produces and the float
    conversion happens on the device.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, taps: str | Sequence[str], preprocess: Preprocess,
                 weights_id: str, weights_sha256: str):
        super().__init__()
        self.spec, self.model, self.preprocess = spec, model, preprocess
        self.tap_names = (taps,) if isinstance(taps, str) else tuple(taps)
        self.tap_name = ",".join(self.tap_names)
        self.weights_id, self.weights_sha256 = weights_id, weights_sha256
        self.precision, self.tta = "fp32", "none"
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255, persistent=False)
        self._captured: dict = {}
        self._hooks = []
        for name in self.tap_names:
            tap = spec.taps[name]
            module = model.get_submodule(tap.module)
            self._hooks.append(module.register_forward_pre_hook(partial(self._grab_input, name)) if tap.kind == "input"
                               else module.register_forward_hook(partial(self._grab_output, name)))

    def remove_hooks(self) -> None:
        """Leave ``model`` as it was given: for a network built over another's modules (``boundary.py``)."""
        for hook in self._hooks:
            hook.remove()

    def _grab_input(self, name, module, args):
        self._keep(name, args[0])

    def _grab_output(self, name, module, args, output):
        self._keep(name, output)

    def _keep(self, name: str, value: torch.Tensor) -> None:
        self._captured[name] = value
        if len(self._captured) == len(self.tap_names):
            raise StopForward

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features at the taps, side by side; with ``tta="flip"``, the mean of the image's and its mirror's."""
        outputs = self.per_tap(images)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)

    def per_tap(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One feature tensor per tap (the ONNX export's outputs)."""
        outputs = self.tap_features(images)
        if self.tta == "flip":
            outputs = tuple((a + b) / 2 for a, b in zip(outputs, self.tap_features(images.flip(3))))
        return outputs

    def tap_features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(images) if images.dtype == torch.uint8 else images
        try:
            self.model(x)
        except StopForward:
            pass
        captured, self._captured = self._captured, {}
        missing = [n for n in self.tap_names if n not in captured]
        if missing:
            raise RuntimeError(f"taps {', '.join(missing)} of {self.spec.name} were never reached")
        outputs = []
        for name in self.tap_names:
            out = captured[name]
            if self.spec.taps[name].kind == "gap" and out.dim() == 4:
                out = out.mean(dim=(2, 3))
            outputs.append(out.flatten(1))
        return tuple(outputs)

    def input_of(self, module: str, images: torch.Tensor) -> torch.Tensor:
        """What the named module receives for uint8 ``images``; the network runs no further than it."""
        grabbed = []

        def grab(_module, args):
            grabbed.append(args[0])
            raise StopForward

        handle = self.model.get_submodule(module).register_forward_pre_hook(grab)
        try:
            self.model(self.normalize(images))
        except StopForward:
            pass
        finally:
            handle.remove()
            self._captured = {}  # a tap below the module may have fired
        if not grabbed:
            raise RuntimeError(f"{module} of {self.spec.name} is never reached before its taps")
        return grabbed[0]

    def tap_dims(self) -> list[int]:
        """Each tap's width, from one blank image at the input size (a flattened tap's depends on it)."""
        size, device = self.preprocess.input_size, self.mean.device
        with torch.inference_mode():
            return [int(t.shape[1]) for t in self.tap_features(torch.zeros(1, 3, size, size, device=device))]

    def identities(self) -> list[FeatureIdentity]:
        """The feature identity of each tap: what a single-tap network at that tap would write."""
        return [feature_identity(self.spec, (self.weights_id, self.weights_sha256), tap, self.preprocess,
                                 self.precision, self.tta) for tap in self.tap_names]

    def identity(self) -> FeatureIdentity:
        if len(self.tap_names) > 1:
            raise ValueError(f"a network at {len(self.tap_names)} taps has one identity per tap: use identities()")
        return self.identities()[0]

    def block_parameters(self, block: str) -> list[nn.Parameter]:
        prefixes = self.spec.blocks[block]
        return [p for n, p in self.model.named_parameters() if any(n == q or n.startswith(f"{q}.") for q in prefixes)]


def tap_dims(spec: BackboneSpec) -> dict[str, int]:
    """Every tap's width (``logits`` aside) at the spec's input size, from a forward pass on the ``meta``
    device: shapes only, no memory, no weights."""
    taps = [t for t in spec.taps if t != "logits"]
    with torch.device("meta"):
        net = Backbone(spec, spec.build(), taps, spec.preprocess, "meta", "meta")
        size = spec.preprocess.input_size
        outputs = net.tap_features(torch.zeros(1, 3, size, size))
    return {tap: int(out.shape[1]) for tap, out in zip(taps, outputs)}
