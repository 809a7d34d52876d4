"""Warm starts: where a fine-tuning head begins, and how it is stored again.

A head starts from a stage-2 model file (logreg/svm folded into one linear layer, or the MLP with
its scaler; left out, the last fit-head's when it fits: ``choose_head``), from rows of the backbone's own
ImageNet classifier, or fresh (Xavier, seed S0's choice).
After training it is exported in the stage-2 array format, so predict and evaluate load fine-tuned
models like any other.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx import provenance
from featx import workspace
from featx.extraction.network import Backbone
from featx.errors import FeatxError
from featx.heads.knn import KNNHead
from featx.heads.mlp import mlp_arrays
from featx.heads.registry import load_head
from featx.modelfile import ModelFile


def fresh_head(net: Backbone, n_classes: int) -> nn.Linear:
    head = nn.Linear(net.spec.feature_dim, n_classes)
    nn.init.xavier_uniform_(head.weight)  # seed S0's Xavier-initialised output layer
    nn.init.zeros_(head.bias)
    return head


def starting_head(head: str | None, net: Backbone, classes: list) -> nn.Module:
    """``--head``: a fit-head model FILE, ``imagenet:ROWS``, or None for a fresh head."""
    if head and str(head).startswith("imagenet:"):
        return head_from_imagenet(str(head), net, classes)
    if head:
        return head_from_model(head, net, classes)
    return fresh_head(net, len(classes))


def head_from_model(path: str, net: Backbone, classes: list) -> nn.Module:
    """A stage-2 head as a torch module from features to logits, the head's own (``torch_logits``): logreg/svm
    as one Linear with standardisation and the svm's Platt sigmoid or temperature folded in, so its probabilities
    are the stage-2 model's, or the MLP with its scaler."""
    model = ModelFile.load(path)
    if model.identity != net.identity():
        raise FeatxError(f"{path} was fitted on features of {model.identity.backbone}:{model.identity.layer} "
                         "with other weights or preprocessing than this backbone: "
                         "fit the head on this backbone's default layer first")
    if model.classes != classes:
        raise FeatxError(f"{path} knows classes {model.classes}, the dataset has {classes}: fit it on this data")
    head = load_head(model.head_arrays, model.head_config)
    if isinstance(head, KNNHead) or len(head.classes_) != len(classes):
        raise FeatxError(f"{path} holds a {model.head_config['kind']} head trained on a subset of the classes: "
                         "warm-start from fit-head --clf logreg or mlp")
    return head.torch_logits()


def imagenet_categories() -> list[str]:
    import torchvision

    return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def head_from_imagenet(rows: str, net: Backbone, classes: list) -> nn.Linear:
    """A head whose rows start as the backbone's own ImageNet classifier rows (seed S0's exercise:
    hotdog is ImageNet class 934). ``rows`` is ``imagenet:`` then one entry per dataset class, in class
    order: an ImageNet index, a category name, or ``-`` for a fresh (Xavier) row."""
    usage = (f"--head {rows}: give one ImageNet class per dataset class ({', '.join(classes)}), as an index, "
             "a category name or - for a fresh row, e.g. imagenet:ant,bee or imagenet:934,-")
    entries = [e.strip() for e in rows.split(":", 1)[1].split(",")]
    if len(entries) != len(classes) or not all(entries):
        raise FeatxError(usage)
    classifier = net.model.get_submodule(net.spec.classifier)
    if not isinstance(classifier, nn.Linear) or classifier.in_features != net.spec.feature_dim:
        raise FeatxError(f"{net.spec.name}'s ImageNet classifier is not one linear layer on its pooled features, "
                         "so it cannot seed a head: use --head FILE from fit-head, or no --head")
    names = [n.lower() for n in imagenet_categories()] if classifier.out_features == 1000 else []
    picked = []
    for entry in entries:
        if entry == "-":
            picked.append(None)
        elif entry.isdigit() and int(entry) < classifier.out_features:
            picked.append(int(entry))
        elif names.count(entry.lower()) == 1:
            picked.append(names.index(entry.lower()))
        else:
            raise FeatxError(f"{usage} ('{entry}' is not an index below {classifier.out_features}"
                             f"{' or a unique ImageNet category name' if names else ''})")
    head = fresh_head(net, len(classes))
    with torch.no_grad():
        for row, source in enumerate(picked):
            if source is not None:
                head.weight[row] = classifier.weight[source]
                head.bias[row] = classifier.bias[source] if classifier.bias is not None else 0.0
    return head


def export_head(head: nn.Module, classes: list) -> tuple[dict, dict]:
    """Arrays and config in the stage-2 head format, so predict/evaluate load fine-tuned models alike."""
    n = len(classes)
    if isinstance(head, nn.Linear):
        d = head.in_features
        arrays = {"mean": np.zeros(d), "scale": np.ones(d), "coef": head.weight.detach().cpu().double().numpy(),
                  "intercept": head.bias.detach().cpu().double().numpy(), "classes": np.arange(n)}
        return arrays, {"kind": "logreg", "selected": {}}
    scaler, mlp = head[0], head[1]
    arrays = {**mlp_arrays(scaler.mean.cpu().numpy(), scaler.scale.cpu().numpy(), mlp.state_dict()),
              "classes": np.arange(n)}
    return arrays, {"kind": "mlp", "selected": {}}


def fine_tune_rows(ds) -> dict:
    """The provenance entries of a fine-tune on ``ds`` (val already carved when there was none)."""
    carved = "+val:" in ds.split_source
    entries = {s: provenance.rows(s, ds.subset(s)[0], "train" if carved and s == "val" else s)
               for s in ds.split_names()}
    return {"trained_on": [entries["train"]], "selected_on": [entries[s] for s in ("val",) if s in entries],
            "held_out": [entries[s] for s in ("test",) if s in entries]}


def seen_rows(model: ModelFile, ds) -> tuple[dict | None, list | None]:
    """(the model's provenance, the splits of ``ds`` it saw that the fine-tune chooses its epoch on)."""
    prov = provenance.of_model(model)
    return prov, provenance.overlap(prov, ds.root, fine_tune_rows(ds)["selected_on"])


def choose_head(head: str | None, net: Backbone, ds, cache_dir, quiet: bool = False) -> str | None:
    """``--head`` as given; ``none`` for a fresh head; left out, the head of the last ``fit-head`` when it
    was fitted on this backbone's pooled features of this data (seed S3 warm-starts its fine-tune from
    its trained top model) and never saw the rows the fine-tune chooses its epoch on (its provenance),
    else a fresh one. A ``--head FILE`` that saw them is refused. The choice is printed either way, unless
    ``quiet`` (the ranks but 0 under torchrun)."""
    if head == "none":
        say("featx: starting from a fresh (Xavier) head (head: none)", quiet)
        return None
    val = "val (carved from train)" if "+val:" in ds.split_source else "val"
    if head is not None:
        if not str(head).startswith("imagenet:") and Path(head).is_file():
            prov, shared = seen_rows(ModelFile.load(head), ds)
            if shared:
                raise FeatxError(f"--head {head} was trained or chose its settings on {', '.join(shared)} images, "
                                 f"and this fine-tune chooses its epoch on {val}, which they include: fit it with "
                                 "--select-on cv on data with a val/ folder, or pass --head none")
            if prov is None:
                say(f"featx: warning: --head {head}: {provenance.UNKNOWN}, so it may have seen the {val} images "
                    "this fine-tune chooses its epoch on", quiet)
        return head
    last = workspace.read(cache_dir).get("fit_head")
    why = "no fit-head ran in this folder"
    if last:
        model = Path(last["model"])
        loaded = ModelFile.load(model) if model.is_file() else None
        same = loaded is not None and loaded.identity == net.identity() and Path(last["data"]) == ds.root
        prov, shared = seen_rows(loaded, ds) if same else (None, [])
        why = (f"the last fit-head's model {model} no longer exists" if loaded is None
               else f"the last fit-head ({model}) is a kNN, which holds no weights to start from" if last["clf"] == "knn"
               else f"the last fit-head ({model}) was fitted on other features or data" if not same
               else f"the last fit-head ({model}) has no provenance record, so it may have seen the {val} images "
                    "this fine-tune chooses its epoch on" if prov is None
               else f"the last fit-head ({model}) was trained or chose its settings on {', '.join(shared)} images, "
                    f"which hold the {val} images this fine-tune chooses its epoch on" if shared else "")
        if not why:
            say(f"featx: starting the head from the last fit-head ({model}, {last['clf']}), as seed S3 does; "
                "--head none starts a fresh one", quiet)
            return str(model)
    say(f"featx: starting from a fresh (Xavier) head: {why}", quiet)
    return None


def say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr)
