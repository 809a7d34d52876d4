"""Export: a whole classifier (backbone at its tap, head, calibration) as one ONNX file, runnable without featx.

The graph takes uint8 images, N×3×H×W, already resized and centre-cropped as the model's preprocessing says
(the metadata says how), and gives class probabilities: normalisation, the frozen or fine-tuned backbone, the
head's standardisation, its linear layers and its calibration are all inside. torch's ONNX exporter writes it
from the head's own torch form (``Head.to_torch``), which computes what its numpy ``predict_proba`` does; the file is checked by
``onnx.checker`` and, in ONNX Runtime, against featx's own probabilities before it is kept. Its
``metadata_props`` carry the class names, the preprocessing and a SHA-256 of the graph, which ``featx predict``
checks before it trusts the file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from featx import __version__
from featx.errors import FeatxError, first_line
from featx.files import atomic_write, file_digest, full_disk, make_folder, not_writable, room

from .onnxfile import DIGEST_KEY, FORMAT, stamp

AGREEMENT = 1e-4  # largest difference in probability between ONNX Runtime and featx, checked on export


def export_model(model: str | os.PathLike, out: str | os.PathLike | None = None, opset: int = 17,
                 batch: str | int = "dynamic", quantize: str | None = None, force: bool = False) -> Path:
    """Write ``out`` (default: beside the model, ``model.onnx``) and return its path. ``batch``: ``dynamic`` (any
    number of images a call) or a fixed number, for runtimes that want static shapes. ``quantize="int8"``:
    ONNX Runtime's dynamic quantisation, kept only when accuracy on the model's own val split (else train) drops
    by at most ``QUANTIZE_TOLERANCE`` (or ``force``), never decided on test; the figures are in the metadata."""
    if quantize not in (None, "int8"):
        raise FeatxError(f"--quantize {quantize}: use int8")
    if batch != "dynamic" and not (str(batch).isdigit() and int(batch) > 0):
        raise FeatxError(f"--batch {batch}: use dynamic or a positive whole number")
    import onnx
    import torch

    from .predictor import load_predictor
    from featx.extraction.runtimes import write_onnx

    predictor = load_predictor(model)
    net, head = predictor.backbone.cpu().eval(), predictor.head.to_torch().eval()
    columns = np.asarray(predictor.head.classes_, dtype=int)
    n_classes = len(predictor.classes)

    spread = torch.zeros(len(columns), n_classes, dtype=torch.float64)
    spread[torch.arange(len(columns)), torch.as_tensor(columns)] = 1  # the head's columns onto every class

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.head = net, head
            self.register_buffer("spread", spread)

        def forward(self, images):
            return (self.head(self.net(images).float()) @ self.spread).float()

    pre = predictor.preprocess
    size = pre.input_size
    out = Path(out or Path(predictor.path).with_suffix(".onnx"))
    weights = sum(t.numel() * 8 for t in [*net.parameters(), *net.buffers(), *head.buffers()])  # fp32 file, int8 copy, margin
    with room(out.parent, weights + (1 << 20)), atomic_write(make_folder(out.parent) / out.name) as tmp:
        try:
            write_onnx(Classifier().eval(), size, tmp, ["probabilities"], opset,
                       None if batch == "dynamic" else int(batch))
        except Exception as exc:  # an operator the exporter cannot write, at this opset or at all
            if full_disk(exc) or not_writable(exc):
                raise  # said as such by ``room``
            raise FeatxError(f"{net.spec.name}:{net.tap_name} does not export to ONNX ({type(exc).__name__}: "
                             f"{first_line(exc)}): try another --opset, or serve the model.featx with featx") from None
        graph = onnx.load(str(tmp))
        metadata = {"format": FORMAT, "classes": json.dumps(predictor.classes), "input_size": str(size),
                    "resize_size": str(pre.resize_size), "interpolation": pre.interpolation,
                    "crop": "centre", "preprocessing": json.dumps(recipe(pre)),
                    "mean": json.dumps(list(pre.mean)), "std": json.dumps(list(pre.std)),
                    "normalisation": "inside the graph: feed uint8 RGB pixels, N x 3 x H x W",
                    "tta": predictor.model.identity.tta, "featx_version": __version__, "batch": str(batch),
                    "model_sha256": file_digest(predictor.path),
                    "provenance": json.dumps(predictor.model.info.get("provenance"))}
        stamp(graph, metadata)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        check_agreement(tmp, predictor, size, 4 if batch == "dynamic" else int(batch))
        if quantize:
            quantized(tmp, predictor, force)
    return out


def recipe(pre) -> dict:
    """Everything featx does to an image file before the graph (``images.open_rgb``, then
    ``Preprocess.pil_array``), in words exact enough to reimplement; the README's snippet follows it."""
    resize, crop = pre.resize_size, pre.input_size
    return {
        "decode": f"Pillow Image.open; a JPEG is first given img.draft('RGB', ({resize}, {resize})), so large JPEGs "
                  "decode at a reduced scale (1/2, 1/4 or 1/8) no smaller than that",
        "orientation": "PIL.ImageOps.exif_transpose: the EXIF orientation is applied",
        "mode": "16- and 32-bit (I;16*, I): value * 255 / 65535 (I: / (2**31 - 1) when its maximum exceeds 65535), "
                "F: * 255 when its maximum is at most 1, else as it is; rounded (numpy rint), clipped to 0..255, "
                "as 8-bit grey; PA, and P with a transparency entry, to RGBA; RGBA and LA composited on white "
                "(255, 255, 255) with their alpha as mask; everything else (L, P, CMYK, YCbCr, 1) Image.convert('RGB')",
        "resize": f"shorter side to {resize}, longer side int({resize} * long / short) (truncated); no resize when "
                  f"the image already has that size; Image.resize with Image.Resampling.{pre.interpolation.upper()}",
        "crop": f"{crop} x {crop}; a side shorter than {crop} is first padded with zeros, (d // 2) before and "
                f"(d + 1) // 2 after, d = {crop} - side; top = round((height - {crop}) / 2), left = "
                f"round((width - {crop}) / 2), Python's round (halves to even)",
        "input": f"uint8 RGB, N x 3 x {crop} x {crop} (channels first); normalisation is inside the graph",
    }


QUANTIZE_TOLERANCE = 0.01  # accuracy int8 may lose on the split that decides (val, else train)


def quantized(path: Path, predictor, force: bool) -> None:
    """Replace the export at ``path`` by its int8 (dynamic) quantisation. Whether to keep it is decided on the
    model's val split (train, where its head was cross-validated, when there is none), never on test: a drop
    beyond ``QUANTIZE_TOLERANCE`` there is refused in one line unless ``force``. Test, when there is one, is
    measured afterwards and only reported."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .predictor import exported_proba

    splits = model_splits(predictor)
    decides = "val" if "val" in splits else "train"
    small = path.with_name(path.name + ".int8")
    root_logger, level = logging.getLogger(), logging.getLogger().level
    try:
        root_logger.setLevel(logging.ERROR)  # its advice on pre-processing and the float64 head it leaves alone
        try:
            quantize_dynamic(str(path), str(small), weight_type=QuantType.QInt8)
        finally:
            root_logger.setLevel(level)
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props if p.key != DIGEST_KEY}
        graph = onnx.load(str(small))
        stamp(graph, meta)
        onnx.save(graph, str(small))

        def accuracy(split: str) -> dict:
            files, labels = splits[split]
            found = {}
            for name, candidate in (("fp32", path), ("int8", small)):
                proba = exported_proba(candidate, files)[1][0]
                kept = ~np.isnan(proba).any(1)
                found[name] = float((proba[kept].argmax(1) == labels[kept]).mean())
            return found

        decided = accuracy(decides)
        drop = decided["fp32"] - decided["int8"]
        if drop > QUANTIZE_TOLERANCE and not force:
            raise FeatxError(f"int8 loses {drop:.4f} of accuracy on the model's {len(splits[decides][0])} {decides} "
                             f"images ({decided['fp32']:.4f} -> {decided['int8']:.4f}): not written; --force writes it")
        report = {"quantized": "int8", "quantize_decided_on": decides, f"{decides}_accuracy_fp32": f"{decided['fp32']:.4f}",
                  f"{decides}_accuracy_int8": f"{decided['int8']:.4f}", f"{decides}_images": str(len(splits[decides][0]))}
        if "test" in splits:  # after the decision, which it cannot change
            tested = accuracy("test")
            report |= {"test_accuracy_fp32": f"{tested['fp32']:.4f}", "test_accuracy_int8": f"{tested['int8']:.4f}",
                       "test_images": str(len(splits["test"][0]))}
        stamp(graph, {**meta, **report})
        onnx.save(graph, str(path))
    finally:
        small.unlink(missing_ok=True)


def model_splits(predictor) -> dict:
    """{split: (image files, class indices in the model's order)} of the model's own data (from its feature cache,
    or its fine-tuning data); one line when it has no train or val images here."""
    from featx import data as data_mod

    info = predictor.model.info
    root = info.get("finetune", {}).get("data")
    if root is None and info.get("features") and Path(info["features"]).is_file():
        from featx.extraction import store

        root = store.load(info["features"]).attrs["dataset_root"]
    ds = data_mod.load(root) if root and Path(root).is_dir() else None
    if ds is None or not {"train", "val"} & set(ds.split_names()):
        raise FeatxError("--quantize int8 decides on the model's own val split (or train), and its data is not "
                         "here: export without --quantize")
    found = {}
    for split in ds.split_names():
        paths, labels = ds.subset(split)
        found[split] = [ds.root / p for p in paths], np.asarray([predictor.classes.index(ds.classes[c]) for c in labels])
    return found


def check_agreement(path: Path, predictor, size: int, count: int) -> None:
    """ONNX Runtime's probabilities on seeded random images against featx's (torch backbone, numpy head)."""
    import torch

    from featx.heads.base import proba_over
    from featx.extraction.runtimes import OnnxForward

    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = predictor.backbone(images).float().numpy()
    expected = proba_over(predictor.head, features, len(predictor.classes))
    got = OnnxForward(path).run(images.numpy())
    gap = float(np.abs(got - expected).max())
    if gap > AGREEMENT:
        raise FeatxError(f"the exported model's probabilities differ from featx's by {gap:.2g} (more than "
                         f"{AGREEMENT:g}): not written")

