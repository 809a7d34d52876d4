"""What HDF5's Fletcher-32 checksum costs the feature cache: write and read time of one features array,
chunked as featx chunks it (256 rows), with and without the filter, side by side in one run."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from common import machine


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    X = np.random.default_rng(0).normal(size=(args.rows, args.dim)).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="featx-checksum-"))
    print(f"machine: {machine()}; {args.rows} x {args.dim} float32 ({X.nbytes / 2**20:.0f} MiB), median of {args.repeat}")
    results = {}
    for fletcher in (False, True):
        path = folder / f"f{int(fletcher)}.h5"

        def write():
            with h5py.File(path, "w") as f:
                f.create_dataset("features", data=X, chunks=(256, args.dim), fletcher32=fletcher)

        def read():
            with h5py.File(path, "r") as f:
                f["features"][:]

        results[fletcher] = (timed(write, args.repeat), timed(read, args.repeat), path.stat().st_size)
    for fletcher, (w, r, size) in results.items():
        print(f"fletcher32={fletcher!s:<5}  write {w:.3f} s  read {r:.3f} s  file {size / 2**20:.1f} MiB")
    (w0, r0, _), (w1, r1, _) = results[False], results[True]
    print(f"cost: write x{w1 / w0:.2f}, read x{r1 / r0:.2f}")


if __name__ == "__main__":
    main()
