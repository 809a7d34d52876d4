"""featx auto: the comparison rows choose nothing, the carve-out stays put, ties go to the cheaper candidate, a
re-run reuses every result, --json has its keys, and a small budget skips and says so (tiny network, tiny data)."""
import csv
import html
import json
import shutil
import types

import numpy as np
import pytest
from scipy.stats import binom

import featx
import helpers
from featx import autosearch
from featx.autosearch import evidence
from featx import heads
from featx.heads import linear
from featx import data as data_mod
from featx.cli import main

SPLITS = {"train": 8, "val": 4, "test": 3}
FEW_CS = np.logspace(-2, 2, 4)  # C's sweep, shortened for speed (the rule that picks from it is the same)


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """One auto run on three colour classes, its folders, and the result; the offline lite backbones are left out
    (their weights are real networks), fine-tuning runs 2 epochs, and svm, kNN and the MLP try two taps."""
    home = tmp_path_factory.mktemp("auto")
    root = helpers.make_dataset(home / "colours", SPLITS, classes=("a", "b", "c"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autosearch, "OFFLINE", ())
        patch.setattr(autosearch, "FINETUNE_EPOCHS", 2)
        patch.setattr(autosearch, "HEAD_TAPS", 2)  # of the tiny network's three
        patch.setattr(linear, "DEFAULT_CS", FEW_CS)
        patch.setattr(autosearch, "OUTER_FOLDS", 2)
        patch.setattr(autosearch, "OOF_INNER_FOLDS", 2)
        result = featx.auto(str(root), "10m", [tiny], home / "run", cache_dir=home / "cache", workers=0,
                            progress=False)
    return home, root, result


@pytest.fixture
def only_tiny(monkeypatch):
    monkeypatch.setattr(autosearch, "OFFLINE", ())
    monkeypatch.setattr(autosearch, "FINETUNE_EPOCHS", 2)
    monkeypatch.setattr(autosearch, "HEAD_TAPS", 2)
    monkeypatch.setattr(linear, "DEFAULT_CS", FEW_CS)
    monkeypatch.setattr(autosearch, "OUTER_FOLDS", 2)
    monkeypatch.setattr(autosearch, "OOF_INNER_FOLDS", 2)


def choices(result: dict) -> dict:
    """What each candidate chose (C, k, epochs, its score inside the training part and out of fold there), by name."""
    return {r["name"]: (r.get("selected"), r.get("cv_accuracy"), (r.get("oof") or {}).get("accuracy"))
            for r in result["leaderboard"] if not r["skipped"]}


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


def row(name: str, correct: list, cost: float, oof: list | None = None, family: str = "head", layer: str = "pool",
        clf: str = "logreg", unfreeze: str | None = None) -> dict:
    """A measured candidate: right or wrong on the comparison rows (and on out-of-fold training rows)."""
    r = {"name": name, "family": family, "backbone": "efficientnet_lite0", "layer": None if unfreeze else layer,
         "clf": None if unfreeze else clf, "unfreeze": unfreeze, "skipped": False, "exportable": True, "cost_s": cost,
         "accuracy": float(np.mean(correct)), "n": len(correct), "correct": correct,
         "paths": [f"p{i}" for i in range(len(correct))], "cv_accuracy": None,
         "oof": oof and {"correct": oof, "paths": [f"t{i}" for i in range(len(oof))], "n": len(oof),
                         "accuracy": float(np.mean(oof))}}
    right = evidence(r)[1]
    return r | {"rank_accuracy": float(np.mean(right)), "rank_rows": len(right)}


def searching(board: list, small: bool = False, compare: int = 100) -> autosearch.Search:
    """A search holding ``board`` as measured (only what the decision and the scenario read)."""
    search = object.__new__(autosearch.Search)
    search.board, search.small = board, small
    search.rows = types.SimpleNamespace(train=["t"] * 40, compare=["p"] * compare, test=["x"] * 10, classes=["a", "b"])
    return search


def wrong(correct: list, rows: list) -> list:
    return [0 if i in rows else c for i, c in enumerate(correct)]


def test_tie_goes_to_the_cheaper_candidate():
    """Within the paired interval's noise and within one point, the cheaper candidate wins; told apart, the better
    one does."""
    best = [1] * 80 + [0] * 20
    close = wrong(best, [0])  # one row worse on 100: one point, not told apart
    far = [1] * 50 + [0] * 50  # 30 rows worse: told apart
    search = searching([row("slow", best, 30.0), row("cheap", close, 5.0), row("cheapest", far, 1.0)])
    winner, top, why = search.decide()
    assert (winner["name"], top["name"]) == ("cheap", "slow") and "wins the tie" in why
    assert search.board[2]["vs_leader"]["told_apart"] and not search.board[1]["vs_leader"]["told_apart"]
    assert searching([row("slow", best, 30.0), row("cheapest", far, 1.0)]).decide()[0]["name"] == "slow"
    assert why.endswith("optimistic for the winner, which they chose; test is scored once")
    untested = searching([row("slow", best, 30.0)])
    untested.rows.test = []  # a folder without test/: no figure that nothing chose, and the reason says so
    assert untested.decide()[2].endswith("there is no test split: add a test/ folder for a figure nothing chose")


def test_within_noise_but_more_than_a_point_worse_does_not_win_the_tie():
    """Hymenoptera's case: on 49 comparison rows .959 is within the paired noise of .980 but a point more than
    the margin below it, so the better one ships although the other costs half as much."""
    best = [1] * 48 + [0]
    cheap = wrong(best, [0])  # .959 against .980
    search = searching([row("lite1:pool + logreg", best, 30.0), row("lite0:pool + logreg", cheap, 15.0)], compare=49)
    winner, top, why = search.decide()
    assert not search.board[1]["vs_leader"]["told_apart"]  # within noise: the old rule shipped the cheaper one
    assert winner["name"] == top["name"] == "lite1:pool + logreg" and why.startswith("the best on the ranking rows")


def test_few_comparison_rows_rank_heads_on_their_out_of_fold_rows():
    """On 5 comparison rows a head that is right on all 5 but poor out of fold loses to one right on 4 that is
    strong out of fold; a fine-tune (no out-of-fold rows) must be told apart on the 5 to win, and 5 rows cannot.
    With many comparison rows the out-of-fold rows rank nothing."""
    lucky = row("lucky", [1] * 5, 10.0, oof=[1] * 20 + [0] * 20)
    steady = row("steady", [1] * 4 + [0], 10.0, oof=[1] * 36 + [0] * 4)
    tune = row("tuned", [1] * 5, 60.0, family="finetune", unfreeze="top:1")
    search = searching([lucky, steady, tune], small=True, compare=5)
    winner, best, why = search.decide()
    assert winner["name"] == best["name"] == "steady"
    assert "5 comparison rows + 40 training rows out of fold" in why and "0.8889 on the 45 rows" in why
    assert search.board[0]["vs_leader"]["rows"] == 45 and search.board[2]["vs_leader"]["rows"] == 5
    big = [1] * 60 + [0] * 40
    tuned = row("tuned", [1] * 100, 60.0, family="finetune", unfreeze="top:1")  # told apart on 100 rows
    assert searching([row("steady", big, 10.0, oof=[1] * 40), tuned], small=True).decide()[0]["name"] == "tuned"


def test_without_out_of_fold_rows_a_fine_tune_must_still_be_told_apart():
    """Every class with one training image gives the heads no out-of-fold rows: they rank on the 5 comparison
    rows alone, and a fine-tune right on one more of them is within noise, so the head ships and the finding
    says why; told apart on 100 rows, the fine-tune ships and the finding says so."""
    head = row("head", [1] * 4 + [0], 10.0)
    tune = row("tuned", [1] * 5, 60.0, family="finetune", unfreeze="top:1")
    search = searching([head, tune], small=True, compare=5)
    winner, best, _ = search.decide()
    assert winner["name"] == best["name"] == "head"
    assert "as a fine-tune must be" in search.scenario(winner, best)["finding"]
    search = searching([row("head", [1] * 60 + [0] * 40, 10.0),
                        row("tuned", [1] * 100, 60.0, family="finetune", unfreeze="top:1")], small=True)
    winner, best, _ = search.decide()
    found = search.scenario(winner, best)
    assert winner["name"] == "tuned" and found["label"].startswith("large")
    assert "told apart, so the fine-tune ships" in found["finding"]


def test_out_of_fold_rows_were_never_trained_on(monkeypatch, only_tiny):
    """Each outer fold's head (which chooses its C by its own CV) is fitted on rows it is never asked to score,
    and every row is scored once."""
    from featx.heads import registry

    rng = np.random.default_rng(0)
    X = np.c_[np.arange(30), rng.normal(size=(30, 4))].astype(np.float32)
    y = np.repeat([0, 1, 2], 10)
    seen = []
    real = registry.make_head

    class Spy:
        def __init__(self, head):
            self.head = head

        def fit(self, X, y):
            seen.append({"trained": set(X[:, 0].tolist())})
            self.head.fit(X, y)
            return self

        def predict_proba(self, X):
            seen[-1]["scored"] = set(X[:, 0].tolist())
            return self.head.predict_proba(X)

        @property
        def classes_(self):
            return self.head.classes_

    monkeypatch.setattr(registry, "make_head", lambda *a, **k: Spy(real(*a, **k)))
    rows, proba = autosearch.out_of_fold("logreg", X, y, 3, "cpu")
    assert len(seen) == autosearch.OUTER_FOLDS and all(not (f["trained"] & f["scored"]) for f in seen)
    assert sorted(rows.tolist()) == list(range(30)) and proba.shape == (30, 3)
    assert set().union(*(f["scored"] for f in seen)) == set(map(float, range(30)))
    rows, proba = autosearch.out_of_fold("logreg", X[[0, 10, 20]], y[[0, 10, 20]], 3, "cpu")  # one image a class
    assert len(rows) == 0 and proba.shape == (0, 3)


def test_scenario_agrees_with_the_winner():
    """The finding is read off the comparisons that chose the winner: a head on block5 that wins within noise
    makes the finding "different" (the old one said "similar" there), a fine-tune that wins makes it "large";
    on random boards (ties, fine-tunes and every tap winning among them) the words never contradict the winner's
    tap or fine-tune."""
    pool = [1] * 80 + [0] * 20
    block5 = pool[:]
    block5[85] = 1  # one row better: within noise
    board = [row("lite0:pool + logreg", pool, 10.0), row("lite0:block5 + logreg", block5, 10.0, layer="block5"),
             row("lite0 fine-tuned top:1", wrong(pool, range(10)), 60.0, family="finetune", unfreeze="top:1")]
    search = searching(board)
    winner, best, _ = search.decide()
    found = search.scenario(winner, best)
    assert winner["layer"] == "block5" and found["label"] == "small & different" and found["scenario"] == 3
    assert "the winner uses block5" in found["finding"] and "worse, so the head wins" in found["finding"]
    assert '(within noise: "different" names the route taken, not a difference the rows told apart)' in found["finding"]
    assert found["verdict"] == "small & different: a linear classifier (logistic regression) on earlier-layer " \
                               "(block5) features of efficientnet_lite0"
    mlp = row("lite0:pool + mlp", [1] * 100, 12.0, clf="mlp")  # told apart above every other: the MLP wins
    winner, best, _ = (search := searching(board + [mlp])).decide()
    assert winner is mlp and search.scenario(winner, best)["verdict"] == \
        "small & similar: a small MLP on last-layer features of efficientnet_lite0"  # not "linear classifier"
    rng = np.random.default_rng(0)
    for _ in range(40):
        taps = ["block5", "block6", "block7", "pool"]
        truth = rng.random(200) < 0.8
        board = [row(f"lite0:{t} + logreg", (truth ^ (rng.random(200) < 0.03)).astype(int).tolist(),
                     float(rng.uniform(5, 20)), layer=t) for t in taps]
        board += [row(f"lite0 fine-tuned top:{k}", (truth ^ (rng.random(200) < rng.uniform(0, 0.06))).astype(int).tolist(),
                      float(rng.uniform(5, 80)), family="finetune", unfreeze=f"top:{k}") for k in (1, 2)]
        search = searching(board, compare=200)
        winner, best, _ = search.decide()
        found = search.scenario(winner, best)
        assert found["label"].startswith("large") == (winner["family"] == "finetune")
        if winner["family"] == "head":
            assert found["label"].endswith("different") == (winner["layer"] != "pool")
            assert f"the winner uses {'pooled features' if winner['layer'] == 'pool' else winner['layer']}" in \
                found["finding"]
            assert autosearch.HEAD_WORDS[winner["clf"]] in found["verdict"]
        else:
            assert f"fine-tuning {winner['unfreeze']} against the best head" in found["finding"]
            assert f"fine-tune the top {winner['unfreeze'][-1]} block(s)" in found["verdict"]
        assert found["finding"].endswith(f"Winner: {winner['name']}.")


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
    rows = list(csv.DictReader(lines))
    assert [r["name"] for r in rows if r["winner"] == "True"] == [result["winner"]["name"]]
    kinds = [("skipped" if r["skipped"] == "True" else "reported" if r["not_shipped"] else "ships") for r in rows]
    assert kinds == sorted(kinds, key=["ships", "reported", "skipped"].index)  # what can ship ranks first
    assert {r["not_shipped"] for r in rows if r["head"] == "knn"} == {"kNN votes do not export to ONNX"}
    ensemble, = [r for r in rows if r["family"] == "ensemble"]
    assert "by accuracy inside the training part" in ensemble["not_shipped"] and ensemble["winner"] == "False"
    heads = [r for r in result["leaderboard"] if not r["skipped"] and r["family"] == "head"]
    logreg = {r["layer"]: r["cv_accuracy"] for r in heads if r["clf"] == "logreg"}
    more = {r["layer"] for r in heads if r["clf"] != "logreg"}  # svm, kNN and MLP on the best 2 taps (HEAD_TAPS) by CV
    assert len(logreg) == 3 and len(more) == 2 and min(logreg[t] for t in more) >= max(logreg[t] for t in {*logreg} - more)
    assert {(r["layer"], r["clf"]) for r in heads if r["clf"] != "logreg"} == {
        (t, c) for t in more for c in autosearch.MORE_HEADS}
    curve = result["learning_curve"]["points"]
    assert [p["fraction"] for p in curve] == [0.25, 0.5, 1.0] and curve[0]["images"] < curve[-1]["images"]
    # 12 comparison rows are few: each head is ranked on the training part out of fold too, never on a compare row
    assert result["compare_rows"]["ranked_out_of_fold"]
    train = {str(p.relative_to(root)) for p in (root / "train").glob("*/*.jpg")}
    for stored in (run / "candidates").glob("tiny-*logreg.json"):
        oof = json.loads(stored.read_text())["result"]["oof"]
        assert set(oof["paths"]) == train and oof["n"] == len(train) == 24
    assert "12 comparison rows + 24 training rows out of fold" in result["winner"]["why"]
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
    lost = next(p for p in stored if p.name.endswith("knn.json"))
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
    assert all("s of the budget left (beside ~" in why and "kept for the learning curve, refit and export)" in why
               for why in skipped.values())
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


def test_a_fits_estimate_has_a_fixed_part_and_a_part_in_rows_and_dimension():
    """Fits of ~1.5 s whatever the tap's size (their cost mostly fixed) predict ~1.5 s for a 1,280-d tap too,
    not 16x that; a heads' estimate with no fit of its own follows logreg's measured/prior ratio."""
    cost = autosearch.CostModel()
    assert cost.fit("logreg", 200, 1280) == pytest.approx(0.2 + autosearch.FIT_PRIOR["logreg"] * 200 * 1280)
    cost.saw_fit("logreg", 200, 80, 1.5)
    one = cost.fit("logreg", 200, 1280)
    assert one == pytest.approx(0.2 + 1.3 * 1280 / 80)  # one fit: the prior's fixed part, the rest per size
    cost.saw_fit("logreg", 200, 160, 1.5)
    assert cost.fit("logreg", 200, 1280) == pytest.approx(1.5) and cost.fit("logreg", 200, 1280) < one / 10
    cost.saw_fit("logreg", 200, 1280, 3.0)
    assert 2.9 < cost.fit("logreg", 200, 1280) < 3.1 and cost.fit("logreg", 400, 1280) > 4.0
    ratio = cost.fit("logreg", 200, 1280) / (0.2 + autosearch.FIT_PRIOR["logreg"] * 200 * 1280)
    assert cost.fit("mlp", 200, 1280) == pytest.approx((0.2 + autosearch.FIT_PRIOR["mlp"] * 200 * 1280) * ratio)


def test_the_out_of_fold_estimate_follows_what_was_measured():
    """The nested CV's cost is estimated from the ratio measured for the same head (else logreg's), not from
    the fold count alone."""
    cost = autosearch.CostModel()
    prior = cost.out_of_fold("svm", 400, 1280)
    assert prior == pytest.approx(cost.fit("svm", 400, 1280) * 1.8)
    cost.saw_fit("logreg", 400, 1280, 2.0)
    cost.saw_out_of_fold("logreg", 2.0, 9.0)  # 4.5x its own fit, as the nested CV took on a real set
    assert cost.out_of_fold("logreg", 800, 1280) == pytest.approx(cost.fit("logreg", 800, 1280) * 4.5)
    assert cost.out_of_fold("svm", 400, 1280) == pytest.approx(cost.fit("svm", 400, 1280) * 4.5)
    cost.saw_out_of_fold("svm", 1.0, 2.0)
    assert cost.out_of_fold("svm", 400, 1280) == pytest.approx(cost.fit("svm", 400, 1280) * 2.0)
    search = object.__new__(autosearch.Search)  # what a head is budgeted at, and a backbone's taps before extraction
    search.cost, search.small = cost, True
    assert search.head_estimate("svm", 400, 1280) == pytest.approx(cost.fit("svm", 400, 1280) * 3.0)
    search.small = False  # many comparison rows: no out-of-fold pass
    assert search.head_estimate("svm", 400, 1280) == pytest.approx(cost.fit("svm", 400, 1280))
