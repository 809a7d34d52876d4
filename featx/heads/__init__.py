"""Stage 2: classical heads on cached features, their honest selection, and what is built on them.

The estimators are imported on first use (PEP 562), so importing a sibling module stays cheap.
"""
from importlib import import_module

_EXPORTS = {"Head": "estimators", "LinearHead": "estimators", "KNNHead": "estimators", "MLPHead": "estimators",
            "make_head": "estimators", "load_head": "estimators"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
