"""Extraction's fixed cost: ``featx extract --json`` in a fresh process against ``featx.extract`` called in a
process that has already imported torch and built the network (as ``extract_speed.py`` measures), on a fresh
feature cache each time, the ONNX export already made (as after any earlier extraction). With ``--before DIR``
(an older featx checkout) its CLI is timed in the same run, alternating.

    python benchmarks/extract_cli.py --data ../shared/data/hymenoptera --runs 3 [--before /tmp/old-featx]

Prints the img/s each reports (images over the time from the moment the network could take its first batch to the
last row written; before 2026-12-01 from before the imports and the network build), the setup seconds before
that moment, the wall time, and the medians.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, parser


def cli_run(cache: Path, args, pythonpath: str | None) -> dict:
    for h5 in cache.glob("*.h5"):
        h5.unlink()
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "featx", "extract", "--backbone", args.backbone, "--data", args.data,
                          "--cache-dir", str(cache), "--json", "--quiet"], env=env, capture_output=True, text=True,
                         check=True)
    reported = json.loads(out.stdout)
    return {"img_per_s": reported["img_per_s"], "setup_s": reported.get("setup_s"),
            "wall_s": round(time.perf_counter() - start, 2)}


def in_process(cache: Path, args) -> dict:
    import featx

    featx.create_backbone(args.backbone)  # imports and a first build, as extract_speed.py's seed loop does
    for h5 in cache.glob("*.h5"):
        h5.unlink()
    start = time.perf_counter()
    r = featx.extract(args.backbone, args.data, cache_dir=cache, progress=False)
    return {"img_per_s": r.img_per_s, "setup_s": r.setup_s, "wall_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    ap = parser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", default=None, help="an older featx checkout, timed alternately")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        subprocess.run([sys.executable, "-m", "featx", "extract", "--backbone", args.backbone, "--data", args.data,
                        "--cache-dir", str(cache), "--quiet"], check=True, capture_output=True)  # the ONNX export
        runs: dict = {"cli": [], **({"cli_before": []} if args.before else {})}
        for _ in range(args.runs):
            runs["cli"].append(cli_run(cache, args, None))
            if args.before:
                runs["cli_before"].append(cli_run(cache, args, args.before))
        runs["in_process"] = [in_process(cache, args) for _ in range(args.runs)]
        shutil.rmtree(cache)
    result = {"backbone": args.backbone, "data": args.data, "machine": machine(), "runs": runs,
              "median_img_per_s": {k: statistics.median(r["img_per_s"] for r in v) for k, v in runs.items()},
              "median_wall_s": {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
