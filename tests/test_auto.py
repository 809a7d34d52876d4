"""featx auto: the comparison rows choose nothing, the carve-out stays put, ties go to the cheaper candidate, a
re-run reuses every result, --json has its keys, and a small budget skips and says so (tiny network, tiny data)."""
import html
import json
import shutil

import numpy as np
import pytest
from scipy.stats import binom

import featx
import helpers
from featx import autosearch
from featx import heads
from featx.heads import linear
from featx import data as data_mod
from featx.cli import main

SPLITS = {"train": 8, "val": 4, "test": 3}
FEW_CS = np.logspace(-3, 3, 7)  # C's sweep, shortened for speed (the rule that picks from it is the same)


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """One auto run on three colour classes, its folders, and the result; the offline lite backbones are left out
    (their weights are real networks) and fine-tuning runs 2 epochs."""
    home = tmp_path_factory.mktemp("auto")
    root = helpers.make_dataset(home / "colours", SPLITS, classes=("a", "b", "c"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autosearch, "OFFLINE", ())
        patch.setattr(autosearch, "FINETUNE_EPOCHS", 2)
        patch.setattr(linear, "DEFAULT_CS", FEW_CS)
        result = featx.auto(str(root), "10m", [tiny], home / "run", cache_dir=home / "cache", workers=0,
                            progress=False)
    return home, root, result


@pytest.fixture
def only_tiny(monkeypatch):
    monkeypatch.setattr(autosearch, "OFFLINE", ())
    monkeypatch.setattr(autosearch, "FINETUNE_EPOCHS", 2)
    monkeypatch.setattr(linear, "DEFAULT_CS", FEW_CS)


def choices(result: dict) -> dict:
    """What each candidate chose (C, k, epochs, its score inside the training part), by name."""
    return {r["name"]: (r.get("selected"), r.get("cv_accuracy")) for r in result["leaderboard"] if not r["skipped"]}


def test_carve_out_stays_put_when_files_are_added(tmp_path):
    """Without val/, the comparison rows are a path-hash share of train: adding images moves no other image."""
    root = helpers.make_dataset(tmp_path / "d", {"train": 30, "test": 3})
    before = autosearch.comparison_rows(data_mod.load(str(root)))
    assert before.source.startswith("20% of train") and 6 <= len(before.compare) <= 18
    helpers.make_dataset(tmp_path / "more", {"train": 40}, seed=1)
    for path in (tmp_path / "more" / "train").glob("*/*.jpg"):
        shutil.copy(path, root / "train" / path.parent.name / f"new_{path.name}")
    after = autosearch.comparison_rows(data_mod.load(str(root)))
    assert set(before.compare) <= set(after.compare) and set(before.train) <= set(after.train)
    assert len(after.compare) > len(before.compare) and before.fingerprint != after.fingerprint


def row(name: str, correct: list, cost: float) -> dict:
    return {"name": name, "family": "head", "skipped": False, "exportable": True, "cost_s": cost,
            "accuracy": float(np.mean(correct)), "correct": correct, "paths": [f"p{i}" for i in range(len(correct))]}


def test_tie_goes_to_the_cheaper_candidate():
    """Within the paired interval's noise the cheaper candidate wins; told apart, the better one does."""
    search = object.__new__(autosearch.Search)
    best = [1] * 80 + [0] * 20
    close = best[:]
    close[0] = close[1] = 0  # two rows worse: not told apart on 100 rows
    far = [1] * 50 + [0] * 50  # 30 rows worse: told apart
    search.board = [row("slow", best, 30.0), row("cheap", close, 5.0), row("cheapest", far, 1.0)]
    winner, top, why = search.decide()
    assert (winner["name"], top["name"]) == ("cheap", "slow") and "wins the tie" in why
    assert search.board[2]["vs_leader"]["told_apart"] and not search.board[1]["vs_leader"]["told_apart"]
    search.board = [row("slow", best, 30.0), row("cheapest", far, 1.0)]
    assert search.decide()[0]["name"] == "slow"


def test_paired_interval_is_mcnemars_exact_test():
    from featx.heads.selection import paired_comparison

    """The p-value is scipy's binomial on the discordant pairs, and the margin the accuracy difference."""
    rng = np.random.default_rng(0)
    leader, other = rng.random(200) < 0.8, rng.random(200) < 0.7
    m = paired_comparison(leader, other)
    b, c = int(np.sum(leader & ~other)), int(np.sum(other & ~leader))
    assert m["p_value"] == pytest.approx(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))
    assert m["margin"] == pytest.approx(other.mean() - leader.mean())
    assert m["interval95"][0] < m["margin"] < m["interval95"][1]
    assert m["told_apart"] == (m["interval95"][1] < 0 or m["interval95"][0] > 0)


def test_outputs_and_workspace(first_run):
    home, root, result = first_run
    run = home / "run"
    for name in ("model.featx", "model.onnx", "report.html", "leaderboard.csv"):
        assert (run / name).is_file(), name
    page = (run / "report.html").read_text()
    assert "Leaderboard" in page and "Learning curve" in page and html.escape(result["scenario"]["finding"]) in page
    lines = (run / "leaderboard.csv").read_text().splitlines()
    assert len(lines) == 1 + len(result["leaderboard"])
    curve = result["learning_curve"]["points"]
    assert [p["fraction"] for p in curve] == [0.25, 0.5, 1.0] and curve[0]["images"] < curve[-1]["images"]
    state = json.loads((home / "cache" / "workspace.json").read_text())
    assert state["extract"]["backbone"] == result["winner"]["backbone"]
    if result["winner"]["family"] == "head":
        assert state["fit_head"]["model"] == str((run / "model.featx").resolve())
    # test is scored once, on the refitted winner: the model file's own predictions on test give its figure
    test = result["test"]
    files = sorted((root / "test").glob("*/*.jpg"))
    proba, _ = featx.load_predictor(run / "model.featx").proba(files, cache_dir=home / "cache")
    truth = np.array(["abc".index(f.parent.name) for f in files])
    assert test["n"] == len(files) and test["accuracy"] == pytest.approx(float((proba.argmax(1) == truth).mean()))


def test_rerun_reuses_every_result_and_json_has_its_keys(first_run, tiny, only_tiny, capsys):
    """The same options again: nothing recomputed (no candidate file rewritten), one JSON object; a candidate lost
    to a kill is the only one computed again."""
    home, root, result = first_run
    stored = sorted((home / "run" / "candidates").glob("*.json"))
    times = {p: p.stat().st_mtime_ns for p in stored}
    argv = ["auto", "--data", str(root), "--backbones", tiny, "--out", str(home / "run"), "--cache-dir",
            str(home / "cache"), "--json", "--quiet"]
    main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert {"test", "winner", "leaderboard", "scenario"} <= set(printed)
    assert printed["test"]["accuracy"] == result["test"]["accuracy"]
    assert printed["winner"]["name"] == result["winner"]["name"]
    assert all({"accuracy", "interval95", "cost_s", "skipped"} <= set(r) for r in printed["leaderboard"])
    assert {p: p.stat().st_mtime_ns for p in stored} == times
    lost = next(p for p in stored if p.name.endswith("svm.json"))
    lost.unlink()
    main(argv)
    capsys.readouterr()
    assert lost.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in times.items() if p != lost)


def test_small_budget_still_returns_a_model_and_says_what_it_skipped(tiny, only_tiny, tmp_path):
    root = helpers.make_dataset(tmp_path / "d", {"train": 6, "test": 2})
    result = featx.auto(str(root), "1s", [tiny], tmp_path / "run", workers=0, progress=False)
    measured = {r["name"] for r in result["leaderboard"] if not r["skipped"] and r["family"] != "ensemble"}
    assert measured == {"tiny:block1 + logreg", "tiny:block2 + logreg", "tiny:pool + logreg"}
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    assert {"tiny:block2 + svm", "tiny fine-tuned top:1"} <= set(skipped) or len(skipped) >= 4
    assert all("s of the budget left" in why for why in skipped.values())
    assert result["compare_rows"]["source"].startswith("20% of train")
    assert (tmp_path / "run" / "model.onnx").is_file() and result["test"]["n"] == 4


def test_budget_is_checked():
    assert autosearch.parse_budget("1h30m") == 5400 and autosearch.parse_budget("90s") == 90
    with pytest.raises(featx.FeatxError, match="--budget"):
        autosearch.parse_budget("soon")


def test_pipeline_step_auto_is_accepted(tmp_path):
    from featx.pipeline import load_pipeline

    path = tmp_path / "p.toml"
    path.write_text('name = "x"\ndata = "d"\n[[steps]]\nname = "auto"\nkind = "auto"\nbudget = "1m"\n')
    assert load_pipeline(path)["steps"][0]["budget"] == "1m"
    path.write_text('name = "x"\ndata = "d"\n[[steps]]\nname = "auto"\nkind = "auto"\nclf = "svm"\n')
    with pytest.raises(featx.FeatxError, match="unknown key 'clf' for a auto step"):
        load_pipeline(path)


def test_comparison_rows_choose_nothing(first_run, tiny, only_tiny):
    """Shuffling the labels of the comparison rows (val) changes their scores but no candidate's choices. (Last
    in the file: its run rewrites the shared cache's workspace record.)"""
    home, root, result = first_run
    shuffled = home / "shuffled"
    shutil.copytree(root, shuffled)
    for i, path in enumerate(sorted((shuffled / "val").glob("*/*.jpg"))):  # a derangement of the classes
        target = shuffled / "val" / "abc"[("abc".index(path.parent.name) + 1 + i % 2) % 3] / f"moved_{path.name}"
        path.rename(target)
    again = featx.auto(str(shuffled), "10m", [tiny], home / "run_shuffled", cache_dir=home / "cache", workers=0,
                       progress=False)
    assert {"head", "finetune"} <= {r["family"] for r in result["leaderboard"] if not r["skipped"]}
    assert choices(again) == choices(result)
    before = {r["name"]: r["accuracy"] for r in result["leaderboard"] if not r["skipped"]}
    after = {r["name"]: r["accuracy"] for r in again["leaderboard"] if not r["skipped"]}
    assert before != after  # the rows really were scored with the new labels
