"""Which tap wins where: the tap x dataset table of RESULTS.md.

    python benchmarks/layer_results.py --data-root ../shared/data hymenoptera cats_dogs digits

For each dataset: ``--layer auto`` extracted in one pass; a logistic head fitted on each tap alone (its
cross-validated accuracy on train, Wilson 95% interval, and its accuracy on every held-out split); what
``fit-head --layer auto`` keeps and its margin; what ``advise`` recommends. Prints a markdown table and one JSON
line per dataset.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from featx.heads.advice import advise
from featx.extraction.runner import extract_taps
from featx.heads.fit import fit_head


def measure(data: str, data_root: str | None, backbone: str, clf: str, work: Path) -> dict:
    cache = work / "cache"
    results = extract_taps(backbone, data, "auto", data_root=data_root, cache_dir=cache, progress=False)
    taps = []
    for r in results:
        m = fit_head(clf, features=r.path, out=work / "runs" / r.layer, progress=False)
        s = m["selected"]
        taps.append({"layer": r.layer, "dim": r.feature_dim, "cv": s["cv_accuracy"], "scored_rows": s["scored_rows"],
                     **{split: m[split]["accuracy"] for split in ("val", "test") if split in m}})
    auto = fit_head(clf, features=[r.path for r in results], out=work / "runs" / "auto", progress=False)["selected"]
    started = time.perf_counter()
    advice = advise(data, backbone, data_root, cache_dir=str(cache))
    return {"data": data, "images": results[0].images, "taps": taps,
            "auto": {"layer": auto["layer"], "layers": auto["layers"], "margin": auto["layer_margin"]},
            "advise": {"layer": advice["layer"], "scenario": advice["scenario"], "margin": advice["layer_margin"],
                       "probe_images": advice["probe"]["images"], "seconds": round(time.perf_counter() - started, 1)}}


def table(rows: list) -> str:
    lines = ["| dataset | tap | dim | CV accuracy on train [95%] | val | test |", "|---|---|---|---|---|---|"]
    for row in rows:
        intervals = {t["layer"]: t["interval95"] for t in row["auto"]["layers"]}
        for t in row["taps"]:
            low, high = intervals[t["layer"]]
            chosen = " ← auto" if t["layer"] == row["auto"]["layer"] else ""
            held = [f"{t[s]:.4f}" if s in t else "–" for s in ("val", "test")]
            lines.append(f"| {row['data']} | {t['layer']}{chosen} | {t['dim']} | {t['cv']:.4f} [{low:.3f}, {high:.3f}] "
                         f"| {held[0]} | {held[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--clf", default="logreg")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.datasets:
            rows.append(measure(data, args.data_root, args.backbone, args.clf, Path(tmp) / data))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    for row in rows:
        a, m = row["advise"], row["advise"]["margin"]
        print(f"advise {row['data']}: scenario {a['scenario']}, {a['layer']} (over {m['over']} by {m['margin']:+.4f} "
              f"[{m['interval95'][0]:+.3f}, {m['interval95'][1]:+.3f}], {a['probe_images']} images, {a['seconds']} s)")


if __name__ == "__main__":
    main()
