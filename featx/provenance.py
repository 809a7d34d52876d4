"""Provenance: which rows a model was trained on, which chose its hyper-parameters, epoch or tap, and which were
left out, so that a later step can tell whether it would select or score on rows the earlier one saw.

A record names rows by split and by the folder they live in (a val carved out of train lives in ``train``), with
their count and a SHA-256 of their sorted relative paths: two steps overlap when they share a folder, and hold the
same rows when the digests match. Model files (``model.featx``'s manifest) and metrics.json carry it; a model file
written before it says "provenance unknown". Every composition point (warm start, ``--exclude``, quantisation,
compare) reads it through this module.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

UNKNOWN = "provenance unknown (a model file written before featx recorded it)"
ROLES = ("trained_on", "selected_on", "left_out", "held_out")


def paths_digest(paths) -> str:
    """SHA-256 of the sorted relative paths, one a line (a file name that is not UTF-8 hashed by its own bytes)."""
    return hashlib.sha256("\n".join(sorted(str(p) for p in paths)).encode("utf-8", "surrogateescape")).hexdigest()


def rows(split: str, paths, folder: str | None = None) -> dict:
    """One named set of rows: its split, the folder its files are in (``folder``, default the split), count, digest."""
    paths = list(paths)
    return {"split": split, "folder": folder or split, "n": len(paths), "sha256": paths_digest(paths)}


def record(data: str | Path, trained_on: list, selected_on: list, left_out: list = (), held_out: list = (),
           **more) -> dict:
    """A provenance record of one model; ``more`` adds context (what chose what, a warm start's own record)."""
    return {"data": str(data), "trained_on": [e for e in trained_on if e["n"]],
            "selected_on": [e for e in selected_on if e["n"]], "left_out": [e for e in left_out if e["n"]],
            "held_out": [e for e in held_out if e["n"]], **more}


def of_model(model) -> dict | None:
    """The record a ``ModelFile`` carries, or None for files written before provenance."""
    return model.info.get("provenance")


def seen(prov: dict) -> list:
    """The rows a model learnt from, in any way: trained on or chose something on (its warm start's too)."""
    inner = seen(prov["warm_start"]) if prov.get("warm_start") else []
    return prov["trained_on"] + prov["selected_on"] + inner


def overlap(prov: dict | None, data: str | Path, entries: list) -> list | None:
    """The folders that both ``entries`` (rows of ``data`` a later step selects or scores on) and what ``prov``'s
    model saw hold; None when ``prov`` is unknown. Other data shares nothing."""
    if prov is None:
        return None
    if Path(prov["data"]).resolve() != Path(data).resolve():
        return []
    folders = {e["folder"] for e in seen(prov)}
    return sorted({e["folder"] for e in entries if e["n"] and e["folder"] in folders})


def describe(prov: dict | None) -> str:
    """One line: trained on ..., chose on ..., left out ...; or ``UNKNOWN``."""
    if prov is None:
        return UNKNOWN

    def names(entries):
        return ", ".join(f"{e['split']}{'' if e['folder'] == e['split'] else ' (from ' + e['folder'] + '/)'} "
                         f"[{e['n']} images, sha256 {e['sha256'][:12]}]" for e in entries) or "nothing"

    text = f"trained on {names(prov['trained_on'])}; chose its settings on {names(prov['selected_on'])}"
    if prov["left_out"]:
        text += f"; left out {names(prov['left_out'])}"
    if prov["held_out"]:
        text += f"; never saw {names(prov['held_out'])}"
    return text
