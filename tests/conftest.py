import os
import sys
from pathlib import Path

import pytest

from featx.devices import keep_freed_memory

# One BLAS / OpenMP / torch thread per test process, set before numpy or torch load: the README's command runs
# one pytest-xdist worker per core, and tiny fits are slower on two threads anyway (featx.threads). Subprocesses
# (the CLI, torchrun, Ray's workers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
keep_freed_memory()  # as the CLI does, since most tests call the API in this process

sys.path.insert(0, str(Path(__file__).parent))  # the test modules import helpers (torch, featx) themselves:
# pytest-xdist's controlling process loads this file too, and starts its workers sooner without them


# The longest test files, longest first: pytest-xdist hands whole files to its workers in collection order, so
# starting these first keeps one worker from finishing a long file alone at the end.
LONGEST_FIRST = ("test_ray_engine.py", "test_integration.py", "test_integration_cats_dogs.py", "test_few_shot.py",
                 "test_distributed.py", "test_finetune.py", "test_integration_advice.py", "test_audit.py",
                 "test_integrity.py", "test_contract.py", "test_auto.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first; gpu-marked tests run where torch sees CUDA and skip cleanly elsewhere."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run them on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def in_own_folder(tmp_path_factory, monkeypatch):
    """Each test runs in a folder of its own, so what commands write by default (cache/, runs/) never lands in
    the checkout or leaks into another test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    import helpers

    return helpers.save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture(scope="session")
def tiny(tiny_weights):
    """Name of a tiny registered backbone whose weights load from a local file."""
    import helpers

    return helpers.register_tiny(tiny_weights).name


@pytest.fixture
def one_torch_thread():
    """torch on one thread here, as in a forked child (``helpers.forked_cli``), so numbers compared across
    the two are computed alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local two-CPU Ray cluster for the whole test run (starting one costs seconds): one embedding actor
    on one thread, one CPU left for the read tasks. Its workers inherit this environment, so they can import
    the tests' helpers (the tiny network's class). Yields its address."""
    import helpers

    ray = pytest.importorskip("ray", reason="the Ray engine is an extra: pip install -e '.[ray]' (.ci/run installs it)")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(helpers.REPO / "tests"), saved]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture
def dataset(tmp_path):
    import helpers

    return helpers.make_dataset(tmp_path / "colours")


@pytest.fixture
def shared_data():
    import helpers

    if not (helpers.SHARED_DATA / "hymenoptera").is_dir():
        pytest.fail(f"real test images are missing: expected {helpers.SHARED_DATA}/hymenoptera beside the checkout")
    return helpers.SHARED_DATA


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only, as CI runs), unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)
