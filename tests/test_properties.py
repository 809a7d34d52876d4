"""Property-based tests of the inputs users control (hypothesis): file and folder names of any bytes, length and
characters, workspace.json of any JSON value, exclude files of any bytes. For each, featx works or prints one
``featx: error:`` line and no traceback, and a cache it wrote still loads. Few examples each: they are a net for
what the fault tests (tests/test_bad_input.py) did not think of, kept to a few seconds in all."""
import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from featx.extraction import store
from helpers import make_dataset
from test_bad_input import cli

FAST = settings(max_examples=12, deadline=None, derandomize=True,  # the same examples every run
                phases=[Phase.explicit, Phase.generate],  # a failing example is shown as found: shrinking takes minutes
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def without_separators(raw: bytes) -> bytes:
    return raw.replace(b"/", b"_").replace(b"\0", b"_")


NAMES = st.one_of(  # a file or folder name: any bytes but / and NUL, up to the 255 bytes a name may have
    st.binary(min_size=1, max_size=255).map(without_separators),
    st.text(min_size=1, max_size=60).map(lambda t: without_separators(t.encode())[:255]),
    st.sampled_from([b"a\nb", b" ", b"-", b"--data", b"\xff\xfe", "ü n\u00efcode 写真 🐝".encode(), b"x" * 255]),
).filter(lambda name: name not in (b".", b".."))


def works_or_one_line(code: int, err: str) -> bool:
    """Exit 0, or exit 2 with one ``featx: error:`` line (an exception would have escaped ``cli``)."""
    assert "Traceback" not in err, err
    if code:
        assert code == 2 and sum(line.startswith("featx: error:") for line in err.splitlines()) == 1, err
    return code == 0


def extract(capsys, tiny, data, cache, *more):
    return cli(capsys, "extract", "--backbone", tiny, "--data", data, "--cache-dir", cache, "--workers", "0",
               "--quiet", "--json", "--runtime", "torch", *more)


def cached_paths(cache) -> list:
    path, = Path(cache).glob("*.h5")
    return list(store.load(path).paths)


@settings(FAST, max_examples=10)
@given(root=NAMES, folder=NAMES, name=NAMES)
def test_any_file_and_folder_names(tiny, capsys, root, folder, name):
    work = Path(tempfile.mkdtemp())
    try:
        data = os.path.join(os.fsencode(work), root)
        make_dataset(Path(os.fsdecode(data)), {"train": 3}, classes=("b", "c"))
        os.makedirs(os.path.join(data, b"train", folder), exist_ok=True)
        shutil.copy(os.path.join(data, b"train", b"b", b"000.jpg"), os.path.join(data, b"train", folder, name))
        code, out, err = extract(capsys, tiny, os.fsdecode(data), work / "cache")
        if works_or_one_line(code, err):
            relative = os.fsdecode(b"train/" + folder + b"/" + name)
            assert relative in cached_paths(work / "cache") or name.startswith(b".") or folder.startswith(b".")
            code, out, err = extract(capsys, tiny, os.fsdecode(data), work / "cache")
            assert code == 0 and json.loads(out)["new"] == 0, err  # found again: nothing computed twice
            features, = (work / "cache").glob("*.h5")
            if works_or_one_line(*cli(capsys, "fit-head", "--features", features, "--out", work / "r")[::2]):
                works_or_one_line(*cli(capsys, "predict", "--model", work / "r" / "model.featx", "--runtime", "torch",
                                       os.fsdecode(data))[::2])
    finally:
        shutil.rmtree(work)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
ENTRY = st.dictionaries(st.sampled_from(["backbone", "data", "dataset", "layer", "input_size", "model", "clf", "path"]),
                        JSON, max_size=6)
WORKSPACES = st.one_of(JSON, st.dictionaries(st.sampled_from(["extract", "fit_head"]), st.one_of(ENTRY, JSON)))


@FAST
@given(state=WORKSPACES)
def test_any_workspace_json(tiny, tmp_path, capsys, state):
    data = tmp_path / "d" if (tmp_path / "d").is_dir() else make_dataset(tmp_path / "d")
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / "workspace.json").write_text(json.dumps(state))
    for command in (["fit-head"], ["audit"]):
        works_or_one_line(*cli(capsys, *command, "--cache-dir", tmp_path / "c", "--out", tmp_path / "r")[::2])
    code, _, err = extract(capsys, tiny, data, tmp_path / "c")  # and extract replaces what it cannot use
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "workspace.json").read_text())["extract"]["backbone"] == tiny
    assert len(cached_paths(tmp_path / "c")) == 24


LINES = st.lists(st.sampled_from(["train/a/000.jpg", "test/b/001.jpg", "# a comment", "", "  val/a/002.jpg  ",
                                  "nowhere.jpg"]), max_size=5).map(lambda lines: "\n".join(lines).encode())


@FAST
@given(content=st.one_of(st.binary(max_size=300), LINES))
def test_any_exclude_file(tiny, tmp_path, capsys, content):
    data = tmp_path / "d" if (tmp_path / "d").is_dir() else make_dataset(tmp_path / "d")
    (tmp_path / "drop.txt").write_bytes(content)
    code, out, err = extract(capsys, tiny, data, tmp_path / "c", "--exclude", tmp_path / "drop.txt")
    if works_or_one_line(code, err):
        assert len(cached_paths(tmp_path / "c")) == json.loads(out)["images"]
