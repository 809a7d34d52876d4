"""The ``featx`` command: a thin click layer over the Python API. Errors print as one line."""
from __future__ import annotations

import json
import sys

import click

from .devices import keep_freed_memory
from .errors import FeatxError
from .workspace import DEFAULT_BACKBONE


def emit(result: dict, as_json: bool, text: str) -> None:
    """One JSON object on stdout with --json, else a human summary."""
    click.echo(json.dumps(result, indent=None, default=str) if as_json else text)


def check_data(data: str | None, data_root: str | None) -> None:
    """A wrong --data is reported before torch is imported: in a fraction of a second, not five."""
    if data is not None:
        from .data import resolve

        resolve(data, data_root)


def data_options(required: bool = True):
    """--data and --data-root; a later stage may leave --data out and take the last extract's."""
    def add(f):
        f = click.option("--data-root", type=click.Path(file_okay=False),
                         help="Folder holding registered datasets (default: $FEATX_DATA, else a per-user folder).")(f)
        default = "" if required else "; default: the last extract's"
        return click.option("--data", required=required, help="Dataset folder, or a registered name "
                            f"(see 'featx datasets'){default}.")(f)
    return add


def backbone_options(f):
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None,
                     help="auto (the default): fp32 on a CPU; on CUDA bf16 where the GPU supports it, else fp16.")(f)
    f = click.option("--input-size", type=click.IntRange(1), default=None,
                     help="Resize the shorter side to N and centre-crop N instead of the weights' own size.")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local state dict FILE to use instead of the registered pretrained weights.")(f)
    f = click.option("--layer", default=None, help="Feature tap, several (block5,block6,pool: one pass), or auto (the "
                     "family's last blocks and pool); default: pooled penultimate. See 'featx backbones'.")(f)
    f = click.option("--backbone", default=None, help="Registered backbone or timm:<name> (default: extract "
                     "efficientnet_lite0; later stages, the last extract's).")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featx")
def cli():
    """Transfer learning on small image datasets: extract cached features, fit heads, fine-tune."""


@cli.command()
@backbone_options
@data_options()
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Default: 32 on CPU, 128 on CUDA.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Decoding processes (default: by device).")
@click.option("--decode", type=click.Choice(["pil", "device"]), default="pil", show_default=True,
              help="Decode JPEGs in the CPU workers, or in batches on the device (nvjpeg on CUDA).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="Where the network runs: auto is ONNX Runtime on a CPU (exported once into cache/onnx), torch on CUDA.")
@click.option("--verify", type=click.Choice(["stat", "content"]), default="stat", show_default=True,
              help="How a file is known unchanged: size, times and inode (stat), or a hash of its bytes (content).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--checkpoint-rows", default=1024, show_default=True, type=click.IntRange(1),
              help="Rows kept in memory before they are written durably (also every 15 s).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: store the mean of each image's and its mirror's features (a cache of its own).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Compute here, or on a Ray Data cluster (pip install -e '.[ray]'); this process writes the cache.")
@click.option("--address", default=None, help="--engine ray: auto, HOST:PORT or ray://HOST:PORT (default: a local "
              "cluster started for this run).")
@click.option("--actors", default=None, type=click.IntRange(1), help="--engine ray: embedding actors (default: one "
              "per --gpus-per-actor GPUs, or one per two CPUs).")
@click.option("--gpus-per-actor", default=0.0, type=click.FloatRange(0), show_default=True,
              help="--engine ray: GPUs each embedding actor reserves (0: actors run on CPUs).")
@click.option("--exclude", type=click.Path(dir_okay=False), default=None,
              help="A FILE of paths (one a line, as 'featx audit --write-exclude' writes) to leave out of the cache.")
def extract(backbone, layer, weights, input_size, precision, data, data_root, cache_dir, device, batch_size, workers, decode,
            dtype, runtime, verify, as_json, checkpoint_rows, quiet, tta, engine, address, actors, gpus_per_actor,
            exclude):
    """Cache a dataset's features from a frozen pretrained backbone (incremental, resumable)."""
    check_data(data, data_root)
    from .data import read_exclude
    from featx.extraction.runner import extract_taps
    from featx.report.summary import extract_messages, extract_text

    results = extract_taps(backbone or DEFAULT_BACKBONE, data, layer, data_root=data_root, cache_dir=cache_dir,
                           device=device, batch_size=batch_size, workers=workers, decode=decode, dtype=dtype,
                           weights=weights, input_size=input_size, precision=precision or "auto", verify=verify,
                           runtime=runtime, checkpoint_rows=checkpoint_rows, progress=not quiet, engine=engine,
                           address=address, actors=actors, gpus_per_actor=gpus_per_actor, tta=tta,
                           exclude=read_exclude(exclude))
    for message in extract_messages(results):
        click.echo(message, err=True)
    emit(results[0].as_dict() if len(results) == 1 else {"layers": [r.as_dict() for r in results]}, as_json,
         extract_text(results))


@cli.command("fit-head")
@click.option("--clf", type=click.Choice(["svm", "logreg", "knn", "mlp"]), default="logreg", show_default=True)
@click.option("--features", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="A featx feature cache (.h5); given several times, the taps to choose between.")
@backbone_options
@click.option("--data", default=None, help="Dataset folder or registered name (extracts if not cached; default: "
              "the last extract's).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--select-on", type=click.Choice(["cv", "val"]), default="cv", show_default=True,
              help="Choose C / k / MLP epochs by cross-validation on train, or on val (then refit on train+val, "
                   "report test only).")
@click.option("--C", "C", type=float, default=None, help="Fix logreg/svm's C instead of selecting it.")
@click.option("--k", "k", type=click.IntRange(1), default=None, help="Fix knn's k instead of selecting it.")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
              help="Weigh each class's loss by n / (classes x its images), for imbalanced classes.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default=None,
              help="Features with flip test-time augmentation or without (default: the last extract's).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/<dataset>__<backbone>__<layer>__<clf>).")
@click.option("--device", default="auto", show_default=True)
@click.option("--exclude", type=click.Path(dir_okay=False), default=None,
              help="A FILE of paths (one a line, relative to the data folder as 'featx audit --write-exclude' "
                   "writes them, or absolute) left out of training; val and test are scored in full.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics object on stdout.")
@click.option("--quiet", is_flag=True)
def fit_head(clf, features, backbone, layer, weights, input_size, precision, data, data_root, cache_dir, select_on, C, k,
             class_weight, tta, out, device, exclude, as_json, quiet):
    """Fit an svm / logreg / knn / mlp head on cached features, with leak-free model selection."""
    check_data(None if features else data, data_root)
    for file in features:  # a wrong file is one line before scikit-learn and torch are imported
        from featx.extraction.store import check_file

        check_file(file)
    from .data import read_exclude
    from featx.heads.fit import fit_head as run_fit_head
    from featx.report.summary import fit_head_text

    m = run_fit_head(clf, list(features) or None, backbone, data, layer, data_root=data_root, cache_dir=cache_dir,
                     select_on=select_on, out=out, device=device, weights=weights, input_size=input_size,
                     precision=precision, C=C, k=k, class_weight=class_weight, tta=tta, progress=not quiet,
                     exclude=read_exclude(exclude))
    emit(m, as_json, fit_head_text(clf, m))


@cli.command()
@click.option("--model", default=None, type=click.Path(exists=True, dir_okay=False),
              help="model.featx from fit-head/finetune/auto, or model.onnx (default: this folder's last fit-head "
                   "or auto winner).")
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG grid of titled images.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="The --weights FILE the model's features were extracted with, if any.")
@click.option("--device", default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="Where the ONNX export of the backbone is kept.")
@click.option("--json", "as_json", is_flag=True)
def predict(model, images, top_k, plot, weights, device, runtime, cache_dir, as_json):
    """Label and probability for image files or folders."""
    from featx.report.summary import prediction_line
    from featx.serve.predictor import predict as run_predict, recorded_provenance

    if model is None:
        from .workspace import last_model

        model = last_model(cache_dir)
        click.echo(f"featx: using the last fitted model {model} (--model FILE picks another)", err=True)
    results = run_predict(model, list(images), top_k=top_k, device=device, weights=weights, plot=plot,
                          runtime=runtime, cache_dir=cache_dir)
    if as_json:
        emit({"predictions": results, "plot": plot, "provenance": recorded_provenance(model)}, True, "")
    for r in results:
        if "error" in r or not as_json:
            click.echo(prediction_line(r), err="error" in r)
    if all("error" in r for r in results):
        raise FeatxError(f"none of the {len(results)} inputs could be predicted: pass image files")


@cli.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@data_options(required=False)
@click.option("--split", default="test", show_default=True)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None)
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def evaluate(model, data, data_root, split, cache_dir, out, weights, device, runtime, as_json, quiet):
    """Metrics, confusion matrix and top losses of a model on a split of any dataset."""
    check_data(data, data_root)
    from featx.report.summary import evaluate_text
    from featx.serve.predictor import evaluate as run_evaluate

    m = run_evaluate(model, data, split, data_root=data_root, cache_dir=cache_dir, out=out, device=device,
                     weights=weights, runtime=runtime, progress=not quiet)
    emit(m, as_json, evaluate_text(split, m))


@cli.command()
@backbone_options
@data_options(required=False)
@click.option("--unfreeze", required=True, help="Comma-separated blocks (see 'featx backbones'), top:N (the last N), all, or none.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
              help="Images a step; under torchrun, per process.")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="A seeded new order of the training images every epoch.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Head learning rate.")
@click.option("--backbone-lr-scale", default=0.1, show_default=True, type=float,
              help="Unfrozen blocks learn at lr x this (discriminative learning rates).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True)
@click.option("--step-size", default=7, show_default=True, type=click.IntRange(1), help="Epochs per step (step).")
@click.option("--augment", type=click.Choice(["none", "light", "strong"]), default="light", show_default=True)
@click.option("--views", default=None, type=click.IntRange(1),
              help="With --augment light|strong: augmented views of each training image kept in the boundary "
                   "cache (default 2); epoch e trains on view e mod V.")
@click.option("--boundary-cache/--no-boundary-cache", default=True, show_default=True,
              help="Run the frozen part below the unfrozen blocks once per image and view, not every epoch.")
@click.option("--boundary-cache-gb", default=None, type=click.FloatRange(0),
              help="Most disk the boundary cache may take (default 4; never more than is free): above it, fewer "
                   "views, or no cache.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="What runs the frozen part for the boundary cache (auto: ONNX Runtime on a CPU at fp32).")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
              help="Weigh each class's loss by n / (classes x its images), for imbalanced classes.")
@click.option("--head", default=None,
              help="Start the head from a fit-head model FILE (logreg/svm/mlp) on this backbone, from ImageNet "
                   "classifier rows: imagenet:ROW,... one per class (index, name or - for fresh), e.g. imagenet:ant,bee, "
                   "or 'none' for a fresh head. Default: the last fit-head's head when it fits, else fresh.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="The project's cache folder, whose record of the last extract and fit-head fills what is left out.")
@click.option("--from-scratch", is_flag=True, help="Random initialisation, everything trainable.")
@click.option("--patience", type=click.IntRange(1), default=None, help="Stop after N epochs without val gain.")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without a val/ folder, this share of train (by path hash, stable) chooses the epoch.")
@click.option("--resume", is_flag=True, help="Continue the run in --out after a kill.")
@click.option("--out", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=None, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def finetune(backbone, layer, weights, input_size, precision, data, data_root, unfreeze, epochs, batch_size, shuffle, lr,
             backbone_lr_scale, optimizer, schedule, step_size, augment, views, boundary_cache, boundary_cache_gb,
             runtime, class_weight, head, cache_dir, from_scratch, patience,
             val_fraction, resume, out, device, workers, seed, as_json, quiet):
    """Fine-tune named top blocks (or all, or none) of a pretrained backbone with a new or staged head."""
    check_data(data, data_root)
    from featx.finetuning.training import finetune as run_finetune
    from featx.report.summary import finetune_text

    if layer:
        raise click.UsageError("finetune trains on the backbone's pooled features; --layer does not apply")
    m = run_finetune(backbone, data, unfreeze, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
                     backbone_lr_scale=backbone_lr_scale, optimizer=optimizer, schedule=schedule,
                     step_size=step_size, augment=augment, head=head, from_scratch=from_scratch, patience=patience,
                     resume=resume, out=out, device=device, workers=workers, weights=weights, input_size=input_size,
                     precision=precision, val_fraction=val_fraction, seed=seed, cache_dir=cache_dir,
                     progress=not quiet, shuffle=shuffle, class_weight=class_weight, views=views,
                     boundary_cache=boundary_cache, boundary_cache_gb=boundary_cache_gb, runtime=runtime)
    if "rank" in m:  # under torchrun, rank 0 speaks for every process
        return
    for note in m["notes"]:
        click.echo(f"featx: note: {note}", err=True)
    emit(m, as_json, finetune_text(m, batch_size))


@cli.command()
@data_options()
@click.option("--backbones", required=True, help="Comma-separated backbones, e.g. efficientnet_lite0,efficientnet_lite2.")
@click.option("--layers", default=None, help="Comma-separated layers to try on each, extracted in one pass, or auto "
              "(default: each one's pooled tap).")
@click.option("--clf", default="logreg", show_default=True, help="Comma-separated heads: logreg, svm, knn, mlp.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: runs/<dataset>__compare.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def compare(data, data_root, backbones, layers, clf, cache_dir, device, out, as_json, quiet):
    """Rank backbones, layers and heads on one dataset: score with its 95% interval, fit and extraction cost."""
    check_data(data, data_root)
    from featx.heads.leaderboard import compare as run_compare, leaderboard_table
    from featx.report.summary import compare_text

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    result = run_compare(data, split(backbones) or [], split(layers), split(clf), data_root=data_root,
                         cache_dir=cache_dir, device=device, out=out, progress=not quiet)
    emit(result, as_json, compare_text(result, leaderboard_table(result["rows"])))


@cli.command()
@data_options()
@click.option("--budget", default="10m", show_default=True, help="Time for the whole search, e.g. 10m, 90s, 1h: "
              "candidates whose measured-rate estimate does not fit are skipped, and said.")
@click.option("--backbones", default=None, help="Comma-separated backbones to try beside the offline ones present "
              "(efficientnet_lite0/1/2).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: runs/<dataset>__auto.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one object: test, winner, leaderboard, scenario.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def auto(data, data_root, budget, backbones, out, cache_dir, device, as_json, quiet):
    """Measure backbones x taps x heads x fine-tuning within a budget on the same held-out rows; refit, test, export
    and report the best model it can prove (runs/<data>__auto)."""
    check_data(data, data_root)
    from .autosearch import auto as run_auto, parse_budget
    from featx.report.summary import auto_text

    parse_budget(budget)  # a wrong --budget is one line before torch is imported
    r = run_auto(data, budget, backbones, out, data_root=data_root, cache_dir=cache_dir, device=device,
                 progress=not quiet)
    for skipped in r["skipped"]:
        click.echo(f"featx: skipped {skipped['name']}: {skipped['reason']}", err=True)
    emit(r, as_json, auto_text(r))


@cli.command()
@click.argument("pipeline")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder (default: runs/<name>).")
@click.option("--backbone", default=None, help="Run every step on this backbone instead of the file's.")
@click.option("--max-epochs", default=None, type=click.IntRange(1), help="Cap fine-tuning epochs (quick runs).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def run(pipeline, data_root, cache_dir, out, backbone, max_epochs, device, as_json, quiet):
    """Run a reference experiment (a TOML file, or a shipped one by name: quickstart, s2_hymenoptera...)."""
    from .pipeline import comparison_table, run_pipeline

    result = run_pipeline(pipeline, data_root=data_root, cache_dir=cache_dir, out=out, backbone=backbone,
                          max_epochs=max_epochs, device=device, progress=not quiet)
    emit(result, as_json, comparison_table(result) + f"\nreport: {result['report_page']}")


@cli.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.pass_context
def demo(ctx, device, as_json, quiet):
    """Offline demo: lite0 features of scikit-learn's digits, then logreg and kNN heads (= featx run quickstart)."""
    ctx.invoke(run, pipeline="quickstart", device=device, as_json=as_json, quiet=quiet)


@cli.command()
@data_options()
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--layer", default="auto", show_default=True,
              help="The taps to compare (auto: the family's last blocks and pool; see 'featx backbones').")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="Where the ONNX export of the backbone is kept.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
def advise(data, data_root, backbone, layer, cache_dir, device, as_json, quiet):
    """Measure which tap a linear head does best on, and the dataset's size; recommend one of the four scenarios."""
    check_data(data, data_root)
    from featx.heads.advice import advise as run_advise
    from featx.report.summary import advise_text

    r = run_advise(data, backbone, data_root, device, layer, cache_dir, progress=not quiet)
    for warning in r["warnings"]:
        click.echo(f"featx: warning: {warning}", err=True)
    emit(r, as_json, advise_text(r))


@cli.command()
@click.option("--data", default=None, help="Dataset folder or registered name (default: the last extract's).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--backbone", default=None, help="Default: the last extract's, else efficientnet_lite0.")
@click.option("--layer", default=None, help="Feature tap (default: the last extract's; with several, the last).")
@click.option("--clf", type=click.Choice(["logreg", "svm", "knn", "mlp"]), default="logreg", show_default=True,
              help="The head whose out-of-fold probabilities score the labels.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: runs/<dataset>__audit.")
@click.option("--write-exclude", type=click.Path(dir_okay=False), default=None,
              help="Write the paths found (label errors, leaking test copies, outliers) to FILE, one a line, to edit.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", is_flag=True)
def audit(data, data_root, backbone, layer, clf, cache_dir, out, write_exclude, device, as_json, quiet):
    """Find likely label errors, near-duplicates (leakage across splits) and outliers from cached features."""
    check_data(data, data_root)
    from featx.heads.audit import audit as run_audit
    from featx.report.summary import audit_found, audit_summary

    r = run_audit(data, backbone, layer, clf, data_root=data_root, cache_dir=cache_dir, out=out, device=device,
                  progress=not quiet)
    if write_exclude:
        from .data import write_exclude as write_exclude_file

        write_exclude_file(write_exclude, audit_found(r))
    summary, text = audit_summary(r)
    emit(summary, as_json, text)


@cli.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False),
              help="model.featx from fit-head or finetune.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Default: beside the model, model.onnx.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13))
@click.option("--batch", default="dynamic", show_default=True, help="dynamic, or a fixed number of images a call.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8 weights (ONNX Runtime's dynamic quantisation), kept when val accuracy (train's without val) "
                   "drops <= 1 point; test is only reported.")
@click.option("--force", is_flag=True, help="With --quantize: write it whatever the accuracy drop.")
def export(model, out, opset, batch, quantize, force):
    """One ONNX file from uint8 images to class probabilities (backbone, head, calibration), runnable without featx."""
    from featx.serve.export import export_model
    from featx.report.summary import export_text
    from featx.serve.onnxfile import load_exported

    path = export_model(model, out, opset, batch, quantize, force)
    click.echo(export_text(path, load_exported(path), quantize))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def backbones(as_json):
    """List registered backbones, their layers with each one's width, what --layer auto tries, blocks, and
    whether their weights are here."""
    from featx.extraction.backbones import list_backbones
    from featx.report.summary import backbones_text

    rows = list_backbones()
    if as_json:
        emit({"backbones": rows}, True, "")
        return
    click.echo(backbones_text(rows))


@cli.command()
@click.option("--data-root", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def datasets(data_root, as_json):
    """List registered dataset names and whether they are present under the data root."""
    from . import data
    from featx.report.summary import datasets_text

    root = data.data_root(data_root)
    rows = data.catalogue(root)
    if as_json:
        emit({"root": str(root), "datasets": rows}, True, "")
        return
    click.echo(datasets_text(root, rows))


def main(argv=None) -> None:
    keep_freed_memory()
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, not as an encoding error
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        cli.main(args=argv, prog_name="featx", standalone_mode=False)
    except FeatxError as exc:
        if type(exc).__name__ == "RankFailed":  # under torchrun rank 0 has said why; the others just stop
            sys.exit(2)
        click.echo(f"featx: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("featx: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
