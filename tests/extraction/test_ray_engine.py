"""``featx extract --engine ray``: the same cache as the local engine, each image once whatever dies."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import featx
from featx.extraction import store
from featx.extraction.ray_engine import ACTOR_EXIT_ONCE
from helpers import REPO, make_dataset

ray = pytest.importorskip("ray", reason="the Ray engine is an extra: pip install -e '.[ray]' (.ci/run installs it)")


@pytest.fixture
def cluster(ray_cluster):
    """The test run's one local Ray cluster (``ray_cluster`` in conftest.py)."""
    return ray_cluster


@pytest.fixture
def real_set(shared_data, tmp_path):
    """Six real photos per class, a truncated JPEG and a text file named .jpg among them."""
    root = tmp_path / "real"
    for cls in ("ants", "bees"):
        (root / "train" / cls).mkdir(parents=True)
        for f in sorted((shared_data / "hymenoptera" / "train" / cls).glob("*.jpg"))[:6]:
            shutil.copy(f, root / "train" / cls / f.name)
    photo = next((root / "train" / "ants").glob("*.jpg")).read_bytes()
    (root / "train" / "ants" / "truncated.jpg").write_bytes(photo[:len(photo) // 3])
    (root / "train" / "bees" / "notes.jpg").write_text("not an image")
    return root


def extract(tiny, data, cache, **kw):
    return featx.extract(tiny, str(data), cache_dir=cache, progress=False, batch_size=4, **kw)


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_ray_gives_the_local_engines_cache(cluster, tiny, real_set, tmp_path, decode):
    local = extract(tiny, real_set, tmp_path / "local", decode=decode, workers=0)
    remote = extract(tiny, real_set, tmp_path / "ray", decode=decode, engine="ray", threads_per_actor=1)
    assert (remote.engine, remote.runtime) == ("ray", local.runtime)
    assert remote.images == local.images == 12 and remote.new == 12
    assert sorted(map(str, remote.skipped_files)) == sorted(map(str, local.skipped_files))
    assert {s["path"] for s in remote.skipped_files} == {"train/ants/truncated.jpg", "train/bees/notes.jpg"}
    ours, theirs = store.load(remote.path), store.load(local.path)
    assert list(ours.paths) == list(theirs.paths)
    np.testing.assert_allclose(ours.X, theirs.X, atol=1e-5)
    assert any("Ray Data: 1 embedding actor" in note for note in remote.notes)


def test_an_actor_that_dies_loses_and_repeats_nothing(cluster, tiny, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", {"train": 20})
    marker = tmp_path / "died"
    monkeypatch.setenv(ACTOR_EXIT_ONCE, str(marker))
    r = extract(tiny, data, tmp_path / "c", engine="ray", threads_per_actor=1)
    assert marker.exists(), "the actor should have died on its first batch"
    features = store.load(r.path)
    assert r.images == r.new == 40 and features.X.shape == (40, 32)
    assert len(set(features.paths)) == 40
    clean = extract(tiny, data, tmp_path / "clean", workers=0)
    np.testing.assert_allclose(features.X, store.load(clean.path).X, atol=1e-5)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import helpers
helpers.register_tiny(__import__("pathlib").Path({weights!r}), delay=0.2)
from featx.cli import main
main(sys.argv[1:])
"""


def test_read_tasks_decode_the_local_pixels_without_torch(real_set):
    """Ray's read tasks decode with Pillow alone: the pixels the local engine's loader gives, and no torch
    imported in the worker (a fresh interpreter here)."""
    from featx.extraction.backbones import get_spec
    from featx.extraction.images import ImageFiles

    files = sorted(map(str, real_set.rglob("*.jpg")))
    pre = get_spec("efficientnet_lite0").preprocess
    code = ("import pickle, sys; from featx.extraction.backbones import get_spec; from featx.extraction.ray_engine import read_files\n"
            f"out = read_files({{'index': list(range({len(files)})), 'path': {files!r}}}, "
            "get_spec('efficientnet_lite0').preprocess, False)\n"
            "sys.stdout.buffer.write(pickle.dumps((out['image'], list(out['reason']), 'torch' in sys.modules)))")
    images, reasons, torch_loaded = pickle.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                                check=True).stdout)
    assert not torch_loaded
    local = ImageFiles(files, pre.transform(), pre.resize_size)
    for j in range(len(files)):
        _, pixels, reason = local[j]
        assert reasons[j] == reason
        if pixels is not None:
            np.testing.assert_array_equal(images[j], pixels.numpy())
    assert sum(map(bool, reasons)) == 2


def test_ray_honours_checkpoint_rows(cluster, tiny, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", {"train": 20})
    parts = []
    real = store.FeatureStore.write_part
    monkeypatch.setattr(store.FeatureStore, "write_part", lambda self, rows: parts.append(len(rows)) or
                        real(self, rows))
    result = extract(tiny, data, tmp_path / "c", engine="ray", checkpoint_rows=8)
    assert result.new == 40 and sum(parts) == 40
    assert len(parts) >= 4 and max(parts) < 16, parts  # batches of at most 8: rows persisted every 8 to 15


def running(started: list) -> list:
    """Those of (pid, start time) still running as the same process (zombies count as gone)."""
    alive = []
    for pid, start in started:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[19]) == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def test_a_killed_driver_resumes_and_its_local_cluster_goes_with_it(cluster, tiny, tiny_weights, tmp_path):
    """A driver that started its own local cluster, killed mid-run: nothing of that cluster outlives it (its
    agents ignore SIGTERM; featx's reaper kills them), and the next run computes only what is missing."""
    from featx.extraction.ray_engine import descendants

    data = make_dataset(tmp_path / "d", {"train": 40})
    cache = tmp_path / "c"
    code = CHILD.format(tests=str(REPO / "tests"), weights=str(tiny_weights))
    # torch runtime: the delay standing in for a big network is a sleep, which ONNX export drops
    cmd = [sys.executable, "-c", code, "extract", "--backbone", "tiny", "--data", str(data), "--cache-dir", str(cache),
           "--engine", "ray", "--batch-size", "4", "--runtime", "torch", "--checkpoint-rows", "8", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO / "tests")})  # its cluster's workers import helpers
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("*.part*.h5")):
        time.sleep(0.05)
    linux = os.path.isdir("/proc/self")  # the reaper reads /proc
    started = descendants(proc.pid) if linux else []
    assert len(started) >= 4 or not linux, started  # gcs, raylet, the agents, workers...
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and running(started):
        time.sleep(0.2)
    assert running(started) == []
    done = sum(h5py.File(p, "r")["features"].shape[0] for p in cache.glob("*.part*.h5"))
    assert 0 < done < 80, "the kill should land mid-run"
    result = extract(tiny, data, cache, engine="ray", runtime="torch", checkpoint_rows=8)  # on the test's cluster
    assert result.images == 80 and result.new == 80 - done
    features = store.load(result.path)
    assert features.X.shape == (80, 32) and len(set(features.paths)) == 80
    assert not list(cache.glob("*.part*"))
