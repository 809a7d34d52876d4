"""Several taps in one pass against one tap, and against one pass per tap, side by side.

    python benchmarks/taps_speed.py --data ../shared/data/cats_dogs --runtime onnxruntime torch

Each round extracts, on an empty cache (the ONNX exports made beforehand and kept), the default tap alone,
then ``--layers`` (default auto) in one pass, then each of those taps in a pass of its own; rounds repeat
``--rounds`` times, interleaved, and the median wall time of each is kept. Prints one table and one JSON line.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import featx
from common import machine, parser, replicate
from featx.extraction.backbones import resolve_backbone
from featx.devices import resolve_device
from featx.extraction.runner import extract_taps


def timed(backbone: str, data: str, layer, cache: Path, runtime: str, device: str) -> float:
    for h5 in cache.glob("*.h5"):
        h5.unlink()
    start = time.perf_counter()
    extract_taps(backbone, data, layer, cache_dir=cache, runtime=runtime, device=device, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = parser()
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--runtime", nargs="+", choices=["torch", "onnxruntime"], default=["onnxruntime"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    spec, layers, _ = resolve_backbone(args.backbone, args.layers)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data)
        if args.repeat > 1:
            root = replicate(root, Path(tmp) / "data", args.repeat)
        images = sum(1 for f in root.rglob("*") if f.is_file())
        for runtime in args.runtime:
            cache = Path(tmp) / f"cache_{runtime}"
            for layer in [spec.default_tap, ",".join(layers), *layers]:  # exports made once, outside the timings
                timed(args.backbone, str(root), layer, cache, runtime, args.device)
            times = {"one tap": [], "one pass": [], "a pass per tap": []}
            for _ in range(args.rounds):
                times["one tap"].append(timed(args.backbone, str(root), spec.default_tap, cache, runtime, args.device))
                times["one pass"].append(timed(args.backbone, str(root), ",".join(layers), cache, runtime,
                                               args.device))
                times["a pass per tap"].append(sum(timed(args.backbone, str(root), layer, cache, runtime, args.device)
                                                   for layer in layers))
            shutil.rmtree(cache)
            median = {k: statistics.median(v) for k, v in times.items()}
            results[runtime] = {"seconds": {k: round(v, 2) for k, v in median.items()},
                                "ratio_to_one_tap": {k: round(v / median["one tap"], 2) for k, v in median.items()},
                                "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}}
    print(f"{'runtime':<12} {'one tap (' + spec.default_tap + ')':>16} {'one pass':>10} {'a pass per tap':>15}"
          f"   taps: {','.join(layers)}, {images} images")
    for runtime, r in results.items():
        s, x = r["seconds"], r["ratio_to_one_tap"]
        print(f"{runtime:<12} {s['one tap']:>14.2f} s {s['one pass']:>8.2f} s ({x['one pass']:.2f}x) "
              f"{s['a pass per tap']:>8.2f} s ({x['a pass per tap']:.2f}x)")
    print(json.dumps({"backbone": args.backbone, "data": args.data, "images": images, "layers": layers,
                      "machine": machine(resolve_device(args.device)), "featx": featx.__version__,
                      "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
