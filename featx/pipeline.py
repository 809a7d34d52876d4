"""Pipelines: ``featx run PIPELINE.toml`` runs a reference experiment as data — its dataset, backbone, steps and the
seed's own figures — run in order with caches reused, ending in one comparison report.

Schema (unknown keys are errors)::

    name = "S2 hymenoptera"            # required
    description = "..."
    data = "hymenoptera"               # required: registered name or folder
    backbone = "efficientnet_lite0"    # default for every step
    seed_backbone = "resnet18"         # what the seed used, shown beside the results

    [[steps]]
    name = "fixed features + logreg"   # required, unique
    kind = "fit-head"                  # extract | fit-head | finetune | auto (keys: budget, backbones)
    clf = "logreg"
    seed_figure = 0.961                # number or text, e.g. "0.93-0.96"
"""
from __future__ import annotations

import html
import json
import os
import re
import sys
import time
import tomllib
from pathlib import Path

from . import data as data_mod
from featx.report import metrics as report
from featx.report.page import table, write_page
from .errors import FeatxError
from .files import REPORT_BYTES, room

TOP_KEYS = {"name", "description", "data", "backbone", "seed", "seed_backbone", "notes", "steps"}
COMMON = {"name", "kind", "backbone", "layer", "weights", "input_size", "seed_figure", "note"}
STEP_KEYS = {
    "extract": COMMON | {"batch_size", "dtype"},
    "fit-head": COMMON | {"clf", "select_on"},
    "finetune": COMMON | {"unfreeze", "epochs", "batch_size", "lr", "backbone_lr_scale", "optimizer", "schedule",
                          "step_size", "augment", "from_scratch", "patience", "head", "head_from", "seed", "views",
                          "boundary_cache", "boundary_cache_gb"},
    "auto": {"name", "kind", "backbones", "budget", "seed_figure", "note"},  # featx auto: its own backbones and taps
}
REQUIRED = {"extract": set(), "fit-head": {"clf"}, "finetune": {"unfreeze"}, "auto": set()}

# key -> (accepted types, the smallest value for numbers, what to write), for the top level and the steps
TEXT, WHOLE, NUMBER, FLAG = ((str,), None, "text"), ((int,), 1, "a whole number >= 1"), \
    ((int, float), 0, "a number >= 0"), ((bool,), None, "true or false")
TYPES = {**{k: TEXT for k in ("name", "description", "data", "backbone", "seed_backbone", "notes", "kind", "layer",
                              "weights", "note", "dtype", "clf", "select_on", "unfreeze", "optimizer", "schedule",
                              "augment", "head", "head_from", "backbones", "budget")},
         **{k: WHOLE for k in ("input_size", "batch_size", "epochs", "step_size", "patience")},
         "seed": ((int,), 0, "a whole number >= 0"), "lr": ((int, float), 1e-300, "a number > 0"),
         "backbone_lr_scale": NUMBER, "from_scratch": FLAG, "seed_figure": ((int, float, str), None, "a number or text")}


def check_value(where: str, key: str, value) -> None:
    types, low, what = TYPES[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types) or \
            low is not None and not (value >= low and value == value and value != float("inf")):
        raise FeatxError(f"{where}: '{key}' must be {what}, not {value!r}")


# The reference experiments ship inside the package (installed from a wheel) or sit beside it (a checkout).
SHIPPED_FOLDERS = (Path(__file__).parent / "pipelines", Path(__file__).resolve().parents[1] / "pipelines")


def shipped_pipelines() -> dict[str, Path]:
    """Name -> file of the pipelines that come with featx, so ``featx run quickstart`` works anywhere."""
    for folder in SHIPPED_FOLDERS:
        if folder.is_dir():
            return {p.stem: p for p in sorted(folder.glob("*.toml"))}
    return {}


def find_pipeline(path: str | os.PathLike) -> Path:
    """A pipeline file by path, or by the name of a shipped one (``quickstart``, ``s2_hymenoptera``...)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_pipelines()
    if path.suffix in ("", ".toml") and path.parent == Path(".") and path.stem in shipped:
        return shipped[path.stem]
    raise FeatxError(f"pipeline {path} does not exist: pass a TOML file or a shipped pipeline's name "
                     f"({', '.join(shipped) or 'none found'})")


def load_pipeline(path: str | os.PathLike) -> dict:
    """Parse and validate a pipeline file; every error names the file, the step and the fix."""
    path = find_pipeline(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise FeatxError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise FeatxError(f"{path} is not valid TOML ({exc}): fix the syntax") from None
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise FeatxError(f"{path}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("name", "data", "steps"):
        if key not in spec:
            raise FeatxError(f"{path}: missing '{key}'")
    for key in set(spec) - {"steps"}:
        check_value(str(path), key, spec[key])
    if not isinstance(spec["steps"], list) or not spec["steps"] or not all(isinstance(s, dict) for s in spec["steps"]):
        raise FeatxError(f"{path}: 'steps' must be one or more [[steps]] tables, not {spec['steps']!r}")
    names = set()
    for i, step in enumerate(spec["steps"], 1):
        where = f"{path}: step {i} ({step.get('name', 'unnamed')})"
        kind = step.get("kind")
        if kind not in STEP_KEYS:
            raise FeatxError(f"{where}: kind must be one of {', '.join(STEP_KEYS)}, not {kind!r}")
        bad = sorted(set(step) - STEP_KEYS[kind])
        if bad:
            raise FeatxError(f"{where}: unknown key '{bad[0]}' for a {kind} step "
                             f"(allowed: {', '.join(sorted(STEP_KEYS[kind]))})")
        missing = sorted((REQUIRED[kind] | {"name"}) - set(step))
        if missing:
            raise FeatxError(f"{where}: missing '{missing[0]}'")
        for key, value in step.items():
            check_value(where, key, value)
        if step["name"] in names:
            raise FeatxError(f"{where}: the name '{step['name']}' is used twice")
        if step.get("head_from") and step["head_from"] not in names:
            raise FeatxError(f"{where}: head_from '{step['head_from']}' names no earlier step")
        if step.get("head_from") and step.get("head"):
            raise FeatxError(f"{where}: give head (imagenet:ROWS or a model file) or head_from, not both")
        names.add(step["name"])
    return spec


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def run_pipeline(path: str | os.PathLike, *, data_root: str | None = None, cache_dir: str | os.PathLike = "cache",
                 out: str | os.PathLike | None = None, backbone: str | None = None, max_epochs: int | None = None,
                 device: str = "auto", progress: bool = True) -> dict:
    """Run every step; ``backbone`` overrides the file's, ``max_epochs`` caps fine-tuning (both recorded)."""
    from featx.extraction.runner import extract_taps
    from featx.finetuning.training import finetune
    from featx.heads.fit import fit_head

    spec = load_pipeline(path)
    name, folder, _ = data_mod.resolve(spec["data"], data_root, download=False)  # absent data fails here
    out = Path(out or Path("runs") / slug(spec["name"]))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    models = {}
    for step in spec["steps"]:
        net = backbone or step.get("backbone") or spec.get("backbone", "efficientnet_lite0")
        step_out = out / slug(step["name"])
        started = time.perf_counter()
        if progress:
            print(f"featx run: {step['name']} ({step['kind']}, {net})", file=sys.stderr)
        common = {"data_root": data_root, "device": device, "weights": step.get("weights"),
                  "input_size": step.get("input_size"), "progress": progress}
        if step["kind"] == "extract":
            extracted = extract_taps(net, str(folder), step.get("layer"), cache_dir=cache_dir,
                                     batch_size=step.get("batch_size"), dtype=step.get("dtype", "float32"), **common)
            metrics = {"extract": [r.as_dict() for r in extracted]}  # one per tap
        elif step["kind"] == "fit-head":
            metrics = fit_head(step["clf"], None, net, str(folder), step.get("layer"), cache_dir=cache_dir,
                               select_on=step.get("select_on", "cv"), out=step_out, **common)
            models[step["name"]] = metrics["model"]
        elif step["kind"] == "auto":
            from .autosearch import auto

            metrics = auto(str(folder), step.get("budget", "10m"), step.get("backbones"), step_out,
                           data_root=data_root, cache_dir=cache_dir, device=device, progress=progress)
            metrics = {k: v for k, v in metrics.items() if not (k == "test" and v is None)}
            models[step["name"]] = metrics["model"]
            net = metrics["winner"]["name"]
        else:
            epochs = step.get("epochs", 5)
            if max_epochs:
                epochs = min(epochs, max_epochs)
            options = {k: step[k] for k in ("batch_size", "lr", "backbone_lr_scale", "optimizer", "schedule",
                                            "step_size", "augment", "from_scratch", "patience", "seed", "views",
                                            "boundary_cache", "boundary_cache_gb") if k in step}
            # a step without head or head_from starts fresh, as its file says: never from the workspace's last fit-head
            head = models[step["head_from"]] if step.get("head_from") else step.get("head", "none")
            metrics = finetune(net, str(folder), step["unfreeze"], epochs=epochs, out=step_out, head=head,
                               cache_dir=cache_dir, **options, **common)
            metrics["epochs_run"] = epochs
            models[step["name"]] = metrics["model"]
        score_split = "test" if "test" in metrics else "val" if "val" in metrics else None
        rows.append({"step": step["name"], "kind": step["kind"], "backbone": net,
                     "split": report.split_label(score_split, metrics) if score_split else None,
                     "accuracy": metrics[score_split]["accuracy"] if score_split else None,
                     "balanced_accuracy": metrics[score_split]["balanced_accuracy"] if score_split else None,
                     "seed_figure": step.get("seed_figure"), "seconds": round(time.perf_counter() - started, 1),
                     "output": str(step_out) if step["kind"] != "extract" else
                     ", ".join(r["path"] for r in metrics["extract"])})
    result = {"pipeline": spec["name"], "data": name, "seed_backbone": spec.get("seed_backbone"),
              "backbone_override": backbone, "max_epochs": max_epochs, "steps": rows, "report": str(out)}
    with room(out, REPORT_BYTES):
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "comparison.md").write_text(comparison_table(result))
        result["report_page"] = str(write_page(out, {}, f"featx run {spec['name']}",
                                               {"data": name, "seed backbone": spec.get("seed_backbone"),
                                                "backbone override": backbone, "max epochs": max_epochs},
                                               extra=comparison_html(result, out)))
    return result


def comparison_html(result: dict, out: Path) -> str:
    """The comparison table, each step linked to its own report page."""
    rows = []
    for r in result["steps"]:
        row = [html.escape(c) for c in step_cells(r)]
        page = Path(r["output"]) / "report.html"
        if page.is_file() and page.is_relative_to(out):
            row[0] = f'<a href="{html.escape(page.relative_to(out).as_posix())}">{row[0]}</a>'
        rows.append(row)
    return "<h2>Steps</h2>" + table(STEP_COLUMNS, rows, left=3)


STEP_COLUMNS = ["step", "backbone", "split", "accuracy", "balanced accuracy", "seed's figure", "seconds"]


def step_cells(r: dict) -> list:
    """One step's row as text, in ``STEP_COLUMNS`` order."""
    figure = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    return [r["step"], r["backbone"], r["split"] or "-", figure(r["accuracy"]), figure(r["balanced_accuracy"]),
            "-" if r["seed_figure"] is None else str(r["seed_figure"]), str(r["seconds"])]


def comparison_table(result: dict) -> str:
    lines = [f"# {result['pipeline']}", "",
             f"data: {result['data']}; seed backbone: {result['seed_backbone'] or '-'}"
             + (f"; fine-tuning capped at {result['max_epochs']} epochs" if result["max_epochs"] else ""), "",
             "| " + " | ".join(STEP_COLUMNS) + " |", "|---" * len(STEP_COLUMNS) + "|"]
    lines += ["| " + " | ".join(step_cells(r)) + " |" for r in result["steps"]]
    return "\n".join(lines) + "\n"
