"""featx extract against a seed-style loop (torchvision ImageFolder, fp32, batch 32), side by side.

    python benchmarks/extract_speed.py --backbone efficientnet_lite0 --data ../shared/data/hymenoptera
    python benchmarks/extract_speed.py --backbone resnet50 --weights r50.pt --data ../shared/data/hymenoptera \
        --repeat 10 --decode pil device

--repeat N links every file N times into a scratch copy, for volume on fast machines. --decode and --runtime
name one or more of featx's JPEG decoders and runtimes; each pair is timed on a fresh cache. Prints one table
and one JSON line: the img/s of each, their ratios to the seed loop, and the wall time of the last run against
a second run over the unchanged dataset (both calls in this process, network building included).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import datasets, transforms

import featx
from common import machine, parser, replicate
from featx.devices import resolve_device


def seed_loop(backbone: str, weights: str | None, root: Path, device: torch.device, workers: int) -> tuple[int, float]:
    """What the tutorials do: ImageFolder + ToTensor + Normalize, fp32, batch 32, full-size decode."""
    net = featx.create_backbone(backbone, weights=weights).to(device).eval()
    pre = net.preprocess
    tf = transforms.Compose([
        transforms.Resize(pre.resize_size, interpolation=transforms.InterpolationMode(pre.interpolation)),
        transforms.CenterCrop(pre.input_size), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    splits = [d for d in sorted(root.iterdir()) if d.is_dir()]
    ds = ConcatDataset([datasets.ImageFolder(str(s), tf) for s in splits])
    loader = DataLoader(ds, batch_size=32, num_workers=workers, shuffle=False)
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            net(x.to(device))
            n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - start


def main() -> None:
    ap = parser()
    ap.add_argument("--decode", nargs="+", choices=["pil", "device"], default=["pil"])
    ap.add_argument("--runtime", nargs="+", choices=["auto", "torch", "onnxruntime"], default=["auto"])
    args = ap.parse_args()
    device = resolve_device(args.device)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data)
        if args.repeat > 1:
            root = replicate(root, Path(tmp) / "data", args.repeat)
        n_seed, t_seed = seed_loop(args.backbone, args.weights, root, device, args.seed_workers)
        for decode in args.decode:
            for runtime in args.runtime:
                cache = Path(tmp) / f"cache_{decode}_{runtime}"
                start = time.perf_counter()
                key = f"decode={decode} runtime={runtime}"
                runs[key] = featx.extract(args.backbone, str(root), cache_dir=cache, device=args.device,
                                          weights=args.weights, decode=decode, runtime=runtime, progress=False)
                t_first = time.perf_counter() - start
        start = time.perf_counter()
        second = featx.extract(args.backbone, str(root), cache_dir=cache, device=args.device, weights=args.weights,
                               decode=decode, runtime=runtime, progress=False)
        t_second = time.perf_counter() - start
    seed_rate = n_seed / t_seed
    first = runs[key]
    result = {
        "backbone": args.backbone, "images": first.images, "device": str(device),
        "machine": machine(device),
        "seed_img_per_s": round(seed_rate, 1),
        "featx_img_per_s": {d: r.img_per_s for d, r in runs.items()},
        "ratio": {d: round(r.img_per_s / seed_rate, 2) for d, r in runs.items()},
        "first_run_s": round(t_first, 3), "second_run_s": round(t_second, 3), "second_run_new": second.new,
        "rerun_speedup": round(t_first / t_second, 1),
    }
    print(f"{'':<48}{'img/s':>10}")
    print(f"{'seed loop (ImageFolder fp32)':<48}{seed_rate:>10.1f}")
    for d, r in runs.items():
        print(f"{f'featx extract, {d} ({r.runtime})':<48}{r.img_per_s:>10.1f}   ratio {result['ratio'][d]}x")
    print(f"second run over unchanged data: {t_second:.2f} s ({result['rerun_speedup']}x faster than the first)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
