"""Whole-process wall time of featx commands a user types often: how long until the shell prompt returns.

Each command runs --runs times in a fresh process (imports included); the median and the range are printed.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine


def timed(argv: list, runs: int, cwd: Path) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", default=None, help="A dataset folder for the no-op extract and predict rows.")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve()) if args.data else None
    featx = [str(Path(sys.executable).with_name("featx"))]
    work = Path(tempfile.mkdtemp(prefix="featx-startup-"))
    commands = {"featx --help": featx + ["--help"], "featx datasets": featx + ["datasets"],
                "featx extract (error: no such data)": featx + ["extract", "--data", str(work / "absent")],
                "featx fit-head (error: no such data)": featx + ["fit-head", "--data", str(work / "absent")],
                "featx finetune (error: no such data)": featx + ["finetune", "--data", str(work / "absent"),
                                                                 "--unfreeze", "none"],
                "featx compare (error: no such data)": featx + ["compare", "--data", str(work / "absent"),
                                                                "--backbones", "efficientnet_lite0"],
                "featx predict (error: no such model)": featx + ["predict", "--model", str(work / "absent.featx"),
                                                                 str(work)],
                "featx predict (error: not a model file)": featx + ["predict", "--model", str(work / "junk.featx"),
                                                                    str(work / "junk.featx")],
                "featx predict (error: no such image)": featx + ["predict", "--model", str(work / "junk.featx"),
                                                                 str(work / "absent.jpg")],
                "featx evaluate (error: not a model file)": featx + ["evaluate", "--model", str(work / "junk.featx"),
                                                                     "--data", str(work)],
                "featx fit-head (error: not a feature cache)": featx + ["fit-head", "--features",
                                                                        str(work / "junk.featx")]}
    (work / "junk.featx").write_text("not a model file")
    if args.data:
        extract = featx + ["extract", "--data", args.data, "--quiet"]
        subprocess.run(extract + ["--cache-dir", "cache"], cwd=work, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(featx + ["fit-head", "--data", args.data, "--out", "run", "--quiet"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
        image = next(p for p in sorted(Path(args.data).rglob("*")) if p.is_file())
        commands["featx extract (no-op re-run)"] = extract
        commands["featx predict (one image)"] = featx + ["predict", "--model", "run/model.featx", str(image)]
    print(f"machine: {machine()}; {args.runs} runs each\n")
    print("| command | median s | min s | max s |\n|---|---|---|---|")
    for name, argv in commands.items():
        median, low, high = timed(argv, args.runs, work)
        print(f"| `{name}` | {median:.2f} | {low:.2f} | {high:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
