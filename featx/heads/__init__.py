"""Stage 2: classical heads on cached features, their honest selection, and what is built on them.

One module per head (``logreg``, ``svm``, ``knn``, ``mlp``) on a shared base (``base``; ``linear`` for what logreg
and svm share); ``registry`` makes and loads them. They are imported on first use (PEP 562), so importing a
sibling module stays cheap.
"""
from importlib import import_module

_EXPORTS = {"Head": "base", "LinearHead": "linear", "LogRegHead": "logreg", "SVMHead": "svm", "KNNHead": "knn",
            "MLPHead": "mlp", "make_head": "registry", "load_head": "registry"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
