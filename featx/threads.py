"""Threads: one policy for how many BLAS, OpenMP and torch threads a head's fits use.

A small fit spends its time in small matrix products and short vectors, where a second thread costs more
than it gives, and where two threads fight any other process on the machine: scikit-learn's
``LogisticRegression`` on 763 x 1,280 took 0.65 s on one BLAS thread and 6.5 s on two beside a busy core;
one MLP fit, 4 s on one torch thread and 26-37 s on two. So:

- a single fit smaller than ``SMALL_FIT`` (rows x features x classes; ``benchmarks/heads_speed.py
  --threshold`` measures one thread against all) runs on one thread; a larger one on every thread available;
- independent fits (cross-validation folds, grid points) run side by side, one thread each, up to that many;
- ``OMP_NUM_THREADS`` caps the total (``devices.cpu_threads``), so jobs sharing a machine can each keep to
  their share.

Every head's ``fit`` goes through here, so ``fit-head``, ``compare``, ``advise``, ``audit``, ``--layer auto``
and the scikit-learn ``Head`` objects share it.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

from .devices import cpu_threads

# rows x features x classes (the MLP: x hidden units) below which a fit runs on one thread. On 2 shared
# cores a second thread started to pay at about 6e8 (logreg) and 1e8 (svm), not clearly for the MLP; beside a
# busy process it costs several times what it gains, so the line is above those (BENCHMARKS.md, "Stage 2 —
# one fit on one thread or on every core"). kNN has no single fit to size: its folds run side by side.
SMALL_FIT = {"logreg": 2e9, "svm": 2e9, "mlp": 2e9}


def available() -> int:
    """Threads this process may use in all: ``OMP_NUM_THREADS`` when set, else its cores."""
    return cpu_threads()


def for_fit(kind: str, rows: int, features: int, width: int) -> int:
    """Threads for one fit of a ``kind`` head on rows x features, ``width`` classes (the MLP: hidden units):
    one when it is small, else all that are available."""
    return 1 if rows * features * max(width, 1) < SMALL_FIT[kind] else available()


@contextmanager
def limited(threads: int, uses_torch: bool = False):
    """BLAS and OpenMP (threadpoolctl) and torch held to ``threads`` inside the block, restored after; torch
    is imported first when the block ``uses_torch``, else limited only if something imported it already."""
    torch = _torch(uses_torch)
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(threads)
    try:
        with _controller().limit(limits=threads):
            yield
    finally:
        if torch:
            torch.set_num_threads(before)


def side_by_side(function, items: list) -> list:
    """``function`` over independent ``items`` (folds, grid points), in order, up to ``available()`` at a
    time, each on one thread; BLAS and torch's kernels release the GIL, so threads run them in parallel (the
    svm's L-BFGS-B bookkeeping holds it, but its time goes to the matrix products of its objective)."""
    workers = min(len(items), available())
    with limited(1):
        if workers <= 1:
            return [function(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, initializer=_one_openmp_thread) as pool:
            return list(pool.map(function, items))


_found: list = [None, -1]  # (threadpoolctl's controller, len(sys.modules) when it looked)


def _controller():
    """threadpoolctl's view of the BLAS and OpenMP libraries loaded, found again whenever the count of imported
    modules has changed (Python packages load their libraries on import; one loaded through ctypes alone is
    not noticed until the next import): finding them walks every loaded library, 3 ms, where a small fit takes
    a few ms itself. The count is read before the walk, so an import during it is looked at again."""
    modules = len(sys.modules)
    if _found[1] != modules:
        from threadpoolctl import ThreadpoolController

        _found[0] = ThreadpoolController()
        _found[1] = modules
    return _found[0]


def _one_openmp_thread() -> None:
    """OpenMP's thread count belongs to the calling thread (BLAS's to the process): each worker sets its own."""
    if torch := _torch(False):
        torch.set_num_threads(1)
    _controller().limit(limits=1, user_api="openmp")  # the worker ends with the pool, so nothing to restore


def _torch(uses_torch: bool):
    """torch, imported when asked for, else only if something already did (None then)."""
    if uses_torch:
        import torch

        return torch
    return sys.modules.get("torch")
