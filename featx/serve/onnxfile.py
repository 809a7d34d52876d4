"""The exported ONNX file as featx writes and reads it: its format tag, its metadata and the SHA-256 of the
graph that carries them. Export writes through here and prediction reads through here, so neither imports the
other."""
from __future__ import annotations

import hashlib
import os

from featx.errors import FeatxError

FORMAT = "featx-onnx-1"
DIGEST_KEY = "featx_sha256"


def stamp(graph, metadata: dict) -> None:
    """Set ``graph``'s metadata to ``metadata``, then add the digest of the graph carrying it."""
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    graph.metadata_props.add(key=DIGEST_KEY, value=graph_digest(graph))


def graph_digest(graph) -> str:
    """SHA-256 of the serialised graph without its own digest entry."""
    kept = [(p.key, p.value) for p in graph.metadata_props if p.key != DIGEST_KEY]
    copy = type(graph)()
    copy.CopyFrom(graph)
    del copy.metadata_props[:]
    for key, value in kept:
        copy.metadata_props.add(key=key, value=value)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def load_exported(path: str | os.PathLike) -> dict:
    """The metadata of an exported model, its digest checked: a file featx did not write, or one changed since,
    is refused in one line."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise FeatxError(f"{path} is not an ONNX model featx exported: pass a model.onnx from featx export") from None
    meta = {p.key: p.value for p in graph.metadata_props}
    if meta.get("format") != FORMAT:
        raise FeatxError(f"{path} was not written by featx export: pass a model.onnx from featx export")
    if meta.get(DIGEST_KEY) != graph_digest(graph):
        raise FeatxError(f"{path} fails its SHA-256 check (changed since featx exported it): export the model again")
    return meta
