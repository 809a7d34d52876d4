"""Fine-tuning with and without the boundary cache, side by side in one run: wall time (boundary pass
included), train img/s per epoch, test accuracy, peak memory (each run is its own process) and peak disk of
``cache/boundary`` (polled). Every cached run starts from an empty cache.

    python benchmarks/boundary_cache.py --data ../shared/data/cats_dogs --unfreeze top:2 --epochs 5 --views 2,4,8
    python benchmarks/boundary_cache.py --backbone vgg16 --weights random --input-size 150 --per-class 40 \\
        --data ../shared/data/cats_dogs --unfreeze block4,block5 --epochs 5 --views 2

``--holdout-val`` treats a train/val dataset's val/ as its test split (val is then carved from train), so the
accuracy compared is one no run chose its epoch on. ``--per-class N`` keeps N images per class and split.
``--weights random`` saves a randomly initialised state dict (timing only).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, parser


def folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # a part file merged away meanwhile
            pass
    return total


def measured(options: dict, cache: Path) -> dict:
    """One fine-tuning run in its own process: its result, wall time, peak RSS, peak size of cache/boundary."""
    start, peak_disk, result = time.perf_counter(), 0, cache.with_suffix(".json")
    child = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(options), str(result)])
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        peak_disk = max(peak_disk, folder_bytes(cache / "boundary"))
        if pid:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"run failed: {options}")
    m = json.loads(result.read_text())
    rates = [h["train_img_per_s"] for h in m["history"]]
    bc = m["boundary_cache"]
    return {"views": bc.get("views") if bc["used"] else None, "seed": options["seed"], "wall_s": round(wall, 1),
            "boundary_pass_s": bc.get("seconds"), "train_img_per_s": [round(r, 1) for r in rates],
            "after_first_img_per_s": round(sum(rates[1:]) / max(len(rates) - 1, 1), 1),
            "test_accuracy": m.get("test", {}).get("accuracy"), "val_accuracy": m["val"]["accuracy"],
            "best_epoch": m["best_epoch"], "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_boundary_disk_mb": round(peak_disk / 1e6, 1), "boundary_cache_mb": round(bc.get("bytes", 0) / 1e6, 1),
            "note": bc["note"]}


def subset(src: Path, dst: Path, per_class: int | None, holdout_val: bool) -> Path:
    """Symbolic links to ``src``'s images: val/ renamed test/ with ``holdout_val``, N per class and split."""
    for split in [d for d in src.iterdir() if d.is_dir()]:
        name = "test" if holdout_val and split.name == "val" else split.name
        for cls in [d for d in split.iterdir() if d.is_dir()]:
            (dst / name / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                os.symlink(f.resolve(), dst / name / cls.name / f.name)
    return dst


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        from featx.finetuning.training import finetune

        Path(sys.argv[3]).write_text(json.dumps(finetune(**json.loads(sys.argv[2])), default=str))
        return
    ap = parser()
    ap.add_argument("--unfreeze", default="top:2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--augment", default="light")
    ap.add_argument("--views", default="2", help="comma-separated view counts, each run cached")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--holdout-val", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data).resolve()
        if args.per_class or args.holdout_val:
            data = subset(data, tmp / data.name, args.per_class, args.holdout_val)
        weights = args.weights
        if weights == "random":
            import torch

            import featx

            weights = str(tmp / f"{args.backbone}_random.pth")
            torch.save(featx.create_backbone(args.backbone, pretrained=False).model.state_dict(), weights)
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for views in [None] + [int(v) for v in args.views.split(",")]:
                name = f"s{seed}_{'uncached' if views is None else f'v{views}'}"
                cache = tmp / f"cache_{name}"
                options = {"backbone": args.backbone, "data": str(data), "unfreeze": args.unfreeze,
                           "epochs": args.epochs, "augment": args.augment, "seed": seed, "head": "none",
                           "weights": weights, "input_size": args.input_size, "device": args.device,
                           "out": str(tmp / name), "cache_dir": str(cache), "progress": False,
                           "boundary_cache": views is not None, "views": views}
                runs.append(measured(options, cache))
                print(json.dumps(runs[-1]), file=sys.stderr)
    for run in runs:
        plain = next(r for r in runs if r["seed"] == run["seed"] and r["views"] is None)
        run["whole_run_speedup"] = round(plain["wall_s"] / run["wall_s"], 2)
        run["epoch_speedup"] = round(run["after_first_img_per_s"] / plain["after_first_img_per_s"], 2)
    result = {"backbone": args.backbone, "data": args.data, "unfreeze": args.unfreeze, "epochs": args.epochs,
              "augment": args.augment, "input_size": args.input_size, "per_class": args.per_class,
              "holdout_val": args.holdout_val, "weights": args.weights, "machine": machine(), "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
