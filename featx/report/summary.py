"""The text each command prints after its work: one function per command, beside the metrics it formats.

The CLI parses options, calls the stage and prints what these return; ``--json`` prints the result itself.
Nothing heavy is imported here at start-up: ``summary_line`` (numpy, scikit-learn) is imported where it is used.
"""
from __future__ import annotations

from featx.errors import listed


def tsv_safe(text: str) -> str:
    """A path or label on one tab-separated UTF-8 line: backslash, tab, newline and carriage return are escaped,
    and so is each byte of a file name that is not UTF-8 (as \\xff)."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def extract_messages(results: list) -> list[str]:
    """What an extraction says on stderr: files --exclude left out, files skipped (once across taps), notes."""
    first = results[0]
    messages = [f"featx: left out {len(first.excluded)} training files --exclude names"] if first.excluded else []
    for s in {s["path"]: s for result in results for s in result.skipped_files}.values():
        again = " (tried again next run)" if s.get("retried_next_run") else ""
        messages.append(f"skipped {s['path']}: {s['reason']}{again}")
    return messages + [f"featx: note: {note}" for note in first.notes]


def extract_text(results: list) -> str:
    """One line per tap: images, what was new, skipped and dropped, the tap's width, where and how fast."""
    lines = []
    for r in results:
        unreadable = f", {r.unreadable} of them unreadable now and tried again next run" if r.unreadable else ""
        lines.append(f"{r.images} images ({r.new} new, {r.skipped} skipped{unreadable}, {r.dropped} dropped) "
                     f"{r.backbone}:{r.layer} {r.feature_dim}-d on {r.device} ({r.runtime}), {r.img_per_s} img/s"
                     + (f" after {r.setup_s:.1f} s of setup" if r.setup_s else "") + f" -> {r.path}")
    return "\n".join(lines)


def fit_head_text(clf: str, m: dict) -> str:
    """How the head was chosen, its figures (and without the excluded images), and the files written."""
    from .metrics import summary_line

    second = "".join(f"\n{split} without the {m[split]['without_excluded']['excluded']} excluded images (optimistic: "
                     f"a model that saw their labels chose them): accuracy {m[split]['without_excluded']['accuracy']:.4f}"
                     f" (n={m[split]['without_excluded']['n']})" for split in ("val", "test")
                     if split in m and m[split].get("without_excluded", {}).get("accuracy") is not None)
    return f"{clf}: {selection_line(m['selected'])}\n{summary_line(m)}{second}\nmodel: {m['model']}\n" \
           f"report: {m['report_page']}"


def selection_line(selected: dict) -> str:
    """How the hyper-parameter was chosen, in words: the value, on what, and what could not be scored."""
    chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in selected.items() if k in ("C", "k", "epochs"))
    held = f"held-out accuracy {selected['cv_accuracy']:.4f} over {selected['scored_rows']} images, " \
        if selected.get("cv_accuracy") is not None else ""
    text = f"{chosen} (selected by {selected['selection']}; {held}select-on {selected['select_on']})"
    if selected.get("unscored_classes"):
        names = selected["unscored_classes"]
        text += (f"; {len(names)} classes with one training image are always trained on, never scored: "
                 f"{listed(names)}")
    for note in ([selected["edge"]] if selected.get("edge") else []) + selected.get("warnings", []):
        text += f"\nwarning: {note}"
    if selected.get("excluded"):
        text += (f"\nleft out of training {len(selected['excluded'])} files --exclude names (metrics.json: "
                 "selected.excluded)")
    if selected.get("excluded_but_scored"):
        text += (f"\n{len(selected['excluded_but_scored'])} val/test files --exclude names are still scored; "
                 "metrics.json's without_excluded is the figure without them")
    return text + taps_lines(selected)


def taps_lines(selected: dict) -> str:
    """The taps a head chose between, each with its held-out accuracy, and the winner's margin."""
    taps = [t for t in selected.get("layers", []) if "accuracy" in t]
    if not taps:
        return f"\nlayer {selected['layer']}: {selected['layer_selection']}" if "layers" in selected else ""
    width = max(len(t["layer"]) for t in taps)
    lines = [f"  {t['layer']:<{width}}  {t['accuracy']:.4f} [{t['interval95'][0]:.3f}, {t['interval95'][1]:.3f}]"
             + ("  <- chosen" if t["chosen"] else "") for t in taps]
    margin = selected["layer_margin"]
    low, high = margin["interval95"]
    verdict = (f"{selected['layer']} against {margin['over']}: {margin['margin']:+.4f} [{low:+.3f}, {high:+.3f}] "
               + ("" if margin["told_apart"] else "(within noise: the taps are not told apart here)"))
    return ("\nlayer chosen by held-out accuracy, 95% interval (the later of the taps within one standard error of "
            "the best; these rows also chose C or k, so the figures are optimistic):\n"
            + "\n".join(lines) + "\n" + verdict.rstrip())


def prediction_line(r: dict) -> str:
    """One input's line: on stdout its path, a tab and each top label with its probability; for an input that
    could not be read, the stderr line saying why."""
    if "error" in r:
        return f"featx: {tsv_safe(r['path'])}: could not be read ({r['error']})"
    ranked = ", ".join(f"{tsv_safe(t['label'])} {t['probability']:.6f}" for t in r["top_k"])
    return f"{tsv_safe(r['path'])}\t{ranked}"


def evaluate_text(split: str, m: dict) -> str:
    from .metrics import summary_line

    return f"{split}: " + summary_line({"test": m[split]}).split(" ", 1)[1] + f"\nreport: {m['report_page']}" \
           f"\nprovenance: {m['provenance_line']}" + "".join(f"\nwarning: {w}" for w in m.get("warnings", []))


def finetune_text(m: dict, batch_size: int) -> str:
    """What trained, the epoch val chose and its figures, and the files written."""
    from .metrics import summary_line

    batches = f", {m['processes']} processes x {batch_size} = {m['global_batch_size']} images a step" \
        if m["processes"] > 1 else ""
    return (f"trained {', '.join(m['unfreeze']) or 'the head only'}: {m['trainable_params']:,} of "
            f"{m['total_params']:,} parameters trainable{batches}\n"
            f"best epoch {m['best_epoch']} (chosen on val: {m['val_source']}): {summary_line(m)}\n"
            f"model: {m['model']}\nreport: {m['report_page']}")


def compare_text(result: dict, table: str) -> str:
    """The leaderboard ``table``, the best entry (and why its figure is optimistic), how to reproduce it."""
    best = result["best"]
    verdict = (f"best: {best['backbone']}:{best['layer']} + {best['clf']}, {best['ranked_on']} accuracy "
               f"{best['accuracy']:.4f}" + (" (val chose it: optimistic)" if best["ranked_on"] == "val" else
                                            " (CV chose its C or k, and the winner: optimistic)")
               + (f", test {best['test_accuracy']:.4f}" if best["test_accuracy"] is not None else "")
               + f"\nreproduce: {best['command']}") if best else "nothing could be scored: no val split, no CV"
    return f"{table}\n{verdict}\nreport: {result['report_page']}"


def auto_text(r: dict) -> str:
    """The scenario, the winner and why, its one test figure, the learning curve's estimate and the files."""
    test = r["test"]
    return (f"scenario {r['scenario']['scenario']}: {r['scenario']['finding']}\n"
            f"winner: {r['winner']['name']}, {r['winner']['accuracy']:.4f} on the comparison rows "
            f"({r['compare_rows']['source']}); {r['winner']['why']}\n{r['winner']['refit']}\n"
            + (f"test accuracy {test['accuracy']:.4f} (n={test['n']}, scored once, for the winner only)\n"
               if test else "no test split: nothing scored on test\n")
            + f"{r['learning_curve']['estimate']}\nmodel: {r['model']}  onnx: {r['onnx']}\n"
            f"report: {r['report_page']}  leaderboard: {r['leaderboard_csv']}")


def advise_text(r: dict) -> str:
    """The scenario advised, the two measurements behind it, the taps compared, and the commands to run."""
    probe = r["probe"]
    return (f"scenario {r['scenario']}: {r['verdict']}\n"
            f"  {r['images_per_class']} training images per class ({r['size']}; large from "
            f"{r['thresholds']['large_per_class']})\n"
            f"  {r['similarity']} from ImageNet: {'an earlier tap' if r['similarity'] == 'different' else 'no earlier tap'} "
            f"beats the last one{'' if r.get('layer_margin', {}).get('told_apart', True) else ' (within noise)'} "
            f"({probe['head']} on {probe['images']} training images, up to {probe['per_class']} a class; "
            f"{probe['selection']})"
            + taps_lines(r).replace("\n", "\n  ") + f"\n  BatchNorm shift {r['shift']} on "
            f"{r['shift_backbone']} (a diagnostic, not the decision)\n"
            + "\n".join(f"  {c}" for c in r["commands"]))


def audit_found(r: dict) -> list[str]:
    """The paths an audit found (label errors, leaking test copies, outliers), once each, for --write-exclude."""
    found = [i["path"] for i in r["label_issues"]] + r["leakage"]["leaking_test_images"] + \
        [o["path"] for o in r["outliers"]]
    return list(dict.fromkeys(found))


def audit_summary(r: dict) -> tuple[dict, str]:
    """(the object --json prints: counts in place of the lists, the text printed without it)."""
    leaks = [d for d in r["duplicates"] if d["leak"]]
    cost = r["leakage"]
    summary = {k: r[k] for k in ("data", "images", "class_counts", "class_imbalance", "leakage", "report_page")} | {
        "label_issues": len(r["label_issues"]), "duplicates": len(r["duplicates"]), "leaks": len(leaks),
        "outliers": len(r["outliers"])}
    text = [f"{r['images']} images of {r['data']}: {len(r['label_issues'])} likely label errors, "
            f"{len(r['duplicates'])} near-duplicate pairs ({len(leaks)} across splits), {len(r['outliers'])} outliers"]
    text += [f"  label? {i['path']}: {i['given']} -> {i['suggested']} ({i['confidence']:.2f})"
             for i in r["label_issues"][:10]]
    text += [f"  leak: {d['split_a']} {d['a']} ~ {d['split_b']} {d['b']}" for d in leaks[:10]]
    if cost.get("test_accuracy_without_leaks") is not None and leaks:
        text.append(f"  test accuracy {cost['test_accuracy']:.4f}, {cost['test_accuracy_without_leaks']:.4f} "
                    f"without the {len(cost['leaking_test_images'])} leaking test images")
    text.append(f"report: {r['report_page']}")
    return summary, "\n".join(text)


def export_text(path, meta: dict, quantize: str | None) -> str:
    """Where the export went, and with --quantize the accuracy before and after on the rows that decided."""
    on = meta.get("quantize_decided_on")
    change = f"; int8 kept on {on} accuracy {meta[on + '_accuracy_fp32']} -> {meta[on + '_accuracy_int8']} over " \
             f"{meta[on + '_images']} images" if quantize else ""
    if quantize and "test_images" in meta:
        change += f"; test, after: {meta['test_accuracy_fp32']} -> {meta['test_accuracy_int8']}"
    return f"exported: {path} (checked against featx's probabilities in ONNX Runtime{change})"


def backbones_text(rows: list) -> str:
    """Three lines a backbone (width, weights, default tap; each tap's width; auto taps and blocks), then timm."""
    lines = []
    for r in rows:
        mark = "yes" if r["weights_available"] else "no "
        dims = ", ".join(f"{tap} {dim}" if dim else tap for tap, dim in r["layer_dims"].items())
        lines += [f"{r['name']:<20} {r['feature_dim']:>5}-d  weights here: {mark}  default layer: {r['default_layer']}",
                  f"{'':<20} layers (dim at {r['input_size']} px): {dims}",
                  f"{'':<20} auto: {','.join(r['auto_layers'])}   blocks: {','.join(r['blocks'])}"]
    return "\n".join(lines + ["timm:<name> also works for any timm model whose weights are in the Hugging Face cache."])


def datasets_text(root, rows: list) -> str:
    return "\n".join([f"data root: {root}"] + [
        f"{r['name']:<18} {'present' if r['present'] else 'absent ':<8} {r['description']}" for r in rows])
