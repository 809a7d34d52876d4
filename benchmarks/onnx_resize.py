"""Can ONNX's Resize stand in for featx's Pillow preprocessing? On real photos, as they are and upscaled into large
JPEGs (which featx decodes in JPEG draft mode), three pixel sets per photo, at the backbone's preprocessing:

  featx   featx's own: draft decode where it applies, Pillow resize, centre crop (``Preprocess.pil_array``)
  pillow  the full decode, Pillow resize and crop (what featx does where no draft applies)
  onnx    the full decode through ``resize_graph`` (ONNX Runtime's antialiased Resize, then the crop)

and the cosine of the backbone's features between them (the bar: 0.9999), plus pixel differences.

    python benchmarks/onnx_resize.py --data ../shared/data/hymenoptera/val --count 60
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from common import machine
from featx.extraction.backbones import create_backbone
from featx.extraction.images import open_rgb


RESIZE_OPSET = 18  # Resize's antialias attribute: Pillow's downscaling filter, stretched by the scale


def resize_graph(pre, opset: int = RESIZE_OPSET):
    """An ONNX graph from one upright RGB image of any size, uint8 H x W x 3 (``pixels``), to ``images`` (uint8
    1 x 3 x crop x crop): ``pil_array``'s resize (shorter side to ``resize_size``, the longer one truncated,
    antialiased) and centre crop (halves rounded to even), in ONNX's Resize. Images smaller than the crop are
    not padded here: they are refused by the Slice."""
    from onnx import TensorProto, helper

    resize, crop = pre.resize_size, pre.input_size
    const = lambda name, values, kind=TensorProto.INT64: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, kind, [len(values)], values))
    mode = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}[pre.interpolation]
    nodes = [
        const("resize", [resize]), const("crop", [crop, crop]), const("two", [2.0, 2.0], TensorProto.FLOAT),
        const("batch_channels", [1, 3]), const("hw_axes", [0]), const("hw_end", [2]), const("axes", [2, 3]),
        helper.make_node("Shape", ["pixels"], ["shape"]),
        helper.make_node("Slice", ["shape", "hw_axes", "hw_end"], ["hw"]),
        helper.make_node("ReduceMin", ["hw"], ["short"], keepdims=1),
        helper.make_node("Mul", ["hw", "resize"], ["scaled"]),
        helper.make_node("Div", ["scaled", "short"], ["new_hw"]),  # integer division: int(resize * n / short)
        helper.make_node("Concat", ["batch_channels", "new_hw"], ["sizes"], axis=0),
        helper.make_node("Cast", ["pixels"], ["float_pixels"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["float_pixels"], ["chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["chw", "hw_axes"], ["nchw"]),
        helper.make_node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode=mode, antialias=1,
                         coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.5,
                         nearest_mode="floor"),
        helper.make_node("Sub", ["new_hw", "crop"], ["spare"]),
        helper.make_node("Cast", ["spare"], ["float_spare"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["float_spare", "two"], ["half_spare"]),
        helper.make_node("Round", ["half_spare"], ["rounded"]),  # halves to even, as Python's round
        helper.make_node("Cast", ["rounded"], ["starts"], to=TensorProto.INT64),
        helper.make_node("Add", ["starts", "crop"], ["ends"]),
        helper.make_node("Slice", ["resized", "starts", "ends", "axes"], ["cropped"]),
        helper.make_node("Round", ["cropped"], ["whole"]),
        helper.make_node("Clip", ["whole", "zero", "full"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["images"], to=TensorProto.UINT8),
    ]
    nodes.insert(0, helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])))
    nodes.insert(0, helper.make_node("Constant", [], ["full"], value=helper.make_tensor("full", TensorProto.FLOAT, [], [255.0])))
    graph = helper.make_graph(nodes, "featx_resize",
                              [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["height", "width", 3])],
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, crop, crop])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def pixel_sets(files: list, pre, session) -> dict:
    sets = {"featx": [], "pillow": [], "onnx": []}
    for f in files:
        full = open_rgb(f)
        sets["featx"].append(pre.pil_array(open_rgb(f, pre.resize_size)))
        sets["pillow"].append(pre.pil_array(full))
        sets["onnx"].append(session.run(None, {"pixels": np.asarray(full)})[0][0])
    return {k: np.stack(v) for k, v in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a folder of photos (searched recursively)")
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--upscale", type=int, default=6, help="the large JPEGs: each photo this many times larger")
    args = ap.parse_args()
    photos = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    photos = [photos[i] for i in np.linspace(0, len(photos) - 1, min(args.count, len(photos))).astype(int)]
    net = create_backbone(args.backbone).eval()
    pre = net.preprocess
    print(f"{machine()}, torch {torch.__version__}, onnxruntime {ort.__version__}; {args.backbone} "
          f"({pre.resize_size}->{pre.input_size}, {pre.interpolation}); {len(photos)} photos from {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        large = []
        for i, p in enumerate(photos):
            img = Image.open(p).convert("RGB")
            img.resize((img.width * args.upscale, img.height * args.upscale), Image.Resampling.BICUBIC).save(
                Path(tmp) / f"{i}.jpg", quality=90)
            large.append(Path(tmp) / f"{i}.jpg")
        for interpolation in (pre.interpolation, "bicubic"):
            p = type(pre)(pre.input_size, pre.resize_size, interpolation, pre.mean, pre.std)
            session = ort.InferenceSession(resize_graph(p).SerializeToString(), providers=["CPUExecutionProvider"])
            for label, files in (("as they are", photos), (f"upscaled x{args.upscale} (JPEG draft)", large)):
                started = time.perf_counter()
                sets = pixel_sets(files, p, session)
                seconds = time.perf_counter() - started
                line = f"{interpolation:8s} {label:28s}"
                for a, b in (("onnx", "pillow"), ("onnx", "featx"), ("pillow", "featx")):
                    d = np.abs(sets[a].astype(int) - sets[b].astype(int))
                    line += f" | {a} vs {b}: pixels max {d.max():3d} mean {d.mean():.3f}"
                if interpolation == pre.interpolation:
                    with torch.inference_mode():
                        feats = {k: net(torch.from_numpy(v)).float().numpy() for k, v in sets.items()}
                    for a, b in (("onnx", "pillow"), ("onnx", "featx"), ("pillow", "featx")):
                        c = cosine(feats[a], feats[b])
                        line += f" | {a} vs {b}: cosine min {c.min():.6f} mean {c.mean():.6f}"
                print(line + f" | decode+resize {seconds / len(files) * 1000:.1f} ms/img")


if __name__ == "__main__":
    main()
