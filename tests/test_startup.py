"""The CLI starts fast: importing it (what `featx --help` does) loads none of the heavy libraries."""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "timm", "sklearn", "numpy", "h5py", "onnxruntime", "ray", "matplotlib")


def fresh_cli(*argvs: list) -> tuple[list, list, str, list]:
    """Run featx commands one after another in one fresh interpreter: (their exit codes, stdout lines, stderr,
    the heavy libraries loaded by the end, in ``HEAVY``'s order)."""
    code = ("import json, sys; from featx.cli import main\n"
            "codes = []\n"
            f"for argv in {list(argvs)!r}:\n"
            "    try: main(argv); codes.append(0)\n"
            "    except SystemExit as e: codes.append(e.code)\n"
            f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *out, summary = done.stdout.splitlines()
    codes, loaded = json.loads(summary)
    return codes, out, done.stderr, loaded


def test_the_cli_imports_nothing_heavy():
    loaded = fresh_cli()[3]
    assert loaded == [], f"featx.cli imports {loaded} at start-up"


def test_what_a_cached_auto_rerun_imports_loads_no_torch():
    """A re-run of auto with every candidate cached needs its cost model, the scenario words and the heads'
    loaders: none of them may import torch (it cost a 10 s re-run 4 s here)."""
    code = ("import sys, featx.autosearch, featx.heads.advice, featx.finetuning, featx.heads.registry\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch" not in loaded, loaded


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "featx", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("extract", "fit-head", "finetune", "predict", "evaluate", "compare", "advise", "run"):
        assert f"  {command}" in out


def test_an_up_to_date_extract_and_predict_load_no_torch(tmp_path):
    """Re-running an extraction whose cache is current answers from the index, fitting an svm on the cache
    needs numpy and scipy only, and predicting with a model whose backbone is exported answers from ONNX
    Runtime: no network is built, torch is never imported, and the probabilities are torch's."""
    import featx
    from helpers import make_dataset

    data, cache = make_dataset(tmp_path / "few", {"train": 3}), tmp_path / "cache"
    first = featx.extract("efficientnet_lite0", str(data), cache_dir=cache, progress=False)  # exports the net
    featx.fit_head("logreg", data=str(data), cache_dir=cache, out=tmp_path / "run", progress=False)
    image, model = data / "train" / "b" / "001.jpg", tmp_path / "run" / "model.featx"
    expected = featx.predict(model, [image], runtime="torch", cache_dir=cache)[0]["probability"]
    options = ["--cache-dir", str(cache), "--device", "cpu", "--json"]
    codes, out, _, loaded = fresh_cli(["extract", "--data", str(data), *options],
                                      ["fit-head", "--clf", "svm", "--features", first.path, "--out",
                                       str(tmp_path / "svm"), "--quiet", "--json"],
                                      ["predict", "--model", str(model), str(image), *options])
    assert codes == [0, 0, 0]
    rerun, svm, predicted = map(json.loads, out)
    assert svm["selected"]["C"] > 0 and (tmp_path / "svm" / "model.featx").is_file()
    assert (rerun["path"], rerun["images"], rerun["new"]) == (first.path, 6, 0)
    assert predicted["predictions"][0]["probability"] == pytest.approx(expected, abs=1e-5)
    assert loaded == ["sklearn", "numpy", "h5py", "onnxruntime"]  # no torch, torchvision or timm


def test_extract_without_data_is_a_usage_error():
    from click.testing import CliRunner

    from featx.cli import cli

    result = CliRunner().invoke(cli, ["extract"])
    assert result.exit_code == 2 and "Missing option '--data'" in result.output


def test_input_errors_come_before_heavy_imports(tmp_path):
    """A file that is not a model or a feature cache, an image that does not exist, or a Ray cluster that is
    not there is one line before scikit-learn, torch or Ray is imported (a fraction of a second)."""
    junk, image = tmp_path / "junk.featx", tmp_path / "img.jpg"
    junk.write_text("not a model")
    image.write_bytes(b"")
    not_a_model = f"{junk} is not a featx model file"
    for argv, error in ((["predict", "--model", str(junk), str(image)], not_a_model),
                        (["predict", "--model", str(junk), str(tmp_path / "absent.jpg")], "absent.jpg does not exist"),
                        (["evaluate", "--model", str(junk), "--data", str(tmp_path)], not_a_model),
                        (["fit-head", "--features", str(junk)], f"{junk} is not a featx feature cache"),
                        (["extract", "--data", str(tmp_path), "--engine", "ray", "--address", "127.0.0.1:1"],
                         "cannot reach the Ray cluster at --address 127.0.0.1:1")):
        codes, _, err, loaded = fresh_cli(argv)
        assert codes == [2] and err.count("\n") == 1 and error in err, (argv, err)
        assert not {"torch", "sklearn", "onnxruntime", "ray"} & set(loaded), argv


def test_the_cli_keeps_freed_memory_on_glibc(monkeypatch):
    """glibc takes the thresholds (mallopt returns 1 for each), and every command sets them first."""
    import platform

    from featx import cli, devices

    assert devices.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    cli.main(["datasets"])
    assert calls == [True]
