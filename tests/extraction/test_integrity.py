"""Integrity end to end: nothing featx reads back can silently change a number (one test per fault)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.extraction import store
from featx.cli import cli
from featx.heads.fit import fit_head
from featx.serve.predictor import evaluate, predict
from helpers import REPO, colour_image, make_dataset


def run(tiny, data, cache, **kw):
    return featx.extract(tiny, str(data), cache_dir=cache, progress=False, workers=0, batch_size=4, **kw)


def export_of(cache: Path) -> Path:
    export, = (cache / "onnx").glob("*.onnx")
    return export


def flip(path: Path, offset: int, count: int = 1) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[offset + 97 * i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "another network"])
def test_a_damaged_export_is_said_removed_and_made_again(tiny, dataset, tmp_path, capsys, damage):
    cache = tmp_path / "c"
    clean = store.load(run(tiny, dataset, cache, runtime="onnxruntime").path)
    export = export_of(cache)
    if damage == "flipped":
        flip(export, export.stat().st_size // 2, 10)
    elif damage == "truncated":
        export.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    else:
        run(tiny, dataset, tmp_path / "other", runtime="onnxruntime", layer="block1")
        shutil.copy(export_of(tmp_path / "other"), export)
    colour_image(0, np.random.default_rng(9)).save(dataset / "train" / "a" / "new.jpg")  # something to compute
    capsys.readouterr()
    r = run(tiny, dataset, cache, runtime="onnxruntime")
    err = capsys.readouterr().err
    assert f"{export} cannot be trusted (its SHA-256 differs from the one recorded when it was made)" in err
    assert "which no longer verifies: computing them again" in err  # the rows it made are not served either
    assert r.runtime == "onnxruntime" and r.new == 25 and export.is_file()
    on_torch = store.load(run(tiny, dataset, tmp_path / "torch", runtime="torch").path)
    again = store.load(r.path)
    np.testing.assert_allclose(again.X, on_torch.X, rtol=1e-4, atol=1e-5)
    row = {p: i for i, p in enumerate(again.paths)}
    np.testing.assert_allclose(again.X[[row[p] for p in clean.paths]], clean.X, rtol=1e-5, atol=1e-6)


def test_rows_from_an_export_that_no_longer_verifies_are_computed_again(tiny, dataset, tmp_path, capsys):
    cache = tmp_path / "c"
    first = run(tiny, dataset, cache, runtime="onnxruntime")
    with h5py.File(first.path) as f:
        assert json.loads(f.attrs["onnx_exports"]) == {export_of(cache).name: (export_of(cache).with_name(
            export_of(cache).name + ".sha256")).read_text()}
    flip(export_of(cache), export_of(cache).stat().st_size // 2)
    capsys.readouterr()
    again = run(tiny, dataset, cache, runtime="torch")  # even on the other runtime: those rows are not served
    assert again.new == 24 and "which no longer verifies: computing them again" in capsys.readouterr().err
    assert run(tiny, dataset, cache, runtime="torch").new == 0


def test_predict_and_evaluate_never_use_a_damaged_export(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "colours", {"train": 8, "test": 6}, classes=("a", "b", "c"))
    run(tiny, data, "cache", runtime="onnxruntime")
    m = fit_head("svm", features=next(Path("cache").glob("*.h5")), out=tmp_path / "svm", progress=False)
    images = sorted((data / "test").rglob("*.jpg"))
    clean = [p["label"] for p in predict(tmp_path / "svm" / "model.featx", images)]
    flip(export_of(Path("cache")), export_of(Path("cache")).stat().st_size // 2, 10)
    capsys.readouterr()
    assert [p["label"] for p in predict(tmp_path / "svm" / "model.featx", images)] == clean
    assert "cannot be trusted" in capsys.readouterr().err
    flip(export_of(Path("cache")), export_of(Path("cache")).stat().st_size // 2, 10)
    shutil.rmtree("cache", ignore_errors=True)  # evaluate extracts again, with the damaged-export check
    run(tiny, data, "cache", runtime="onnxruntime")
    flip(export_of(Path("cache")), export_of(Path("cache")).stat().st_size // 3, 10)
    assert evaluate(tmp_path / "svm" / "model.featx", str(data), progress=False)["test"]["accuracy"] == \
        m["test"]["accuracy"]


def test_a_killed_exports_temporary_file_is_removed_by_the_next_run(tiny, dataset, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "c" / "onnx").mkdir(parents=True)
    leftover = tmp_path / "c" / "onnx" / f"tiny__pool__0123456789.onnx.tmp{dead.pid}"
    leftover.write_bytes(b"\0" * 4096)
    mine = tmp_path / "c" / "onnx" / f"other.onnx.tmp{os.getpid()}"  # a live writer's: kept
    mine.write_bytes(b"")
    run(tiny, dataset, tmp_path / "c", runtime="onnxruntime")
    assert not leftover.exists() and mine.exists()


@pytest.mark.parametrize("name", ["labels", "paths", "splits", "fingerprints", "skipped/reasons"])
def test_every_cache_dataset_is_checksummed(tiny, dataset, tmp_path, capsys, name):
    (dataset / "train" / "a" / "broken.jpg").write_bytes(b"not an image")  # something in skipped/
    r = run(tiny, dataset, tmp_path / "c")
    with h5py.File(r.path, "r+") as f:
        values = f[name][:]
        if name == "labels":
            values[:20] ^= 1
        else:
            values[0] = (values[0].decode() if isinstance(values[0], bytes) else values[0]) + "x"
        f[name][...] = values
    with pytest.raises(featx.FeatxError, match=rf"is damaged \(its {name} fail their checksum\): run 'featx extract'"):
        fit_head("logreg", features=r.path, out=tmp_path / "run", progress=False)
    capsys.readouterr()
    again = run(tiny, dataset, tmp_path / "c")
    assert f"is damaged (its {name} fail their checksum): removed; its rows are computed again" in \
        capsys.readouterr().err
    assert again.new == 24 and fit_head("logreg", features=r.path, out=tmp_path / "run", progress=False)
    np.testing.assert_array_equal(store.load(again.path).y, store.load(run(tiny, dataset, tmp_path / "d").path).y)


def test_extract_checks_the_features_of_a_cache_it_would_call_up_to_date(tiny, dataset, tmp_path, capsys):
    r = run(tiny, dataset, tmp_path / "c")
    with h5py.File(r.path, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    flip(Path(r.path), offset + 40)
    capsys.readouterr()
    again = run(tiny, dataset, tmp_path / "c")
    assert "features fail their Fletcher-32 checksum): removed" in capsys.readouterr().err and again.new == 24
    store.load(again.path)


def test_a_full_disk_under_out_is_one_line(tiny, tmp_path, tiny_disk):
    data = make_dataset(tmp_path / "colours", {"train": 8, "test": 3})
    r = run(tiny, data, tmp_path / "c")
    (tiny_disk / "filler").write_bytes(b"\0" * ((1 << 20) - 64 * 1024))  # nearly full: a model fits, no report
    runner = CliRunner()
    for argv in (["fit-head", "--clf", "mlp", "--features", r.path, "--out", str(tiny_disk / "head")],
                 ["finetune", "--backbone", tiny, "--data", str(data), "--unfreeze", "all", "--epochs", "1",
                  "--workers", "0", "--out", str(tiny_disk / "ft")]):
        result = runner.invoke(cli, argv + ["--quiet"])
        assert result.exit_code == 1 and isinstance(result.exception, featx.FeatxError), result.output
        message = str(result.exception)
        assert message.startswith(f"no room in {tiny_disk}/") and "MiB needed" in message and "--out" in message
        assert "\n" not in message
    assert not list(tiny_disk.rglob("*.tmp*"))  # nothing half-written left behind


def test_a_full_cache_folder_during_the_export_is_one_line(tiny, dataset, tiny_disk):
    (tiny_disk / "filler").write_bytes(b"\0" * ((1 << 20) - 16 * 1024))
    with pytest.raises(featx.FeatxError, match=f"no room in {tiny_disk}/onnx: about .* MiB needed"):
        run(tiny, dataset, tiny_disk, runtime="onnxruntime")


def unprivileged(argv: list) -> list:
    """``argv`` without the capabilities that let root read any folder (CI runs as root)."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"] + argv


def test_a_class_folder_that_cannot_be_listed_is_one_line(tiny, dataset, tmp_path):
    locked = dataset / "val" / "b"
    locked.chmod(0)
    try:
        for command in (["extract", "--backbone", "efficientnet_lite0"], ["fit-head", "--backbone", "efficientnet_lite0"]):
            done = subprocess.run(unprivileged([sys.executable, "-m", "featx", *command, "--data", str(dataset),
                                                "--cache-dir", str(tmp_path / "c")]),
                                  capture_output=True, text=True, cwd=REPO, timeout=120)
            assert done.returncode == 2, done.stderr
            assert done.stderr.strip() == (f"featx: error: cannot list {locked} (Permission denied): make it readable "
                                           "(chmod u+rx) or move it out of the dataset")
    finally:
        locked.chmod(0o755)


def test_a_changed_file_that_cannot_be_read_loses_its_old_row(tiny, dataset, tmp_path, monkeypatch):
    from PIL import Image

    first = run(tiny, dataset, tmp_path / "c")
    victim = dataset / "train" / "a" / "000.jpg"
    colour_image(1, np.random.default_rng(3)).save(victim)  # changed ...
    real = Image.open

    def refuse(path, *args, **kwargs):
        if Path(path if isinstance(path, (str, os.PathLike)) else path.name) == victim:
            raise PermissionError(13, "Permission denied", str(victim))  # ... and unreadable this time
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    r = run(tiny, dataset, tmp_path / "c")
    assert (r.images, r.unreadable) == (23, 1) and "train/a/000.jpg" not in set(store.load(r.path).paths)
    monkeypatch.setattr(Image, "open", real)
    r = run(tiny, dataset, tmp_path / "c")
    assert (r.images, r.new) == (24, 1) and first.images == 24


def test_a_dataset_whose_every_image_is_corrupt_is_an_error_naming_the_count(tiny, tmp_path):
    data = make_dataset(tmp_path / "bad", {"train": 3})
    for f in data.rglob("*.jpg"):
        f.write_bytes(b"not an image")
    with pytest.raises(featx.FeatxError, match=r"none of the 6 images under .*bad could be read \(first: "):
        run(tiny, data, tmp_path / "c")


def test_classes_absent_from_training_are_named(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 6, "test": 3}, classes=("a", "b"))
    make_dataset(tmp_path / "d", {"test": 3}, classes=("c",))  # c only in test
    r = run(tiny, data, tmp_path / "c")
    m = fit_head("logreg", features=r.path, out=tmp_path / "run", progress=False)
    warning = "1 class has no training images (c): the head never predicts it, so its held-out images count"
    assert any(warning in w for w in m["selected"]["warnings"])
    assert m["test"]["per_class"]["c"]["recall"] == 0.0
    assert warning in (tmp_path / "run" / "report.html").read_text()
    out = CliRunner().invoke(cli, ["fit-head", "--features", r.path, "--out", str(tmp_path / "cli"), "--quiet"])
    assert f"warning: {warning}" in out.output
    out = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "run" / "model.featx"), "--data", str(data),
                                   "--cache-dir", str(tmp_path / "c"), "--quiet"])  # evaluate says so too
    assert out.exit_code == 0 and "warning: the model never trained on c, so it never predicts that class: their " \
        "test images count as errors" in out.output, out.output
    assert "the model never trained on c" in (tmp_path / "run" / "evaluate_d_test" / "report.html").read_text()


def test_evaluate_takes_a_folder_with_one_class(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 6, "test": 3})
    fit_head("logreg", features=run(tiny, data, tmp_path / "c").path, out=tmp_path / "run", progress=False)
    only_b = make_dataset(tmp_path / "only_b", {"test": 4}, seed=3)
    shutil.rmtree(only_b / "test" / "a")
    m = evaluate(tmp_path / "run" / "model.featx", str(only_b), cache_dir=tmp_path / "c", progress=False)
    assert m["test"]["n"] == 4 and m["test"]["accuracy"] == 1.0


def test_the_workspace_message_names_the_record_not_another_cache(tiny, dataset, tmp_path, capsys):
    cache = tmp_path / "c"
    run(tiny, dataset, cache)
    state = json.loads((cache / "workspace.json").read_text())
    state["extract"]["layer"] = "block1"  # hand-edited: its path still names the pool cache
    (cache / "workspace.json").write_text(json.dumps(state))
    capsys.readouterr()
    m = fit_head("knn", cache_dir=cache, out=tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert f"layer block1 · precision fp32 · tta none from the last extract ({cache / 'workspace.json'})" in err
    assert "__block1__" in m["features"]


def test_renaming_a_class_folder_moves_no_file_between_splits(tiny, tmp_path, capsys):
    from featx import data

    flat = make_dataset(tmp_path / "flat", {"": 40}, classes=("cats", "dogs"))
    before = data.scan(flat)
    (flat / "cats").rename(flat / "kitties")
    after = data.scan(flat)
    split_of = lambda ds: {p.split("/", 1)[1] + str(ds.labels[i]): s for i, (p, s) in  # noqa: E731
                           enumerate(zip(ds.paths, ds.splits))}
    assert split_of(before) == {k.replace("kitties", "cats"): s for k, s in split_of(after).items()}
    assert after.classes == ["dogs", "kitties"] and before.split_source == after.split_source == "name-hash:0"
    val = before.with_val_from_train(0.2)
    renamed = after.with_val_from_train(0.2)
    assert sorted(s for s in val.splits) == sorted(s for s in renamed.splits)
    # a cache split by the old hash (class folder included) is re-split once, with a note
    r = run(tiny, flat, tmp_path / "c")
    with h5py.File(r.path, "r+") as f:  # as featx wrote it before: the class folder in the hash
        paths = list(f["paths"].asstr()[:])
        f["splits"][...] = np.asarray(data.hashed_split(paths, f["labels"][:]), dtype=object)
        f.attrs["split_source"], f.attrs["checksums"] = "hash:0", store.checksums(f)
    capsys.readouterr()
    result = CliRunner().invoke(cli, ["extract", "--backbone", tiny, "--data", str(flat), "--cache-dir",
                                      str(tmp_path / "c"), "--quiet", "--workers", "0"])
    assert "featx: note: hashed splits now hash each file's path below its class folder" in result.output
    with h5py.File(r.path) as f:
        assert f.attrs["split_source"] == "name-hash:0"
