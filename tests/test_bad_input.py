"""Bad input as a user meets it, one test per fault: each is one ``featx: error:`` line naming the file or folder
and the fix, never a traceback; what would lose work or fail the same way forever is repaired by the next run."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import featx
from featx.extraction import store
from featx.cli import main
from featx.finetuning.training import finetune
from helpers import make_dataset, register_tiny, save_tiny_weights


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``featx ARGV`` in this process: (exit code, stdout, stderr). An exception other than the one-line exit
    escapes, and fails the test with its traceback."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *words: str) -> str:
    """The run failed with exactly one ``featx: error:`` line, holding ``words``; that line."""
    errors = [line for line in err.splitlines() if line.startswith("featx: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


@pytest.fixture
def extracted(tiny, tmp_path, capsys):
    data = make_dataset(tmp_path / "d")
    code, _, err = cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c",
                       "--workers", "0", "--quiet")
    assert code == 0, err
    path, = (tmp_path / "c").glob("*.h5")
    return data, path


def test_a_damaged_checksums_attribute_is_one_line_and_extract_rebuilds_the_file(tiny, extracted, tmp_path, capsys):
    data, path = extracted
    labels = store.load(path).y
    with h5py.File(path, "r+") as f:
        f.attrs["checksums"] = f.attrs["checksums"][:-3] + "x!"  # one changed byte: not JSON any more
    one_line(*cli(capsys, "fit-head", "--features", path, "--out", tmp_path / "r")[::2], str(path),
             "checksums attribute is unreadable", "run 'featx extract' again, which rebuilds it")
    code, _, err = cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c",
                       "--workers", "0", "--quiet")
    assert code == 0 and f"{path} is damaged (its checksums attribute is unreadable): removed" in err
    np.testing.assert_array_equal(store.load(path).y, labels)


def test_a_current_cache_without_its_checksums_is_damaged_not_older(tiny, extracted, tmp_path, capsys):
    data, path = extracted
    labels = store.load(path).y
    with h5py.File(path, "r+") as f:
        f["labels"][...] = 1 - f["labels"][:]  # every label flipped...
        del f.attrs["checksums"]  # ...and the checksums that would say so deleted
    one_line(*cli(capsys, "fit-head", "--features", path, "--out", tmp_path / "r")[::2], str(path),
             "checksums attribute is missing")
    assert cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c", "--workers",
               "0", "--quiet")[0] == 0
    np.testing.assert_array_equal(store.load(path).y, labels)
    with h5py.File(path, "r+") as f:  # a file from before checksums were recorded is still read
        del f.attrs["checksums"], f.attrs["integrity"]
    np.testing.assert_array_equal(store.load(path).y, labels)


def test_a_file_name_that_is_not_utf8_is_kept_byte_for_byte(tiny, tmp_path, capsys):
    data = make_dataset(tmp_path / "d")
    bad = os.fsencode(data / "train" / "a") + b"/bad\xff\xfe.jpg"
    os.rename(data / "train" / "a" / "000.jpg", bad)
    extract = ["extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c", "--workers", "0",
               "--quiet", "--json"]
    code, out, err = cli(capsys, *extract)
    assert code == 0, err
    path, = (tmp_path / "c").glob("*.h5")
    name = os.fsdecode(b"train/a/bad\xff\xfe.jpg")
    assert name in list(store.load(path).paths) and json.loads(out)["images"] == 24
    assert json.loads(cli(capsys, *extract)[1])["new"] == 0  # found again by its bytes: nothing recomputed
    assert cli(capsys, "fit-head", "--features", path, "--out", tmp_path / "r")[0] == 0
    code, out, _ = cli(capsys, "predict", "--model", tmp_path / "r" / "model.featx", os.fsdecode(bad))
    assert code == 0 and out.startswith(f"{data}/train/a/bad\\xff\\xfe.jpg\ta ")


def test_long_names_are_one_line_or_work(tiny, tmp_path, capsys):
    data = make_dataset(tmp_path / ("d" * 240))  # the cache file's name would pass 255 bytes
    code, _, err = cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c",
                       "--workers", "0", "--quiet")
    assert code == 0, err
    assert all(len(p.name) < 200 for p in (tmp_path / "c").iterdir())
    deep = os.open(data / "test" / "a", os.O_RDONLY)  # 25 folders of 200 characters: a path past PATH_MAX
    for _ in range(25):
        os.mkdir("x" * 200, dir_fd=deep)
        deep, previous = os.open("x" * 200, os.O_RDONLY, dir_fd=deep), deep
        os.close(previous)
    os.close(deep)
    assert cli(capsys, "fit-head", "--features", next((tmp_path / "c").glob("*.h5")), "--out", tmp_path / "r")[0] == 0
    one_line(*cli(capsys, "predict", "--model", tmp_path / "r" / "model.featx", data / "test")[::2],
             f"cannot list {data / 'test'}", "File name too long", "shorten or move")


def test_a_binary_exclude_file_is_one_line(extracted, tmp_path, capsys):
    _, path = extracted
    (tmp_path / "drop.txt").write_bytes(bytes(range(256)))
    one_line(*cli(capsys, "fit-head", "--features", path, "--exclude", tmp_path / "drop.txt")[::2],
             f"--exclude {tmp_path / 'drop.txt'} is not a text file (byte 0 is NUL)")


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"extract": "hello"}', '{"extract": {"backbone": 3}}',
                                     '{"fit_head": {"model": 7, "clf": "logreg", "data": "d"}}', "\xff\xfe"])
def test_a_workspace_of_the_wrong_shape_is_one_line_and_extract_replaces_it(tiny, extracted, tmp_path, capsys,
                                                                              content):
    data, _ = extracted
    state = tmp_path / "c" / "workspace.json"
    state.write_text(content, errors="surrogateescape") if content != "\xff\xfe" else state.write_bytes(b"\xff\xfe")
    for command in (["fit-head"], ["audit"], ["finetune", "--unfreeze", "block2", "--epochs", "1"]):
        one_line(*cli(capsys, *command, "--cache-dir", tmp_path / "c", "--out", tmp_path / "r")[::2], str(state),
                 "delete it (featx writes it again at the next extract)")
    assert cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", tmp_path / "c", "--workers",
               "0", "--quiet")[0] == 0
    assert json.loads(state.read_text())["extract"]["backbone"] == tiny


def as_nobody(commands: list, stderr) -> None:
    """In a forked child: ``featx COMMAND`` for each command, as a user without root's power over mode bits."""
    import torch

    torch.set_num_threads(1)  # an OpenMP pool does not survive fork
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    sys.stderr = open(stderr, "w")
    for argv in commands:
        try:
            main(argv)
        except SystemExit:
            pass
    sys.stderr.close()


def test_an_out_folder_that_cannot_be_read_or_written_is_one_line():
    import multiprocessing

    work = Path(tempfile.mkdtemp())  # outside pytest's own folders, which only root may enter
    try:
        work.chmod(0o777)
        tiny = register_tiny(save_tiny_weights(work / "tiny.pth"), name="tiny_elsewhere").name
        data = make_dataset(work / "d")
        features = featx.extract(tiny, str(data), cache_dir=work / "c", workers=0, progress=False).path
        model = featx.fit_head("logreg", features=features, out=work / "r", progress=False)["model"]
        locked = work / "locked"
        locked.mkdir(mode=0)
        commands = [["fit-head", "--features", features, "--out", locked / "head"],
                    ["export", "--model", model, "--out", locked / "sub" / "model.onnx"],
                    ["finetune", "--backbone", tiny, "--data", data, "--unfreeze", "block2", "--epochs", "1",
                     "--workers", "0", "--cache-dir", work / "c", "--out", locked / "ft"]]
        child = multiprocessing.get_context("fork").Process(
            target=as_nobody, args=([[str(a) for a in c] for c in commands], work / "err.txt"))
        child.start()
        child.join(60)
        err = (work / "err.txt").read_text()
    finally:
        if (work / "locked").exists():
            (work / "locked").chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
    errors = [line for line in err.splitlines() if line.startswith("featx: error:")]
    assert child.exitcode == 0 and "Traceback" not in err and len(errors) == 3, err
    for line, where in zip(errors, ("head", "sub", "ft")):
        assert str(locked / where) in line and "Permission denied" in line and "pass --out a writable folder" in line, line


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size in MiB (root only, as CI runs), unmounted afterwards."""
    mounted = []

    def make(mib: float, name: str = "disk"):
        disk = tmp_path / name
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k", "tmpfs", str(disk)],
                          capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        mounted.append(disk)
        return disk

    yield make
    for disk in mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_export_onto_a_full_or_read_only_disk_says_so(extracted, tmp_path, small_disk, capsys):
    _, path = extracted
    featx.fit_head("logreg", features=path, out=tmp_path / "r", progress=False)
    model = tmp_path / "r" / "model.featx"
    full = small_disk(1)
    one_line(*cli(capsys, "export", "--model", model, "--out", full / "model.onnx")[::2], f"no room in {full}",
             "pass --out elsewhere")
    read_only = small_disk(8, "ro")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    line = one_line(*cli(capsys, "export", "--model", model, "--out", read_only / "model.onnx")[::2],
                    f"{read_only} is not writable", "pass --out a writable folder")
    assert "--opset" not in line and not list(full.iterdir())


def ft(tiny, data, tmp_path, name, **kw):
    options = {"epochs": 2, "lr": 0.05, "workers": 0, "progress": False, "head": "none", "runtime": "torch",
               "cache_dir": tmp_path / "cache", "augment": "none", **kw}
    return finetune(tiny, str(data), "block2", out=tmp_path / name, **options)


def test_a_boundary_file_whose_header_is_damaged_is_computed_again(tiny, dataset, tmp_path, capfd):
    first = ft(tiny, dataset, tmp_path, "first", epochs=1)
    path = first["boundary_cache"]["files"][0]
    with open(path, "r+b") as f:
        f.write(bytes(64))  # the superblock
    again = ft(tiny, dataset, tmp_path, "again", epochs=1)
    assert f"{path} is damaged (HDF5 cannot open it" in capfd.readouterr().err
    assert again["boundary_cache"]["rows_computed"] == 18
    assert again["history"][0]["train_loss"] == pytest.approx(first["history"][0]["train_loss"], rel=1e-5)


def test_on_a_small_disk_the_boundary_cache_takes_fewer_views_or_none(tiny, dataset, tmp_path, small_disk):
    tight = ft(tiny, dataset, tmp_path, "tight", epochs=4, augment="light", views=4, cache_dir=small_disk(2))
    assert tight["boundary_cache"]["views"] == 3 and "(not 4" in tight["boundary_cache"]["note"]
    tiny_disk = small_disk(1, "one")
    none = ft(tiny, dataset, tmp_path, "none", epochs=2, augment="light", views=2, cache_dir=tiny_disk)
    note = none["boundary_cache"]["note"]
    assert not none["boundary_cache"]["used"] and "whole network" in note and "0.00" not in note, note
    assert " MB free under" in note and len(none["history"]) == 2


def test_resume_with_other_views_is_refused_before_any_row_is_computed(tiny, dataset, tmp_path):
    ft(tiny, dataset, tmp_path, "run", augment="light", views=2, epochs=1)
    before = sorted(p.name for p in (tmp_path / "cache" / "boundary").iterdir())
    with pytest.raises(featx.FeatxError, match=r"different finetune setup \(views: 2 then, 3 now\)"):
        ft(tiny, dataset, tmp_path, "run", augment="light", views=3, epochs=3, resume=True)
    assert sorted(p.name for p in (tmp_path / "cache" / "boundary").iterdir()) == before


def test_a_killed_checkpoint_write_leaves_nothing_after_the_next_run(tiny, dataset, tmp_path):
    ft(tiny, dataset, tmp_path, "run", epochs=1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "run" / f"checkpoint.pt.tmp{dead.pid}"  # what a kill during the write leaves
    live = tmp_path / "run" / f"model.featx.tmp{os.getppid()}"  # a live process's: left alone
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    ft(tiny, dataset, tmp_path, "run", epochs=2, resume=True)
    assert not stale.exists() and live.exists()


def test_predict_escapes_labels_as_it_escapes_paths(tiny, tmp_path, capsys):
    data = make_dataset(tmp_path / "d", {"train": 6, "test": 2}, classes=("a\nb", "c\td"))
    fit = featx.fit_head("logreg", backbone=tiny, data=str(data), cache_dir=tmp_path / "c", out=tmp_path / "r",
                         progress=False)
    code, out, _ = cli(capsys, "predict", "--model", fit["model"], "--top-k", "2", data / "test")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and all(line.count("\t") == 1 for line in lines)
    assert {line.split("\t")[1].split(" ")[0] for line in lines} <= {"a\\nb", "c\\td"}


def test_a_deleted_warm_start_model_is_said_as_such(tiny, dataset, tmp_path, capfd):
    fit = featx.fit_head("logreg", backbone=tiny, data=str(dataset), cache_dir=tmp_path / "cache",
                         out=tmp_path / "r", progress=False)
    os.remove(fit["model"])
    ft(tiny, dataset, tmp_path, "ft", epochs=1, head=None, progress=True)
    assert f"the last fit-head's model {fit['model']} no longer exists" in capfd.readouterr().err
