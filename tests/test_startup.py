"""The CLI starts fast: importing it (what `featx --help` does) loads none of the heavy libraries."""
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
