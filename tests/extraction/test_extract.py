import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import featx
from featx.extraction import store
from featx.extraction.backbones import Preprocess
from featx.cli import cli
from featx.extraction import runner as extraction
from featx.extraction.images import (DECODE_PIXELS, EXIF_ORIENTATION, EncodedFiles, ImageFiles, collate_encoded, decode_jpegs,
                          decode_on_device, pixel_groups)
from helpers import colour_image, forked_cli, make_dataset


def run(tiny, data, cache, **kw):
    return featx.extract(tiny, str(data), cache_dir=cache, progress=False, workers=0, batch_size=4, **kw)


def test_extract_writes_cache_with_identity(tiny, dataset, tmp_path):
    r = run(tiny, dataset, tmp_path / "c")
    assert (r.images, r.new, r.skipped, r.feature_dim) == (24, 24, 0, 32)
    f = store.load(r.path)
    assert f.X.shape == (24, 32) and f.X.dtype == np.float32
    assert f.classes == ["a", "b"] and sorted(set(f.splits)) == ["test", "train", "val"]
    assert {"backbone", "weights", "weights_sha256", "layer", "transform", "torch_version", "featx_version",
            "split_source"} <= set(f.attrs)
    assert f.attrs["backbone"] == tiny and f.attrs["layer"] == "pool"
    # rows match what the backbone computes for the same file
    net = featx.create_backbone(tiny)
    direct = featx.FeatureExtractor(tiny, workers=0).fit().transform([dataset / p for p in f.paths[:3]])
    np.testing.assert_allclose(f.X[:3], direct, rtol=1e-4, atol=1e-5)
    assert net.identity() == f.identity()


def test_rerun_is_incremental(tiny, dataset, tmp_path):
    cache = tmp_path / "c"
    first = run(tiny, dataset, cache)
    mtime = os.stat(first.path).st_mtime_ns
    again = run(tiny, dataset, cache)
    assert again.new == 0 and again.images == 24 and os.stat(first.path).st_mtime_ns == mtime

    colour_image(1, np.random.default_rng(5)).save(dataset / "train" / "b" / "new.jpg")
    (dataset / "val" / "a" / "000.jpg").unlink()
    changed = dataset / "test" / "a" / "001.jpg"
    colour_image(1, np.random.default_rng(6)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = run(tiny, dataset, cache)
    assert (r.new, r.dropped, r.images) == (2, 1, 24)
    f = store.load(r.path)
    assert "train/b/new.jpg" in f.paths and "val/a/000.jpg" not in f.paths
    assert not store.part_files(Path(r.path))


def test_up_to_date_cache_builds_no_network(tiny, dataset, tmp_path, monkeypatch):
    first = run(tiny, dataset, tmp_path / "c")
    (dataset / "val" / "a" / "000.jpg").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the network was built although no image needed it")

    monkeypatch.setattr(extraction, "create_backbone", refuse)
    again = run(tiny, dataset, tmp_path / "c")
    assert (again.path, again.new, again.dropped, again.images) == (first.path, 0, 1, 23)
    assert store.load(again.path).identity() == featx.create_backbone(tiny).identity()


def test_layers_and_float16_get_their_own_files(tiny, dataset, tmp_path):
    a = run(tiny, dataset, tmp_path / "c")
    b = run(tiny, dataset, tmp_path / "c", layer="block1")
    c = run(tiny, dataset, tmp_path / "c", dtype="float16")
    assert len({a.path, b.path, c.path}) == 3
    assert b.feature_dim == 16
    with h5py.File(c.path) as f:
        assert f["features"].dtype == np.float16


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_corrupt_files_are_skipped_and_listed(tiny, dataset, tmp_path, decode):
    bad = dataset / "train" / "a"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    whole = (dataset / "train" / "a" / "000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    colour_image(0, np.random.default_rng(1)).convert("P").save(bad / "gif_named.jpg", "GIF")
    r = run(tiny, dataset, tmp_path / "c", decode=decode)
    assert r.skipped == 3 and r.images == 25
    assert sorted(s["path"] for s in r.skipped_files) == ["train/a/empty.jpg", "train/a/notes.jpg",
                                                          "train/a/truncated.jpg"]
    with h5py.File(r.path) as f:
        assert sorted(f["skipped/paths"].asstr()[:]) == sorted(s["path"] for s in r.skipped_files)
    again = run(tiny, dataset, tmp_path / "c")
    assert again.new == 0 and again.skipped == 3


def varied_images(folder: Path) -> list[Path]:
    """What nvjpeg gets (plain RGB and grey JPEGs) and what Pillow keeps (CMYK, progressive,
    EXIF-rotated, PNG), each non-square so a missed rotation or crop shows."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    variants = [("rgb.jpg", img, {}), ("grey.jpg", img.convert("L"), {}), ("cmyk.jpg", img.convert("CMYK"), {}),
                ("progressive.jpg", img, {"progressive": True}), ("rotated.jpg", img, {"exif": exif}),
                ("png.jpg", img, {"format": "PNG"})]
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, kw in variants:
        image.save(folder / name, **{"format": "JPEG", "quality": 95, **kw})
    return [folder / name for name, _, _ in variants]


def test_device_decode_gives_the_pil_images(tmp_path):
    files = varied_images(tmp_path)
    pre = Preprocess(input_size=32, resize_size=40)
    on_cpu = ImageFiles(files, pre.transform(), pre.resize_size)
    encoded = EncodedFiles(files, pre.transform(), pre.resize_size)
    indices, batch, failures = collate_encoded([encoded[i] for i in range(len(files))])
    assert sorted(batch.spans) == [0, 1] and sorted(batch.decoded) == [2, 3, 4, 5] and not failures
    assert batch.buffer.dim() == 1 and len(batch.buffer) == sum(f.stat().st_size for f in files[:2])  # one buffer
    for max_pixels in (DECODE_PIXELS, 1):  # 1: every JPEG decoded (and resized) in a group of its own
        kept, images, refused = decode_on_device(indices, batch, encoded, torch.device("cpu"), max_pixels)
        assert kept == list(range(len(files))) and not refused
        expected = torch.stack([on_cpu[i][1] for i in kept])
        assert images.shape == expected.shape == (6, 3, 32, 32)
        assert (images.float() - expected.float()).abs().mean() < 1.0


def test_pixel_groups_cap_what_is_decoded_at_once():
    spans = {0: (0, 10, 12_000_000), 1: (10, 10, 12_000_000), 2: (20, 10, 100), 3: (30, 10, 30_000_000)}
    groups = pixel_groups(spans, 25_000_000)
    assert groups == [[0, 1, 2], [3]] and all(sum(spans[p][2] for p in g) <= 25_000_000 or len(g) == 1
                                                for g in groups)


def test_running_out_of_device_memory_halves_the_batch(tiny, dataset, tmp_path, monkeypatch):
    from featx import devices

    real = devices.forward

    def small_device(net, images, device):
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, images, device)

    reference = run(tiny, dataset, tmp_path / "ref", runtime="torch")
    monkeypatch.setattr(devices, "forward", small_device)
    r = run(tiny, dataset, tmp_path / "c", runtime="torch")
    assert r.new == 24 and r.notes == ["out of device memory at batch 4: continued with batches of 2"]  # said once
    np.testing.assert_allclose(store.load(r.path).X, store.load(reference.path).X, atol=1e-5)


def test_a_passing_shortage_of_device_memory_grows_the_batch_back(tiny):
    from featx import devices

    calls, real = [], devices.forward

    def tight_once(net, images, device):
        calls.append(len(images))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, images, device)

    embed = devices.HalvingForward(featx.create_backbone(tiny, pretrained=False), torch.device("cpu"))
    devices_forward, devices.forward = devices.forward, tight_once
    try:
        for _ in range(6):
            embed(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
    finally:
        devices.forward = devices_forward
    # 8 failed, then halves of 4 until GROW_AFTER (8) fitted, then whole batches of 8 again
    assert calls == [8] + [4] * 8 + [8, 8] and embed.limit == 8


def test_a_small_dev_shm_prefetches_less_instead_of_crashing(capsys):
    from featx.devices import PREFETCH, shm_prefetch

    mib = 2 ** 20
    assert shm_prefetch(4, 10 * mib, free=10 ** 12) == PREFETCH and capsys.readouterr().err == ""
    assert shm_prefetch(4, 10 * mib, free=100 * mib) == 2 and "prefetching 2" in capsys.readouterr().err
    assert shm_prefetch(16, 10 * mib, free=64 * mib) == 0 and "loading in the main process" in capsys.readouterr().err


def test_unknown_decoder_is_refused_before_any_work(tiny, dataset, tmp_path):
    with pytest.raises(featx.FeatxError, match="--decode gpu is not supported: use one of pil, device"):
        run(tiny, dataset, tmp_path / "c", decode="gpu")
    assert not (tmp_path / "c").exists()


def test_a_refused_jpeg_costs_only_itself(tmp_path):
    good = torch.frombuffer(bytearray(varied_images(tmp_path)[0].read_bytes()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff" + bytes(200)), dtype=torch.uint8)
    out = decode_jpegs([good, bad, good], torch.device("cpu"))
    assert out[1] is None and out[0].shape == out[2].shape == (3, 48, 72)


def test_merge_streams_in_chunks(tiny, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "COPY_ROWS", 5)
    r = run(tiny, dataset, tmp_path / "c", checkpoint_rows=7)
    f = store.load(r.path)
    reference = run(tiny, dataset, tmp_path / "d")
    np.testing.assert_array_equal(f.X, store.load(reference.path).X)


def slow_merge():
    """One row per block, 20 ms each: a merge long enough to be killed or read during."""
    read = store.read_features
    store.COPY_ROWS = 1
    store.read_features = lambda *a: (time.sleep(0.02), read(*a))[1]


def extract_child(tiny_weights, data, cache, *extra, delay=0.0, slow=False, stdout=None):
    """``featx extract`` of the tiny network in a forked process. torch runtime: the tiny net's stand-in
    delay (a sleep in forward) cannot be exported to ONNX."""
    argv = ["extract", "--backbone", "tiny", "--data", data, "--cache-dir", cache, "--workers", "0",
            "--batch-size", "4", "--runtime", "torch", "--quiet", *extra]
    return forked_cli(argv, tiny_weights, delay, stdout, before=slow_merge if slow else None)


def test_sigkill_loses_nothing_and_resumes(tiny, tiny_weights, tmp_path):
    data = make_dataset(tmp_path / "many", {"train": 150})
    cache = tmp_path / "c"
    for delay in (3.0, 1.0):  # kill twice, at different points
        proc = extract_child(tiny_weights, data, cache, "--checkpoint-rows", "8", delay=0.02)
        deadline = time.time() + 60
        while time.time() < deadline and not list(cache.glob("*.part*.h5")):
            time.sleep(0.05)
        time.sleep(delay * 0.1)
        proc.kill()
        proc.join()
        for f in cache.glob("*.h5"):
            h5py.File(f, "r").close()  # every file that carries the .h5 name opens
    done = sum(h5py.File(p, "r")["features"].shape[0] for p in cache.glob("*.h5"))
    assert 0 < done < 300, "the kills should land mid-run"
    result = run(tiny, data, cache, runtime="torch", checkpoint_rows=8)  # the killed command, in-process
    assert result.images == 300 and result.new == 300 - done
    assert not list(cache.glob("*.tmp*")) and not list(cache.glob("*.part*"))


def merging(cache: Path, proc, timeout: float = 60) -> None:
    """Wait until the writer is merging: its temporary main file exists."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.is_alive() and not [
            p for p in cache.glob("*.h5.tmp*") if ".part" not in p.name]:
        time.sleep(0.01)


def test_a_kill_during_the_merge_loses_nothing(tiny, tiny_weights, tmp_path, one_torch_thread):
    data = make_dataset(tmp_path / "d", {"train": 30})
    cache = tmp_path / "c"
    proc = extract_child(tiny_weights, data, cache, "--checkpoint-rows", "8", slow=True)
    merging(cache, proc)
    time.sleep(0.3)
    proc.kill()
    proc.join()
    assert len(list(cache.glob("*.part*.h5"))) == 8  # every row is still in a finished part
    result = run(tiny, data, cache, runtime="torch")  # in-process, on the child's runtime: bit-identical rows
    assert result.new == 0 and result.images == 60
    assert not list(cache.glob("*.tmp*")) and not list(cache.glob("*.part*"))
    clean = run(tiny, data, tmp_path / "clean", runtime="torch")
    np.testing.assert_array_equal(store.load(result.path).X, store.load(clean.path).X)


def test_readers_during_a_merge_see_the_old_file_or_the_new_one(tiny, tiny_weights, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 10})
    cache = tmp_path / "c"
    first = run(tiny, data, cache, runtime="torch").as_dict()
    more = make_dataset(tmp_path / "more", {"train": 10}, seed=5)
    for f in more.glob("train/*/*.jpg"):
        f.rename(data / "train" / f.parent.name / f"new_{f.name}")
    proc = extract_child(tiny_weights, data, cache, slow=True)
    merging(cache, proc)
    seen = set()
    while proc.is_alive():
        f = store.load(first["path"])
        assert len(f.X) == len(f.paths) == len(f.y) and np.isfinite(f.X).all()
        seen.add(len(f.X))
    assert proc.exitcode == 0 and seen <= {20, 40} and 20 in seen
    assert len(store.load(first["path"]).X) == 40


def test_two_writers_on_one_cache(tiny_weights, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 40})
    cache = tmp_path / "c"
    outputs = [tmp_path / f"writer{i}.json" for i in range(2)]
    procs = [extract_child(tiny_weights, data, cache, "--json", stdout=out) for out in outputs]
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(out.read_text()) for out in outputs]
    assert sorted(r["new"] for r in results) == [0, 80]
    assert store.load(results[0]["path"]).X.shape == (80, 32)


def test_feature_extractor_in_sklearn_pipeline(tiny, dataset):
    files = sorted(dataset.glob("*/*/*.jpg"))
    y = [f.parent.name for f in files]
    pipe = make_pipeline(featx.FeatureExtractor(tiny), LogisticRegression(max_iter=1000))
    pipe.fit(files, y)
    assert pipe.score(files, y) == 1.0
    assert clone(pipe).get_params()["featureextractor__backbone"] == tiny


def test_feature_extractor_names_unreadable_file(tiny, tmp_path):
    (tmp_path / "bad.jpg").write_text("x")
    with pytest.raises(featx.FeatxError, match="bad.jpg could not be read"):
        featx.FeatureExtractor(tiny).fit().transform([tmp_path / "bad.jpg"])


def test_cli_extract_json_and_errors(tiny, dataset, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["extract", "--backbone", tiny, "--data", str(dataset), "--cache-dir",
                              str(tmp_path / "c"), "--workers", "0", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert {"path", "images", "new", "skipped", "img_per_s"} <= set(payload) and payload["images"] == 24
    res = runner.invoke(cli, ["backbones", "--json"])
    assert any(b["name"] == "vgg16" and "pool5" in b["layers"] for b in json.loads(res.stdout)["backbones"])


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "featx", "extract", "--data", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("featx: error: dataset")


def test_two_folders_with_one_name_get_two_caches(tiny, tmp_path):
    one = make_dataset(tmp_path / "a" / "photos", seed=1)
    two = make_dataset(tmp_path / "b" / "photos", {"train": 4, "val": 2}, seed=2)
    cache = tmp_path / "c"
    r1, r2 = (featx.extract(tiny, str(d), cache_dir=cache, progress=False, workers=0) for d in (one, two))
    assert r1.path != r2.path and r1.images == 24 and r2.images == 12
    again = featx.extract(tiny, str(one), cache_dir=cache, progress=False, workers=0)
    assert again.new == 0 and again.images == 24 and store.load(again.path).attrs["dataset_root"] == str(one)


def test_precision_is_part_of_the_identity(tiny, dataset, tmp_path):
    fp32 = featx.extract(tiny, str(dataset), cache_dir=tmp_path, progress=False, workers=0)
    bf16 = featx.extract(tiny, str(dataset), cache_dir=tmp_path, progress=False, workers=0, precision="bf16")
    assert fp32.path != bf16.path and bf16.new == 24
    assert store.load(fp32.path).identity().precision == "fp32" and store.load(bf16.path).attrs["precision"] == "bf16"
    a, b = store.load(fp32.path).X, store.load(bf16.path).X
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)
    with pytest.raises(featx.FeatxError, match="--precision fp8 is not supported"):
        featx.extract(tiny, str(dataset), cache_dir=tmp_path, progress=False, workers=0, precision="fp8")


def failing_reads(monkeypatch, name: str, times: int):
    """open_rgb raises a permission error for ``name`` the first ``times`` calls (workers=0: same process)."""
    from featx.extraction import images

    real, calls = images.open_rgb, {"n": 0}

    def flaky(path, draft_size=None):
        if Path(path).name == name and calls["n"] < times:
            calls["n"] += 1
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, draft_size)

    monkeypatch.setattr(images, "open_rgb", flaky)
    return calls


def test_read_errors_are_retried_and_never_cached(tiny, dataset, tmp_path, monkeypatch):
    calls = failing_reads(monkeypatch, "001.jpg", times=10 ** 6)  # unreadable for this whole run
    r = run(tiny, dataset, tmp_path / "c")
    assert r.unreadable == 6 and r.skipped == 6 and r.images == 18 and calls["n"] == 6 * 3
    assert all(s["reason"].startswith("I/O PermissionError") and s["retried_next_run"] for s in r.skipped_files)
    assert len(store.load(r.path).paths) == 18
    monkeypatch.undo()
    again = run(tiny, dataset, tmp_path / "c")  # permissions fixed: the files are read, not remembered as bad
    assert again.new == 6 and again.skipped == 0 and again.images == 24


def test_a_passing_read_error_costs_nothing(tiny, dataset, tmp_path, monkeypatch):
    failing_reads(monkeypatch, "002.jpg", times=1)
    r = run(tiny, dataset, tmp_path / "c")
    assert r.skipped == 0 and r.images == 24


def test_files_swapped_with_mv_are_seen_as_changed(tiny, tmp_path):
    """Same size, same mtime (as unzip, tar, cp -p and rsync -a leave them), swapped with mv."""
    data = make_dataset(tmp_path / "d", {"train": 3, "val": 2})
    a, b = data / "train" / "a" / "000.bmp", data / "train" / "b" / "000.bmp"
    colour_image(0, np.random.default_rng(1)).save(a)
    colour_image(1, np.random.default_rng(2)).save(b)
    assert a.stat().st_size == b.stat().st_size
    for f in (a, b):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    first = run(tiny, data, tmp_path / "c")
    os.rename(a, data / "tmp.bmp")
    os.rename(b, a)
    os.rename(data / "tmp.bmp", b)
    again = run(tiny, data, tmp_path / "c")
    assert again.new == 2
    fresh = run(tiny, data, tmp_path / "fresh")
    np.testing.assert_allclose(store.load(again.path).X, store.load(fresh.path).X, atol=1e-6)
    assert first.images == again.images == 12


def test_verify_content_keeps_rows_of_identical_copies(tiny, dataset, tmp_path):
    import shutil

    run(tiny, dataset, tmp_path / "c", verify="content")
    victim = dataset / "train" / "a" / "000.jpg"
    shutil.copy(victim, tmp_path / "copy.jpg")
    os.replace(tmp_path / "copy.jpg", victim)  # same bytes, new inode and times
    assert run(tiny, dataset, tmp_path / "c", verify="content").new == 0
    assert run(tiny, dataset, tmp_path / "stat").new == 24 and run(tiny, dataset, tmp_path / "stat").new == 0
    with pytest.raises(featx.FeatxError, match="--verify hash is not supported"):
        run(tiny, dataset, tmp_path / "c", verify="hash")


def test_flipped_feature_bytes_are_an_error_naming_the_cache(tiny, dataset, tmp_path):
    r = run(tiny, dataset, tmp_path / "c")
    with h5py.File(r.path, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(Path(r.path).read_bytes())
    raw[offset + 40] ^= 0xFF
    Path(r.path).write_bytes(bytes(raw))
    with pytest.raises(featx.FeatxError, match=r"is damaged \(its features fail their Fletcher-32 checksum\): run 'featx extract' again"):
        store.load(r.path)


def test_a_file_that_is_not_a_cache_is_named_as_such(tmp_path):
    colour_image(0, np.random.default_rng(0)).save(tmp_path / "photo.jpg")
    with pytest.raises(featx.FeatxError, match="photo.jpg is not a featx feature cache: pass the .h5 file"):
        store.load(tmp_path / "photo.jpg")


def test_a_full_disk_is_one_line_and_keeps_finished_parts(tiny, dataset, tmp_path, monkeypatch):
    import errno
    import shutil as shutil_mod

    real = store.atomic_write

    def full_on_merge(path):
        if ".part" not in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(store, "atomic_write", full_on_merge)
    with pytest.raises(featx.FeatxError, match="no room in .*needed.*rows already written are kept"):
        run(tiny, dataset, tmp_path / "c", checkpoint_rows=8)
    cache = tmp_path / "c"
    assert len(list(cache.glob("*.part*.h5"))) == 3 and not list(cache.glob("*.tmp*"))
    monkeypatch.undo()
    again = run(tiny, dataset, cache)
    assert again.new == 0 and again.images == 24  # the parts were reused
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda folder: shutil_mod._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
    (dataset / "train" / "a" / "000.jpg").unlink()
    colour_image(0, np.random.default_rng(9)).save(dataset / "train" / "a" / "new.jpg")
    with pytest.raises(featx.FeatxError, match=r"no room in .*MiB needed, 0.0 MiB free"):
        run(tiny, dataset, cache)  # checked before writing: HDF5 may crash rather than raise on a full disk


def test_a_read_only_cache_that_is_up_to_date_stays_usable(tiny, dataset, tmp_path, monkeypatch):
    import errno

    from filelock import FileLock

    first = run(tiny, dataset, tmp_path / "c")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(FileLock, "acquire", read_only)
    again = run(tiny, dataset, tmp_path / "c")
    assert again.new == 0 and again.path == first.path
    colour_image(1, np.random.default_rng(3)).save(dataset / "train" / "b" / "extra.jpg")
    with pytest.raises(featx.FeatxError, match=r"cache folder .* is not writable and 1 images need extracting"):
        run(tiny, dataset, tmp_path / "c")


def test_onnx_runtime_gives_the_torch_features_in_the_same_cache(tiny, dataset, tmp_path):
    cache = tmp_path / "c"
    ort = run(tiny, dataset, cache, runtime="onnxruntime")
    exported = list((cache / "onnx").glob("*.onnx"))
    assert ort.runtime == "onnxruntime" and len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    (dataset / "train" / "a" / "000.jpg").unlink()
    colour_image(0, np.random.default_rng(4)).save(dataset / "train" / "a" / "000.jpg")
    again = run(tiny, dataset, cache, runtime="onnxruntime")
    assert again.path == ort.path and again.new == 1 and exported[0].stat().st_mtime_ns == stamp  # reused
    on_torch = run(tiny, dataset, tmp_path / "torch", runtime="torch")
    assert on_torch.runtime == "torch" and store.load(on_torch.path).attrs["runtime"] == "torch"
    a, b = store.load(again.path).X, store.load(on_torch.path).X
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999 and Path(ort.path).name == Path(on_torch.path).name  # one identity, one cache name


def test_onnx_runtime_threads_follow_omp_num_threads(tiny, dataset, tmp_path, monkeypatch):
    """A job given one core's share (OMP_NUM_THREADS, which torch honours too) keeps ONNX Runtime to it."""
    from featx.devices import usable_cores
    from featx.extraction.runtimes import OnnxForward

    run(tiny, dataset, tmp_path / "c", runtime="onnxruntime")
    exported = next((tmp_path / "c" / "onnx").glob("*.onnx"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert OnnxForward(exported).session.get_session_options().intra_op_num_threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert OnnxForward(exported).session.get_session_options().intra_op_num_threads == usable_cores()


def test_a_network_that_does_not_export_stays_on_torch(tiny, dataset, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::fancy")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    r = run(tiny, dataset, tmp_path / "c", runtime="onnxruntime")
    assert r.new == 24 and "does not run in ONNX Runtime (RuntimeError: Unsupported operator" in capsys.readouterr().err
    assert r.runtime == "torch" and store.load(r.path).attrs["runtime"] == "torch"  # what really ran
    assert not list((tmp_path / "c" / "onnx").glob("*"))
    with pytest.raises(featx.FeatxError, match="--runtime tensorrt is not supported"):
        run(tiny, dataset, tmp_path / "c", runtime="tensorrt")


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_flip_tta_stores_the_mean_of_each_image_and_its_mirror(tiny, tmp_path, runtime):
    data = make_dataset(tmp_path / "d", {"train": 3}, fmt="PNG")  # lossless, so the mirror is exact
    mirrored = tmp_path / "m"
    for f in data.rglob("*.png"):
        target = mirrored / f.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
    plain, mirror = run(tiny, data, tmp_path / "c", runtime=runtime), run(tiny, mirrored, tmp_path / "c", runtime=runtime)
    flip = run(tiny, data, tmp_path / "c", runtime=runtime, tta="flip")
    assert flip.path != plain.path and flip.runtime == runtime
    features = store.load(flip.path)
    assert features.identity().tta == "flip" and store.load(plain.path).identity().tta == "none"
    np.testing.assert_allclose(features.X, (store.load(plain.path).X + store.load(mirror.path).X) / 2, atol=1e-5)


def test_an_unknown_tta_is_one_line(tiny, dataset, tmp_path):
    with pytest.raises(featx.FeatxError, match="--tta rotate is not supported: use none or flip"):
        run(tiny, dataset, tmp_path / "c", tta="rotate")


def test_an_export_torch_refuses_is_one_line_and_leaves_stdout_alone(tmp_path, capfd):
    """torch's TorchScript exporter prints the whole graph (to stdout) when it fails: featx says one line on
    stderr, so ``--json`` output stays JSON."""
    from torch import nn

    from featx.extraction.network import Backbone
    from featx.extraction.runtimes import onnx_model
    from featx.extraction.specs import BackboneSpec, Preprocess, Tap, Weights

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(3), nn.Flatten())  # 4x4 -> 3x3
    spec = BackboneSpec("pooled", "tiny", lambda: model, Weights("file", "-"), Preprocess(32, 32), 36,
                        {"pool": Tap("2", "flat")}, "pool", {"all": ["0"]}, "2")
    assert onnx_model(Backbone(spec, model, "pool", spec.preprocess, "w", "sha"), tmp_path) is None
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "does not run in ONNX Runtime" in err, (out[:300], err[:300])
