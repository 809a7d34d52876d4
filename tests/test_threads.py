"""featx.threads: one policy for the threads of every head's fits."""
import threading

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from featx import threads
from featx import heads


def blas_threads() -> int:
    return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def test_small_fits_take_one_thread_large_ones_every_available(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.available() == 3
    assert threads.for_fit("svm", 400, 1280, 2) == 1
    assert threads.for_fit("logreg", 10**6, 2048, 100) == 3  # OMP_NUM_THREADS caps the total
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.for_fit("mlp", 10**6, 2048, 512) == 1


def test_limited_holds_blas_and_torch_and_restores_them():
    before = torch.get_num_threads(), blas_threads()
    with threads.limited(2):
        assert torch.get_num_threads() == 2 and blas_threads() == 2
    assert (torch.get_num_threads(), blas_threads()) == before


def test_the_libraries_are_looked_up_again_only_after_an_import(monkeypatch):
    """threadpoolctl's scan is kept while nothing new is imported, and redone after an import (which is what
    loads a BLAS or OpenMP library), so a library loaded later is still held."""
    import sys

    first = threads._controller()
    assert threads._controller() is first
    monkeypatch.setitem(sys.modules, "featx_test_new_module", object())  # stands in for a new import
    again = threads._controller()
    assert again is not first and threads._controller() is again
    before = blas_threads()
    with threads.limited(2):  # conftest holds every test process at one thread: two shows the limit is applied
        assert blas_threads() == 2
    assert blas_threads() == before


def test_side_by_side_keeps_order_runs_in_parallel_and_one_thread_each(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen, both = [], threading.Barrier(2, timeout=10)  # the barrier passes only if two items run at once

    def work(item):
        both.wait()
        seen.append((torch.get_num_threads(), blas_threads()))
        return item * 2

    assert threads.side_by_side(work, [1, 2]) == [2, 4]
    assert seen == [(1, 1), (1, 1)]


@pytest.mark.parametrize("clf", ["logreg", "svm", "knn"])
def test_folds_side_by_side_give_the_folds_in_turn(monkeypatch, clf):
    """The selection is the same whether the folds run on one thread in turn or side by side on two."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(90, 12)) + np.repeat(np.eye(3, 12) * 2, 30, axis=0)).astype(np.float32)
    y = np.repeat(np.arange(3), 30)
    fitted = {}
    for cores in ("1", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", cores)
        fitted[cores] = heads.make_head(clf, device="cpu").fit(X, y)
    one, two = fitted["1"].selected_, fitted["2"].selected_
    assert one.get("C", one.get("k")) == two.get("C", two.get("k")) and one["cv_accuracy"] == two["cv_accuracy"]
    np.testing.assert_allclose(fitted["1"].predict_proba(X), fitted["2"].predict_proba(X), atol=1e-6)
