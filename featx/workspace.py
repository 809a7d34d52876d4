"""The workspace: what a project folder remembers between commands, in ``cache/workspace.json``.

``featx extract`` records the last successful extraction and ``featx fit-head`` the last fitted head,
so the commands users start from work as typed, one after the other, in one folder::

    featx extract --backbone vgg16 --data cats_dogs
    featx fit-head --clf svm
    featx finetune --unfreeze block4,block5

Whatever a later command leaves out comes from the record, and it says so in one line on stderr.
Explicit options always win.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import FeatxError
from .files import atomic_write

STATE = "workspace.json"
DEFAULT_BACKBONE = "efficientnet_lite0"
REMEMBERED = ("backbone", "data", "layer", "input_size", "precision", "weights", "tta")
OPTIONAL = (str, type(None))
SHAPE = {  # entry -> key -> (the types it may have, whether it must be there), as ``record`` writes them
    "extract": {"backbone": (str, True), "data": (str, True), "dataset": (str, True), "layer": (OPTIONAL, False),
                "input_size": ((int, type(None)), False), "precision": (OPTIONAL, False), "tta": (OPTIONAL, False),
                "weights": (OPTIONAL, False), "path": (OPTIONAL, False)},
    "fit_head": {"model": (str, True), "clf": (str, True), "backbone": (OPTIONAL, False), "layer": (OPTIONAL, False),
                 "data": (str, True)},
}


def state_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / STATE


def read(cache_dir: str | os.PathLike) -> dict:
    """The record, checked to have the shape ``record`` writes: anything else is one line."""
    path = state_path(cache_dir)
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        raise FeatxError(f"{path} is not readable JSON: delete it (featx writes it again at the next extract)") from None
    problem = shape_problem(state)
    if problem:
        raise FeatxError(f"{path} is not a record featx wrote ({problem}): delete it (featx writes it again at the "
                         "next extract)")
    return state


def shape_problem(state) -> str | None:
    """What in a parsed workspace.json differs from what ``record`` writes (None when nothing does)."""
    if not isinstance(state, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(state), "a number")
        return f"{kind}, not an object"
    for entry, keys in SHAPE.items():
        value = state.get(entry)
        if value is None:
            continue
        if not isinstance(value, dict):
            return f"its {entry} is not an object"
        for key, (types, required) in keys.items():
            if key not in value and required or key in value and (
                    not isinstance(value[key], types) or isinstance(value[key], bool)):
                return f"its {entry}.{key} is {json.dumps(value.get(key))[:40] if key in value else 'missing'}"
    return None


def record(cache_dir: str | os.PathLike, key: str, entry: dict) -> None:
    """Remember ``entry`` as the last ``key`` (``extract`` or ``fit_head``); a folder featx cannot write
    to keeps its old record, since remembering is a convenience, never a reason to fail."""
    try:
        state = {**read(cache_dir), key: entry}
    except FeatxError:  # a damaged record is replaced by this one
        state = {key: entry}
    try:
        with atomic_write(state_path(cache_dir)) as tmp:
            tmp.write_text(json.dumps(state, indent=2, default=str))
    except OSError:
        pass


def fill(cache_dir: str | os.PathLike, command: str, **given) -> dict:
    """``given`` with what the user left out (None) taken from the last extraction, when the user left out
    the backbone or the data: those two, and the layer, input size, precision, weights and tta when the backbone
    and data are the recorded ones. A command given both backbone and data is explicit and reads no record.
    Without a record, the data must be given; the backbone then defaults to efficientnet_lite0."""
    if all(given.get(k) is not None for k in ("backbone", "data") if k in given):
        return given
    last = read(cache_dir).get("extract")
    if last is None:
        if given.get("data") is None:
            raise FeatxError(f"{command} needs --data, and {cache_dir}/ holds no earlier extraction: run "
                             "'featx extract --backbone NAME --data FOLDER' first, or pass --data")
        return {**given, "backbone": given.get("backbone") or DEFAULT_BACKBONE}
    filled = dict(given)
    taken = [k for k in ("backbone", "data") if k in given and given[k] is None]
    for key in taken:
        filled[key] = last[key]
    same_data = "data" in taken or str(filled["data"]) in (last["data"], last["dataset"]) or \
        Path(filled["data"]).expanduser().resolve() == Path(last["data"])
    if filled.get("backbone", last["backbone"]) == last["backbone"] and same_data:
        more = [k for k in REMEMBERED[2:] if k in given and given[k] is None and last.get(k) is not None]
        filled |= {k: last[k] for k in more}
        taken += more
    if taken:
        shown = {**{k: filled[k] for k in taken}, **({"data": last["dataset"]} if "data" in taken else {})}
        print(f"featx: using {' · '.join(f'{k} {v}' for k, v in shown.items())} from the last extract "
              f"({state_path(cache_dir)})", file=sys.stderr)
    return filled


def last_model(cache_dir: str | os.PathLike) -> str:
    """The model file of this folder's last fit-head (or ``featx auto`` winner), for commands given no --model."""
    last = read(cache_dir).get("fit_head")
    if not last:
        raise FeatxError("no --model given and no fit-head or auto ran in this folder: pass --model FILE")
    if not Path(last["model"]).is_file():
        raise FeatxError(f"the last fit-head's model {last['model']} no longer exists: pass --model FILE")
    return last["model"]
