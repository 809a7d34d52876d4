"""``featx finetune`` under torchrun: two gloo processes on this machine's CPUs."""
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from featx.finetuning import training as finetuning
from featx.errors import FeatxError
from featx.modelfile import ModelFile
from helpers import REPO, forked_cli, make_dataset

# What torchrun starts in each rank: the tiny network registered, and the check that only rank 0 writes.
CHILD = """
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import helpers
from test_distributed import only_rank_zero_writes
helpers.register_tiny(__import__("pathlib").Path({weights!r}))
only_rank_zero_writes()
from featx.cli import main
main(sys.argv[1:])
"""


def only_rank_zero_writes():
    """In every rank but 0, anything that writes a run's files fails the process."""
    from featx.report import metrics as report

    if os.environ.get("RANK", "0") != "0":
        def forbidden(*args, **kwargs):
            raise AssertionError("only rank 0 writes")
        finetuning.save_checkpoint = finetuning.save_finetuned = finetuning.write_history = forbidden
        report.write_report = forbidden


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_args(data, out, batch_size):
    """The command each rank runs; ``in_process`` is the same run as ``finetuning.finetune`` arguments."""
    return ["finetune", "--backbone", "tiny", "--data", str(data), "--unfreeze", "none", "--head", "none",
            "--epochs", "2", "--batch-size", str(batch_size), "--augment", "none", "--no-shuffle", "--device", "cpu",
            "--workers", "0", "--out", str(out), "--quiet", "--json"]


def in_process(out, batch_size, **kw):
    return {"unfreeze": "none", "head": "none", "batch_size": batch_size, "augment": "none", "shuffle": False,
            "device": "cpu", "workers": 0, "out": out, "progress": False, **kw}


@pytest.fixture
def child(tiny_weights, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO / "tests"), here=str(Path(__file__).parent), weights=str(tiny_weights)))
    return script


def test_two_processes_equal_one_at_twice_the_batch(tiny, tiny_weights, tmp_path):
    """The two ranks are forked from this process, with the variables torchrun would set."""
    data = make_dataset(tmp_path / "d", {"train": 16, "val": 4})
    port, outputs = free_port(), [tmp_path / f"rank{r}.out" for r in (0, 1)]
    ranks = [forked_cli(finetune_args(data, tmp_path / "ddp", 4), tiny_weights, stdout=outputs[r],
                        before=only_rank_zero_writes,
                        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
                             "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for p in ranks:
        p.join(240)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert outputs[1].read_text() == "", "rank 1 prints nothing: rank 0 speaks for the run"
    ddp = json.loads(outputs[0].read_text())
    assert (ddp["processes"], ddp["global_batch_size"]) == (2, 8)
    assert [h["epoch"] for h in ddp["history"]] == [1, 2]
    single = finetuning.finetune(tiny, str(data), epochs=2, **in_process(tmp_path / "one", 8))
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [h[key] for h in ddp["history"]] == pytest.approx([h[key] for h in single["history"]], abs=1e-5)
    ours, theirs = ModelFile.load(ddp["model"]), ModelFile.load(single["model"])
    for name, array in theirs.head_arrays.items():
        np.testing.assert_allclose(ours.head_arrays[name], array, atol=1e-5)


def torchrun(argv: list, stdout: Path, stderr: Path) -> None:
    """torchrun's own entry point (``python -m torch.distributed.run``) in a forked copy of this process, whose
    torch is already imported; the ranks it starts are fresh interpreters, as under torchrun anywhere. Its
    output and its ranks' (inherited) go to ``stdout`` and ``stderr``."""
    from torch.distributed.run import main

    os.environ["OMP_NUM_THREADS"] = "1"
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    main(argv)


def test_torchrun_with_an_undecodable_batch_finishes(child, tiny, tmp_path):
    """One training image is not an image: with a batch of one, a process meets a batch with nothing to
    train on and skips it while the other trains; ``join`` keeps them in step (a bare skip would hang)."""
    data = make_dataset(tmp_path / "d", {"train": 5, "val": 2})
    (data / "train" / "a" / "broken.jpg").write_text("not an image")
    out, stdout, stderr = tmp_path / "run", tmp_path / "torchrun.out", tmp_path / "torchrun.err"
    launcher = multiprocessing.get_context("fork").Process(target=torchrun, args=(
        ["--standalone", "--nproc-per-node", "2", str(child), *finetune_args(data, out, 1)], stdout, stderr))
    launcher.start()
    launcher.join(240)
    if launcher.is_alive():  # past the time limit: the launcher takes its ranks down with it
        launcher.terminate()
        launcher.join(30)
    assert launcher.exitcode == 0, stderr.read_text()[-3000:]
    result = json.loads(stdout.read_text().strip().splitlines()[-1])
    assert result["processes"] == 2 and [h["epoch"] for h in result["history"]] == [1, 2]
    assert len((out / "history.csv").read_text().strip().splitlines()) == 3
    assert (out / "checkpoint.pt").is_file() and (out / "model.featx").is_file()
    # the checkpoint holds the plain network, so one process resumes what two began
    resumed = finetuning.finetune(tiny, str(data), epochs=3, resume=True, **in_process(out, 1))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3] and resumed["processes"] == 1
    assert resumed["history"][:2] == result["history"]


def test_a_restarted_torchrun_worker_resumes_by_itself(tiny, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", {"train": 6, "val": 2})
    kw = dict(unfreeze="block2", batch_size=4, out=tmp_path / "run", workers=0, progress=False, device="cpu")
    first = finetuning.finetune(tiny, str(data), epochs=1, **kw)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets when it restarts a worker
    again = finetuning.finetune(tiny, str(data), epochs=2, **kw)  # no --resume: the restart implies it
    assert [h["epoch"] for h in again["history"]] == [1, 2]
    assert again["history"][0] == first["history"][0]


def fail_validation_on_rank_zero():
    """Rank 0's validation fails (an injected fault), after training went through both ranks."""
    only_rank_zero_writes()
    if os.environ.get("RANK") == "0":
        real = finetuning.run_epoch

        def failing(net, batches, labels, device, optimizer=None, **kw):
            if optimizer is None:
                raise FeatxError("validation failed (injected)")
            return real(net, batches, labels, device, optimizer, **kw)
        finetuning.run_epoch = failing


@pytest.mark.parametrize("fault", ["full disk at saving", "failure at validation"])
def test_rank_zeros_failure_stops_every_rank_with_one_line(tiny, tiny_weights, tmp_path, request, fault):
    data = make_dataset(tmp_path / "d", {"train": 8, "val": 2})
    out, hook = tmp_path / "ddp", fail_validation_on_rank_zero
    if fault == "full disk at saving":
        disk = request.getfixturevalue("tiny_disk")
        (disk / "filler").write_bytes(b"\0" * ((1 << 20) - 64 * 1024))
        out, hook = disk / "ddp", only_rank_zero_writes
    port, errors = free_port(), [tmp_path / f"rank{r}.err" for r in (0, 1)]
    started = time.monotonic()
    ranks = [forked_cli(finetune_args(data, out, 4), tiny_weights, before=hook, stderr=errors[r],
                        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
                             "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for p in ranks:
        p.join(60)
    assert time.monotonic() - started < 30 and [p.exitcode for p in ranks] == [2, 2]
    said = errors[0].read_text()
    expected = f"featx: error: no room in {out}" if fault.startswith("full") else \
        "featx: error: validation failed (injected)"
    errors_said = [line for line in said.splitlines() if "error" in line.lower()]
    assert len(errors_said) == 1 and errors_said[0].startswith(expected) and "Traceback" not in said, said
    assert errors[1].read_text() == "", "rank 1 exits quietly: rank 0 said why"
