"""Runtimes: where a frozen backbone's forward pass runs, torch or ONNX Runtime.

On a CPU, ONNX Runtime runs the same network several times faster than eager torch (lite0: 2.9× on two
cores, BENCHMARKS.md). The network is exported once per feature identity (plus opset and torch version)
into ``<cache>/onnx/``, checked against torch on a small batch before it is kept, and reused after. The
features are interchangeable (cosine >= 0.9999 per row), so the runtime is not part of the feature
identity: both runtimes share one cache.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx.errors import FeatxError, first_line
from featx.devices import HalvingForward, cpu_threads, prepare
from featx.files import atomic_write, file_digest, remove_stale_temporaries, room
from featx.identity import FeatureIdentity

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "onnxruntime")
OPSET = 17
AGREEMENT = 0.9999  # cosine per row between ONNX Runtime and torch, checked on export
EXPORT_BYTES_PER_PARAMETER = 5  # float32 weights and the graph around them (lite0: 13.4 MB for 4.7M parameters)


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
    """A backbone's forward pass in ONNX Runtime: uint8 NCHW images in, float32 features out (every tap's)."""

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
        """The features of every tap the export has (one output each), side by side as ``Backbone`` gives them."""
        outputs = self.session.run(None, {"images": images})
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)


def onnx_path(cache_dir: str | os.PathLike, identity: FeatureIdentity | list[FeatureIdentity]) -> Path:
    """Where the export of a feature identity (or of several taps' in one network) lives; it also depends on
    the opset and the exporting torch, whose version is read from its metadata, so finding an export needs
    no torch."""
    first, *more = identity if isinstance(identity, list) else [identity]
    taps = {"taps": [i.layer for i in more]} if more else {}
    digest = first.digest(opset=OPSET, torch=importlib.metadata.version("torch"), **taps)
    layers = "+".join([first.layer, *(i.layer for i in more)])
    return Path(cache_dir) / "onnx" / f"{first.backbone.replace(':', '-')}__{layers}__{digest}.onnx"


def onnx_model(net, cache_dir: str | os.PathLike) -> Path | None:
    """The exported network's file, verified against the SHA-256 recorded when it was made (``verified``),
    exporting and checking it first when it is missing or failed; None (after one line on stderr) when this
    architecture or tap does not export, or disagrees with torch: the caller stays on torch. Temporary files
    of an export killed midway are removed first."""
    path = onnx_path(cache_dir, net.identities())
    remove_stale_temporaries(path.parent)
    if verified(path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with room(path.parent, EXPORT_BYTES_PER_PARAMETER * sum(p.numel() for p in net.parameters()), "--cache-dir"), \
                atomic_write(path) as tmp:
            export(net, tmp)
            agreement = check(net, OnnxForward(tmp))
            if agreement < AGREEMENT:
                raise ValueError(f"its features agree with torch's only to cosine {agreement:.6f}")
            with atomic_write(sidecar(path)) as record:
                record.write_text(file_digest(tmp))
    except FeatxError:
        raise
    except Exception as exc:
        print(f"featx: {net.spec.name}:{net.tap_name} does not run in ONNX Runtime "
              f"({type(exc).__name__}: {first_line(exc)}); using torch",
              file=sys.stderr)
        return None
    return path


def sidecar(path: Path) -> Path:
    """Where an export's SHA-256, recorded when it was made, is kept."""
    return path.with_name(path.name + ".sha256")


def verified(path: Path) -> str | None:
    """The export's SHA-256 when its bytes still hash to the one recorded when it was made. Otherwise None: a
    missing file silently; a damaged, truncated or replaced one, or one made before featx recorded digests,
    after one line on stderr and with the file removed, so that it is exported again."""
    if not path.is_file():
        return None
    try:
        recorded = sidecar(path).read_text().strip()
    except FileNotFoundError:
        recorded = None
    if recorded and file_digest(path) == recorded:
        return recorded
    why = "its SHA-256 differs from the one recorded when it was made" if recorded else \
        "no SHA-256 was recorded when it was made (an older featx)"
    print(f"featx: {path} cannot be trusted ({why}): removed; it is exported again", file=sys.stderr)
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)
    return None


def export_failed(path: Path, digest: str) -> bool:
    """Whether an export that rows were computed with (``digest`` recorded in the cache) is still here but no
    longer hashes to it: damaged or replaced since, so those rows are not to be trusted."""
    return path.is_file() and file_digest(path) != digest


def embedding(net, device: torch.device, onnx: Path | bytes | None = None, threads: int | None = None):
    """The forward pass extraction runs: the ONNX model when there is one (a file or its bytes), else torch,
    which halves the batch when the device runs out of memory."""
    if onnx is not None:
        return OnnxForward(onnx, threads)
    return HalvingForward(prepare(net, device), device)


def export(net, path: Path) -> None:
    """The network as ONNX: uint8 ``images`` in, one output per tap, named by the tap (``features`` for one)."""
    import torch

    class PerTap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net.per_tap(images)

    write_onnx(PerTap().cpu().eval(), net.preprocess.input_size, path,
               list(net.tap_names) if len(net.tap_names) > 1 else ["features"])


def write_onnx(module, size: int, path: Path, outputs: list, opset: int = OPSET, batch: int | None = None) -> None:
    """``module`` (uint8 ``images`` of ``size`` pixels in, ``outputs`` out) as an ONNX file, by torch's
    TorchScript exporter; the batch dimension is dynamic unless ``batch`` fixes it."""
    import torch

    example = torch.zeros(batch or 2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), quiet_output():  # the TorchScript exporter warns that it is the legacy one
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=outputs,
                          dynamic_axes=None if batch else {name: {0: "batch"} for name in ["images", *outputs]})


@contextlib.contextmanager
def quiet_output():
    """File descriptors 1 and 2 to /dev/null for a while: torch's TorchScript exporter always enables its C++ log
    (its ``setup_onnx_logging`` tests a function for truth), which prints the whole graph to stdout when an
    export fails, and would break ``--json``; the caller says why in one line instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def check(net, onnx: OnnxForward) -> float:
    """The lowest per-row cosine between the two runtimes on a seeded batch of random images, tap by tap."""
    import torch

    size = net.preprocess.input_size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        refs = [t.float().numpy() for t in net.cpu().eval().per_tap(images)]
    outs = onnx.session.run(None, {"images": images.numpy()})
    return min(float(((out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1),
                                                       1e-12)).min()) for out, ref in zip(outs, refs))
