"""The report page: one self-contained ``report.html`` per run, beside metrics.json.

Plain HTML and inline SVG, thumbnails embedded as data URIs: no network, no JavaScript, one file to send.
Every figure on the page is metrics.json's, printed to 4 places and tagged ``data-key`` with its path in
metrics.json, so a test can check the page against the file.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
import shlex
import sys
from pathlib import Path

import numpy as np

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")  # the figures every split shows first
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}code{background:#f4f4f4;padding:.1em .3em;word-break:break-all}
.grid{display:flex;flex-wrap:wrap;gap:.8em}.grid figure{margin:0;width:170px;font-size:12px}
.grid img{width:170px;height:170px;object-fit:cover}figcaption{word-break:break-all}.muted{color:#777}"""
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                "log_loss": "log-loss", "ece": "ECE (15 bins)"}
THUMBNAIL = 170


def command_line() -> str:
    """How this process was started, as a shell would take it back."""
    return shlex.join(["featx" if Path(sys.argv[0]).name == "featx" else sys.argv[0], *sys.argv[1:]])


def number(value: float, key: str) -> str:
    return f'<span data-key="{html.escape(key)}">{value:.4f}</span>'


def table(header: list, rows: list, left: int = 1) -> str:
    """Rows of already-escaped cells; the first ``left`` columns are text, aligned left."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def setup_section(result: dict, setup: dict) -> str:
    shown = lambda v: f"<code>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</code>"  # noqa: E731
    rows = [[html.escape(k), shown(v)] for k, v in setup.items() if v is not None]
    rows += [[f"selected {html.escape(k)}", shown(v)]
             for k, v in result.get("selected", {}).items() if v is not None and not isinstance(v, (list, dict))]
    rows += [["warning", html.escape(note)]
             for note in result.get("selected", {}).get("warnings", []) + result.get("warnings", [])]
    excluded = result.get("selected", {}).get("excluded", [])
    rows += [["excluded (--exclude)", f"{len(excluded)} files: " + ", ".join(f"<code>{html.escape(p)}</code>"
                                                                          for p in excluded)]] if excluded else []
    return "<h2>Run</h2>" + table(["", "value"], rows, left=2)


def taps_section(selected: dict) -> str:
    """The taps a head was fitted on, each one's held-out score, and which won by how much (``choose_tap``)."""
    taps = [t for t in selected.get("layers", []) if "accuracy" in t]
    if not taps:
        return ""
    rows = [[html.escape(t["layer"]) + (" <b>(chosen)</b>" if t["chosen"] else ""),
             number(t["accuracy"], f"selected.layers.{i}.accuracy"),
             f"{number(t['interval95'][0], f'selected.layers.{i}.interval95.0')} – "
             f"{number(t['interval95'][1], f'selected.layers.{i}.interval95.1')}", str(t["scored_rows"])]
            for i, t in enumerate(taps)]
    margin = selected["layer_margin"]
    verdict = (f"{html.escape(selected['layer'])} against {html.escape(margin['over'])}: "
               f"{number(margin['margin'], 'selected.layer_margin.margin')} (95% interval "
               f"{number(margin['interval95'][0], 'selected.layer_margin.interval95.0')} – "
               f"{number(margin['interval95'][1], 'selected.layer_margin.interval95.1')}, paired over "
               f"{margin['rows']} images)" + ("" if margin["told_apart"] else
                                             ": the interval includes 0, so these taps are not told apart here"))
    return ("<h2>Layer, chosen by held-out score</h2><p>The later of the taps within one standard error of the "
            "best held-out accuracy is kept. Each tap's head chose its own hyper-parameter on these rows "
            f"({html.escape(selected.get('selection', ''))}), so these figures are optimistic; the held-out splits "
            "below scored the chosen tap only.</p>"
            + table(["tap", "held-out accuracy", "95% interval (Wilson)", "images"], rows) + f"<p>{verdict}.</p>")


NOT_HERE = "—"  # a per-class figure that is 0 / 0: recall and F1 of a class with no image in the split,
# precision of a class nothing was predicted as


def metrics_section(split: str, m: dict, result: dict) -> str:
    rows = [[METRIC_NAMES[k], number(m[k], f"{split}.{k}"),
             f"{number(m['interval95'][k][0], f'{split}.interval95.{k}.0')} – "
             f"{number(m['interval95'][k][1], f'{split}.interval95.{k}.1')}"] for k in HEADLINE]
    headline = table(["metric", "value", "95% interval (bootstrap, 1,000 resamples)"], rows)
    predicted = np.asarray(m["confusion_matrix"]).sum(0)  # images predicted as each class
    per_class = table(["class", "precision", "recall", "F1", "images"],
                      [[html.escape(c),
                        number(v["precision"], f"{split}.per_class.{c}.precision") if predicted[i] else NOT_HERE,
                        *([number(v[k], f"{split}.per_class.{c}.{k}") for k in ("recall", "f1")]
                          if v["support"] else [NOT_HERE, NOT_HERE]), str(v["support"])]
                       for i, (c, v) in enumerate(m["per_class"].items())])
    pairs = table(["true", "predicted as", "images"],
                  [[html.escape(p["true"]), html.escape(p["predicted"]), str(p["count"])] for p in m["confused_pairs"]],
                  left=2) if m["confused_pairs"] else "<p>No mistakes.</p>"
    return (f"<h2>{html.escape(split_label(split, result))}: {m['n']} images</h2>{headline}"
            f"<h3>Per class</h3>{per_class}<h3>Confusion matrix</h3>{confusion(m)}"
            f"<h3>Most confused pairs</h3>{pairs}<h3>Reliability</h3>{reliability_svg(m['reliability'])}")


def confusion(m: dict) -> str:
    classes, matrix = list(m["per_class"]), np.asarray(m["confusion_matrix"])
    top = max(int(matrix.max()), 1)
    rows = [[html.escape(c)] + [f'<span style="background:rgba(33,102,172,{v / top:.2f});'
                                 f'color:{"#fff" if v > top / 2 else "#222"};padding:0 .4em">{v}</span>'
                                 for v in matrix[i]] for i, c in enumerate(classes)]
    return table(["true \\ predicted"] + [html.escape(c) for c in classes], rows)


def reliability_svg(bins: list, size: int = 240) -> str:
    """Accuracy against confidence per bin (bars), the diagonal a calibrated model would follow."""
    bars = "".join(f'<rect x="{b["low"] * size:.1f}" y="{(1 - b["accuracy"]) * size:.1f}" '
                   f'width="{(b["high"] - b["low"]) * size - 1:.1f}" height="{b["accuracy"] * size:.1f}" '
                   f'fill="#2166ac" opacity=".75"><title>confidence {b["confidence"]:.3f}, accuracy '
                   f'{b["accuracy"]:.3f}, {b["n"]} images</title></rect>' for b in bins)
    return (f'<svg width="{size + 40}" height="{size + 30}" viewBox="-30 -5 {size + 40} {size + 30}">'
            f'<rect width="{size}" height="{size}" fill="none" stroke="#999"/>{bars}'
            f'<line x1="0" y1="{size}" x2="{size}" y2="0" stroke="#d6604d" stroke-dasharray="4"/>'
            f'<text x="{size / 2}" y="{size + 20}" font-size="11" text-anchor="middle">confidence</text>'
            f'<text x="-18" y="{size / 2}" font-size="11" transform="rotate(-90 -18 {size / 2})" '
            f'text-anchor="middle">accuracy</text></svg>')


def thumbnail(path: Path) -> str | None:
    """A JPEG data URI, or None when the file cannot be read any more."""
    from featx.extraction.images import open_rgb

    try:
        img = open_rgb(path, draft_size=2 * THUMBNAIL)
    except Exception:
        return None
    img.thumbnail((2 * THUMBNAIL, 2 * THUMBNAIL))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def top_losses_section(split: str, m: dict, image_root: Path | None) -> str:
    if not m["top_losses"]:
        return ""
    grid = image_grid([(row["path"], f'<b>{html.escape(row["true"])}</b> → {html.escape(row["predicted"])}<br>'
                        f'p(true) {row["p_true"]:.3f} · loss {row["loss"]:.2f}') for row in m["top_losses"]], image_root)
    return f"<h3>Top losses ({split})</h3>{grid}"


def image_grid(items: list, image_root: Path | None) -> str:
    """Thumbnails with captions: ``items`` are (path relative to ``image_root``, caption HTML)."""
    figures = []
    for path, caption in items:
        src = thumbnail(image_root / path) if image_root is not None and isinstance(path, str) else None
        picture = f'<img src="{src}" alt="{html.escape(str(path))}">' if src else \
            '<div class="muted">(image not readable)</div>'
        figures.append(f'<figure>{picture}<figcaption>{caption}<br>'
                       f'<span class="muted">{html.escape(str(path))}</span></figcaption></figure>')
    return f"<div class=\"grid\">{''.join(figures)}</div>"


def curves_svg(history: list, metric: str, width: int = 360, height: int = 200) -> str:
    """Train and val ``metric`` per epoch as lines: a standalone SVG (``curves_<metric>.svg``) that the page
    also shows inline; "" without a value."""
    finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731 (a diverged epoch's inf or nan)
    series = {s: [finite(h.get(f"{s}_{metric}")) for h in history] for s in ("train", "val")}
    values = [v for vs in series.values() for v in vs if v is not None]
    if not values:
        return ""
    low, high = min(values), max(values)
    span, n = (high - low) or 1.0, max(len(history) - 1, 1)
    lines = []
    for (split, vs), colour in zip(series.items(), ("#2166ac", "#d6604d")):
        points = " ".join(f"{i / n * width:.1f},{height - (v - low) / span * height:.1f}"
                          for i, v in enumerate(vs) if v is not None)
        known = [v for v in vs if v is not None]
        if known:
            lines.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
                         f'<text x="{width + 6}" y="{height - (known[-1] - low) / span * height:.1f}" font-size="11" '
                         f'fill="{colour}">{split}</text>')
    caption = f"{metric} per epoch ({low:.3f} – {high:.3f})"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 50}" height="{height + 30}" '
            f'viewBox="0 -25 {width + 50} {height + 30}" font-family="sans-serif"><title>{caption}</title>'
            f'<text y="-10" font-size="12">{caption}</text>'
            f'<rect width="{width}" height="{height}" fill="none" stroke="#ddd"/>{"".join(lines)}</svg>')


def xml_text(value) -> str:
    """``value`` escaped for XML, with the control characters XML forbids (a standalone .svg is strict XML)
    replaced by U+FFFD."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "\ufffd", html.escape(str(value)))


def confusion_svg(matrix, classes: list, title: str) -> str:
    """The confusion matrix as a standalone SVG heatmap (``confusion_<split>.svg``): true classes down, predicted
    across, each cell's count in its tooltip and, up to 30 classes, written in it; above that only non-zero cells
    are drawn, on an empty grid, so 257 classes stay small. Text, not a rendered plot: a 120-class matrix drawn
    by matplotlib took 4.8 s per split, this takes milliseconds."""
    matrix = np.asarray(matrix)
    k = len(classes)
    cell, font = (36, 11) if k <= 10 else (22, 11) if k <= 30 else (9, 7)
    labels = [xml_text(str(c)[:32]) for c in classes]  # the axes shorten long names; the tooltips do not
    names = [xml_text(c) for c in classes]
    margin = round(12 + 0.6 * font * max((len(str(c)[:32]) for c in classes), default=1))
    top = max(int(matrix.max()), 1) if matrix.size else 1
    x0, y0, side = margin + 18, 26, k * cell
    parts = [f'<text x="{x0}" y="16" font-size="13">{xml_text(title)}</text>',
             f'<rect x="{x0}" y="{y0}" width="{side}" height="{side}" fill="#f7fbff"/>']
    for i in range(k):
        y = y0 + i * cell
        parts.append(f'<text x="{x0 - 4}" y="{y + cell / 2 + font / 3:.1f}" font-size="{font}" '
                     f'text-anchor="end">{labels[i]}</text>')
        x = x0 + i * cell + cell / 2 + font / 3
        parts.append(f'<text x="{x:.1f}" y="{y0 + side + 4}" font-size="{font}" text-anchor="end" '
                     f'transform="rotate(-90 {x:.1f} {y0 + side + 4})">{labels[i]}</text>')
        for j in range(k):
            v = int(matrix[i, j])
            if v == 0 and k > 30:
                continue
            shade = v / top
            fill = "#" + "".join(f"{round(a + (b - a) * shade):02x}" for a, b in ((247, 8), (251, 48), (255, 107)))
            parts.append(f'<rect x="{x0 + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="{fill}">'
                         f'<title>true {names[i]}, predicted {names[j]}: {v}</title></rect>')
            if k <= 30:
                parts.append(f'<text x="{x0 + j * cell + cell / 2:.1f}" y="{y + cell / 2 + font / 3:.1f}" '
                             f'font-size="{font}" text-anchor="middle" fill="{"#fff" if shade > 0.5 else "#222"}">'
                             f'{v}</text>')
    width, height = max(x0 + side + 10, x0 + 8 * len(title)), y0 + side + margin + 22
    parts.append(f'<text x="{x0 + side / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle">predicted</text>'
                 f'<text x="12" y="{y0 + side / 2:.1f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 12 {y0 + side / 2:.1f})">true</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">{"".join(parts)}</svg>')


def write_page(out_dir: Path, result: dict, title: str, setup: dict, image_root: Path | None = None,
               extra: str = "") -> Path:
    """``report.html`` for a run whose metrics.json is ``result``; ``extra`` is more HTML for the end
    (a pipeline's comparison table, a leaderboard)."""
    splits = [s for s in ("val", "test") if isinstance(result.get(s), dict) and "accuracy" in result[s]]
    body = [f"<h1>{html.escape(title)}</h1><p><code>{html.escape(command_line())}</code></p>",
            setup_section(result, setup), taps_section(result.get("selected", {}))]
    for split in splits:
        body += [metrics_section(split, result[split], result), top_losses_section(split, result[split], image_root)]
    if result.get("history"):
        body.append("<h2>Training curves</h2><div class=\"grid\" style=\"gap:2em\">"
                    + curves_svg(result["history"], "loss") + curves_svg(result["history"], "accuracy") + "</div>")
    if not splits and not extra:
        body.append("<p>No held-out split to score.</p>")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width\"><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}{extra}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8", errors="backslashreplace")  # a file name's bytes that are not UTF-8
    return path


def split_label(split: str, metrics: dict) -> str:
    """The split's name, marked when it chose something (an epoch): its figure is then optimistic."""
    return f"{split} (chose the epoch, optimistic)" if metrics.get("selected_on") == split else split
