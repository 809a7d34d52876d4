"""The Ray engine: stage 1 on a Ray Data cluster (``featx extract --engine ray``).

The driver keeps what the local engine does (the cache lock, the index, the to-do list, the writing);
Ray Data only computes. CPU tasks read the files (decoded to uint8, or only their bytes with
``--decode device``) with Pillow alone, and a pool of actors runs what the driver built and shipped
(``ray.put``): its checked ONNX export, or the torch network. Workers need neither the registry nor the
weight files, only the images at the same paths, and import torch only for the torch runtime or device
decoding. The
driver is the one writer and drops any image it has already received: Ray re-runs the blocks of a lost
actor or node, and the cache must hold each image once (Ray's own writers lose or duplicate rows,
ray#55043, #52967).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featx.devices import default_batch_size
from featx.errors import FeatxError, first_line
from .images import EncodedFiles, ImageFiles, collate_encoded, decode_on_device
from .runtimes import OnnxForward, embedding

INSTALL = "pip install -e '.[ray]' (or pip install 'ray[data]')"
ACTOR_EXIT_ONCE = "FEATX_TEST_ACTOR_EXIT_ONCE"  # tests: a marker path; the first actor to find it absent dies
DECODED = -1  # ``pixels`` of a file the read stage decoded itself (not a plain JPEG): ``raw`` holds CHW uint8


def require(address: str | None):
    """Ray, imported, with ``address`` (if any) accepting connections: said in one line before any work,
    and before importing Ray or torch (this module imports torch only where it runs or feeds a network)."""
    check_reachable(address)
    try:
        import ray
    except ImportError:
        raise FeatxError(f"--engine ray needs Ray: {INSTALL}") from None
    return ray


def connect(address: str | None):
    """Ray, connected: to ``address`` (auto, HOST:PORT, ray://HOST:PORT), or to a local cluster started
    here when None. One line, no traceback, when Ray is missing or the cluster cannot be reached."""
    ray = require(address)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core worker's notes, not errors: Ray raises those
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True)
        except Exception as exc:  # ConnectionError, or whatever the client raises for a bad address
            where = f"--address {address}" if address else "a local Ray cluster"
            raise FeatxError(f"cannot reach {where} ({type(exc).__name__}: {first_line(exc)}): start one with "
                             "'ray start --head' and pass its address, or leave --address out") from None
        if address is None:
            reap_with_driver()
    return ray


# Ray ties the processes of a local cluster to its driver with PR_SET_PDEATHSIG, but the two agents the raylet
# starts (DashboardAgent, RuntimeEnvAgent) ignore the SIGTERM they get and outlive a killed driver. This reaper,
# like Ray's own ray_process_reaper, learns of the driver's death from the end of its stdin; it then kills what
# is left of the processes the driver had started, each checked by its start time so no reused pid is hit.
REAPER = """
import os, signal, sys, time
started = [tuple(map(int, p.split(":"))) for p in sys.argv[1].split(",") if p]
sys.stdin.read()
time.sleep(1)
for pid, start in started:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[19]) == start:
                os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
"""


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every Ray process below ``root``, from /proc (Linux)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(entry), int(fields[19])))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return [(pid, start) for pid, start in found if b"ray" in command_line(pid)]


def command_line(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def reap_with_driver() -> None:
    """Start the reaper of the local cluster just started (Linux only: elsewhere Ray's fate sharing alone)."""
    import subprocess

    if not os.path.isdir("/proc/self"):
        return
    started = ",".join(f"{pid}:{start}" for pid, start in descendants(os.getpid()))
    REAPERS.append(subprocess.Popen([sys.executable, "-c", REAPER, started], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))


REAPERS: list = []  # held, so that their stdin closes only when this process ends


def check_reachable(address: str | None) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that accepts no connection: one line within seconds, where Ray itself
    would retry for minutes."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FeatxError(f"--address {address}: use auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise FeatxError(f"cannot reach the Ray cluster at --address {address} ({exc.strerror or exc}): start one "
                         "with 'ray start --head' there, or check the address") from None


def read_files(batch: dict, preprocess, on_device: bool) -> dict:
    """The CPU stage: each file decoded to uint8 (or, on the device path, its JPEG bytes), with the
    reason when it failed, exactly as the local engine's loader workers do it, but by Pillow alone
    (``Preprocess.pil_array``, the same pixels), so read tasks never import torch."""
    dataset = (EncodedFiles if on_device else ImageFiles)(list(batch["path"]), preprocess.pil_array,
                                                          preprocess.resize_size)
    size, count = preprocess.input_size, len(batch["path"])
    out = {"index": batch["index"], "path": batch["path"], "reason": np.empty(count, dtype=object)}
    if on_device:
        out["raw"], out["pixels"] = np.empty(count, dtype=object), np.zeros(count, dtype=np.int64)
    else:
        out["image"] = np.zeros((count, 3, size, size), dtype=np.uint8)
    for j in range(count):
        _, item, out["reason"][j] = dataset[j]
        if on_device:
            raw, pixels = item if isinstance(item, tuple) else (b"" if item is None else item.tobytes(), DECODED)
            out["raw"][j], out["pixels"][j] = raw, pixels
        elif item is not None:
            out["image"][j] = item
    return out


class Embed:
    """The actor stage: features for a batch of read files, with the forward pass the local engine uses.
    On ONNX Runtime (the driver's verified export) the actor needs neither torch nor the network, unless
    it decodes on the device. Failed files come back with their reason."""

    def __init__(self, preprocess, net_ref: list, onnx_ref: list, device: str, threads: int,
                 exit_once: str | None):
        import ray

        self.preprocess, self.device, self.exit_once, self.dim = preprocess, device, exit_once, None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        if onnx_ref:
            self.onnx = OnnxForward(ray.get(onnx_ref[0]), threads)
        else:
            import torch

            torch.set_num_threads(threads)
            self.onnx, self.embed = None, embedding(ray.get(net_ref[0]), torch.device(device), None, threads)

    def __call__(self, batch: dict) -> dict:
        if self.exit_once and not os.path.exists(self.exit_once):
            Path(self.exit_once).touch()
            os._exit(1)  # a test's stand-in for a lost actor or node
        count = len(batch["index"])
        failures = [(j, str(batch["reason"][j])) for j in range(count) if batch["reason"][j]]
        kept = [j for j in range(count) if not batch["reason"][j]]
        if "raw" in batch:  # --decode device
            import torch

            _, encoded, _ = collate_encoded([(j, self.encoded(batch, j), "") for j in kept])
            files = EncodedFiles(list(batch["path"]), self.preprocess.transform(), self.preprocess.resize_size)
            kept, images, refused = decode_on_device(kept, encoded, files, torch.device(self.device))
            failures += refused
        else:
            images = batch["image"][kept] if kept else None
        feats = self.features(images) if images is not None else None
        self.dim = feats.shape[1] if feats is not None else self.dim or self.probe_dim()
        features = np.zeros((count, self.dim), dtype=np.float32)
        if feats is not None:
            features[kept] = feats
        reasons = np.array([""] * count, dtype=object)
        for j, reason in failures:
            reasons[j] = reason
        return {"index": batch["index"], "feature": features, "reason": reasons,
                "worker": np.array([self.worker] * count, dtype=object)}

    def features(self, images) -> np.ndarray:
        """Features of a uint8 NCHW batch: a numpy array from the read stage, or a tensor decoded here."""
        if self.onnx:
            return self.onnx.run(np.asarray(images))
        import torch

        with torch.inference_mode():
            return self.embed(torch.as_tensor(images).to(self.device)).cpu().numpy()

    def probe_dim(self) -> int:
        """The feature size, for a batch in which no file could be read."""
        size = self.preprocess.input_size
        return self.features(np.zeros((1, 3, size, size), dtype=np.uint8)).shape[1]

    def encoded(self, batch: dict, j: int):
        """A file as ``EncodedFiles`` gives it: JPEG bytes and pixel count, or the image already decoded."""
        import torch

        raw, pixels = batch["raw"][j], int(batch["pixels"][j])
        if pixels == DECODED:
            size = self.preprocess.input_size
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(3, size, size)
        return raw, pixels


def cluster_actors(ray, gpus_per_actor: float) -> int:
    """One actor per ``gpus_per_actor`` GPUs in the cluster; on CPUs, one per two CPUs, leaving the other
    to read files."""
    resources = ray.cluster_resources()
    if gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1)) // 2)


def ray_features(net, files: list, device: str, batch_size: int | None = None, decode: str = "pil",
                 onnx: bytes | None = None, address: str | None = None, actors: int | None = None,
                 gpus_per_actor: float = 0, threads_per_actor: int = 2, progress: bool = True, desc: str = "extract",
                 run=None, checkpoint_rows: int | None = None):
    """``extraction.iter_features`` on Ray Data: yields (indices, features, failures) per block, each file
    once, however often Ray re-ran its block. ``run`` receives where the actors ran. Each actor reserves one
    CPU and runs ``threads_per_actor`` threads: on two cores, lite0 in ONNX Runtime with reads beside it ran
    at 47 img/s on two threads against 28 on one. Batches hold at most ``checkpoint_rows`` images, so the
    driver can persist rows as often as ``--checkpoint-rows`` asks."""
    import torch

    ray = connect(address)
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()  # featx prints its own progress and summary
    context.enable_progress_bars, context.issue_detectors_config.detectors = False, []
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    actors = actors or cluster_actors(ray, gpus_per_actor)
    # per-task overhead: lite0 on 2 cores, 87 img/s at 64 against 71 at 32 (BENCHMARKS.md)
    batch_size = min(batch_size or max(64, default_batch_size(torch.device(device))), checkpoint_rows or math.inf)
    items = [{"index": i, "path": str(f)} for i, f in enumerate(files)]
    blocks = max(1, min(len(items), max(4 * actors, math.ceil(len(items) / batch_size))))
    size = net.preprocess.input_size
    # Reads declare the memory of a decoded batch; besides being true, it keeps Ray from fusing them into
    # the actors, where they would run one at a time instead of beside the network.
    dataset = (ray.data.from_items(items, override_num_blocks=blocks)
               .map_batches(read_files, fn_kwargs={"preprocess": net.preprocess, "on_device": decode == "device"},
                            batch_size=batch_size, batch_format="numpy", num_cpus=1, memory=2 * batch_size * 3 * size * size)
               .map_batches(Embed, fn_constructor_kwargs={
                   "preprocess": net.preprocess, "net_ref": [] if onnx else [ray.put(net.cpu())],
                   "onnx_ref": [ray.put(onnx)] if onnx else [],
                   "device": "cuda" if gpus_per_actor else "cpu", "threads": threads_per_actor,
                   "exit_once": os.environ.get(ACTOR_EXIT_ONCE)},
                   batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                   num_gpus=gpus_per_actor or None, num_cpus=1))
    seen, workers = set(), set()
    with tqdm(total=len(files), unit="img", desc=desc, file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            fresh = [j for j, i in enumerate(batch["index"].tolist()) if i not in seen]
            seen.update(int(batch["index"][j]) for j in fresh)
            workers.update(batch["worker"][fresh].tolist())
            ok = [j for j in fresh if not batch["reason"][j]]
            bar.update(len(fresh))
            yield ([int(batch["index"][j]) for j in ok], batch["feature"][ok],
                   [(int(batch["index"][j]), str(batch["reason"][j])) for j in fresh if batch["reason"][j]])
    if run is not None:
        hosts = sorted({w.rsplit(":", 1)[0] for w in workers})
        run.notes.append(f"Ray Data: {len(workers)} embedding actor process(es) on {len(hosts)} node(s) "
                         f"({', '.join(hosts)}), {actors} at a time")
