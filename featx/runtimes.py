"""Runtimes: where a frozen backbone's forward pass runs, torch or ONNX Runtime.

On a CPU, ONNX Runtime runs the same network several times faster than eager torch (lite0: 2.9× on two
cores, BENCHMARKS.md). The network is exported once per feature identity (plus opset and torch version)
into ``<cache>/onnx/``, checked against torch on a small batch before it is kept, and reused after. The
features are interchangeable (cosine >= 0.9999 per row), so the runtime is not part of the feature
identity: both runtimes share one cache.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import FeatxError, first_line
from .devices import HalvingForward, cpu_threads, prepare
from .files import atomic_write
from .identity import FeatureIdentity

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "onnxruntime")
OPSET = 17
AGREEMENT = 0.9999  # cosine per row between ONNX Runtime and torch, checked on export


def resolve_runtime(runtime: str, device: str, precision: str) -> str:
    """``auto``: ONNX Runtime on a CPU at fp32 (when installed), torch otherwise. ``device`` is a name."""
    if runtime not in RUNTIMES:
        raise FeatxError(f"--runtime {runtime} is not supported: use {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    usable = device == "cpu" and precision == "fp32"
    if runtime == "onnxruntime" and not usable:
        raise FeatxError("--runtime onnxruntime runs fp32 on the CPU: use --device cpu --precision fp32, "
                         "or --runtime torch")
    if importlib.util.find_spec("onnxruntime") is None:
        if runtime == "onnxruntime":
            raise FeatxError("--runtime onnxruntime needs the onnxruntime package: pip install onnxruntime")
        return "torch"
    return "onnxruntime" if usable else "torch"


class OnnxForward:
    """A backbone's forward pass in ONNX Runtime: uint8 NCHW images in, float32 features out."""

    def __init__(self, model: Path | bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.log_severity_level = 3
        model = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.notes: list = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.run(images.numpy()))

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


def onnx_path(cache_dir: str | os.PathLike, identity: FeatureIdentity) -> Path:
    """Where the export of a feature identity lives (it also depends on the opset and the exporting torch,
    whose version is read from its metadata, so finding an export needs no torch)."""
    digest = identity.digest(opset=OPSET, torch=importlib.metadata.version("torch"))
    return Path(cache_dir) / "onnx" / f"{identity.backbone.replace(':', '-')}__{identity.layer}__{digest}.onnx"


def onnx_model(net, cache_dir: str | os.PathLike) -> Path | None:
    """The exported network's file, exporting and checking it first if needed; None (after one line on
    stderr) when this architecture or tap does not export, or disagrees with torch: the caller stays on torch."""
    path = onnx_path(cache_dir, net.identity())
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                export(net, tmp)
                agreement = check(net, OnnxForward(tmp))
                if agreement < AGREEMENT:
                    raise ValueError(f"its features agree with torch's only to cosine {agreement:.6f}")
        except Exception as exc:
            print(f"featx: {net.spec.name}:{net.tap_name} does not run in ONNX Runtime "
                  f"({type(exc).__name__}: {first_line(exc)}); using torch",
                  file=sys.stderr)
            return None
    return path


def embedding(net, device: torch.device, onnx: Path | bytes | None = None, threads: int | None = None):
    """The forward pass extraction runs: the ONNX model when there is one (a file or its bytes), else torch,
    which halves the batch when the device runs out of memory."""
    if onnx is not None:
        return OnnxForward(onnx, threads)
    return HalvingForward(prepare(net, device), device)


def export(net, path: Path) -> None:
    import torch

    size = net.preprocess.input_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        torch.onnx.export(net.cpu().eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})


def check(net, onnx: OnnxForward) -> float:
    """The lowest per-row cosine between the two runtimes on a seeded batch of random images."""
    import torch

    size = net.preprocess.input_size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = net.cpu().eval()(images).float().numpy()
    out = onnx(images).numpy()
    cosine = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return float(cosine.min())
