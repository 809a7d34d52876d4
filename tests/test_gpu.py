"""CUDA-only paths (``gpu`` marker: they run where torch sees a GPU and skip cleanly elsewhere)."""
import numpy as np
import pytest

import featx
from featx.extraction import store
from featx.heads.advice import advise
from helpers import make_dataset

pytestmark = pytest.mark.gpu


def with_bad_files(root):
    photo = next((root / "train" / "a").glob("*.jpg")).read_bytes()
    (root / "train" / "a" / "truncated.jpg").write_bytes(photo[:len(photo) // 3])
    (root / "train" / "b" / "notes.jpg").write_text("not an image")
    return root


def test_device_decode_on_cuda_gives_pillows_features_and_skips(tiny, tmp_path):
    data = with_bad_files(make_dataset(tmp_path / "d", {"train": 8, "val": 2}))
    on_cpu = featx.extract(tiny, str(data), cache_dir=tmp_path / "cpu", device="cpu", workers=0, progress=False)
    on_gpu = featx.extract(tiny, str(data), cache_dir=tmp_path / "gpu", device="cuda", decode="device",
                           precision="fp32", progress=False)
    assert sorted(s["path"] for s in on_gpu.skipped_files) == sorted(s["path"] for s in on_cpu.skipped_files)
    a, b = store.load(on_cpu.path), store.load(on_gpu.path)
    assert list(a.paths) == list(b.paths)
    cosine = (a.X * b.X).sum(1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X, axis=1)
    assert cosine.min() >= 0.999, cosine.min()


def test_advise_on_cuda_measures_what_the_cpu_does(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 10})
    on_gpu, on_cpu = advise(str(data), tiny, device="cuda"), advise(str(data), tiny, device="cpu")
    assert on_gpu["layer"] == on_cpu["layer"] and on_gpu["probe"]["images"] == on_cpu["probe"]["images"]
