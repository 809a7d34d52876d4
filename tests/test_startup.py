"""The CLI starts fast: importing it (what `featx --help` does) loads none of the heavy libraries."""
import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "timm", "sklearn", "numpy", "h5py", "onnxruntime", "ray", "matplotlib")


def test_the_cli_imports_nothing_heavy():
    code = f"import sys, featx.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"featx.cli imports {loaded} at start-up"


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "featx", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("extract", "fit-head", "finetune", "predict", "evaluate", "compare", "advise", "run"):
        assert f"  {command}" in out


def test_an_up_to_date_extract_loads_no_torch(tmp_path):
    """Re-running an extraction whose cache is current answers from the index: no network, no torch."""
    import featx
    from helpers import make_dataset

    data = make_dataset(tmp_path / "few", {"train": 2})
    first = featx.extract("efficientnet_lite0", str(data), cache_dir=tmp_path / "cache", runtime="torch",
                          progress=False)
    code = ("import sys; from featx.cli import main\n"
            f"try: main(['extract', '--data', {str(data)!r}, '--cache-dir', {str(tmp_path / 'cache')!r}, "
            "'--device', 'cpu', '--json'])\n"
            "except SystemExit: pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rerun = json.loads(done.stdout)
    assert (rerun["path"], rerun["images"], rerun["new"]) == (first.path, 4, 0)
    assert done.stderr.strip() == "numpy,h5py"  # the index is read; torch, torchvision and ONNX Runtime are not
