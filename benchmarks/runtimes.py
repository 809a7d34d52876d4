"""The frozen backbone alone, on a CPU: torch eager, ONNX Runtime and (when installed) OpenVINO on featx's own
checked ONNX export, one process, the same random uint8 batch, interleaved rounds so drift hits every runtime.

Why featx ships ONNX Runtime: this compares it with the alternatives on the network featx actually runs
(normalisation inside, uint8 in). OpenVINO is not a featx dependency; ``pip install openvino`` to include it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import featx
from common import machine
from featx.extraction.runtimes import OnnxForward, onnx_model


def rate(run, images: np.ndarray, rounds: int) -> list[float]:
    run(images)  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(images)
        times.append(len(images) / (time.perf_counter() - start))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="A local state dict, for backbones whose weights are not here.")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    net = featx.create_backbone(args.backbone, weights=args.weights).eval().to(memory_format=torch.channels_last)
    export = onnx_model(net, tempfile.mkdtemp(prefix="featx-runtimes-"))
    size = net.preprocess.input_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, 3, size, size), dtype=np.uint8)

    def eager(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    runtimes = {"torch eager": eager, "ONNX Runtime": OnnxForward(export).run}
    try:
        import openvino as ov

        core, threads = ov.Core(), len(os.sched_getaffinity(0))
        for hint in ("f32", None):  # None: OpenVINO's own default, bf16 where the CPU has it
            config = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": hint} if hint else {})}
            compiled = core.compile_model(core.read_model(str(export)), "CPU", config)
            name = f"OpenVINO {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}"
            runtimes[name + ("" if hint else " (its default)")] = lambda x, c=compiled: c(x)[0]
    except ImportError:
        print("OpenVINO is not installed: pip install openvino to include it")
    reference = eager(images)
    for name, run in runtimes.items():
        out = run(images)
        cosine = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"{name}: max |diff| vs torch {np.abs(out - reference).max():.2e}, min cosine {cosine.min():.7f}")
    speeds = {name: [] for name in runtimes}
    for _ in range(args.rounds):  # interleaved: each round times every runtime once
        for name, run in runtimes.items():
            speeds[name] += rate(run, images, 1)
    print(f"\nmachine: {machine()}; {args.backbone}, batch {args.batch_size}, {args.rounds} interleaved rounds\n")
    print("| runtime | median img/s | min–max | vs torch |\n|---|---|---|---|")
    base = statistics.median(speeds["torch eager"])
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f}–{max(values):.1f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
