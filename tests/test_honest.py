"""How featx keeps its numbers honest: each step that takes another step's output checks which rows that output
was trained, selected or filtered on. One test per composition rule (README: "How featx keeps its numbers honest")."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featx
from featx import data as data_mod
from featx import provenance
from featx.extraction import store
from featx.finetuning import warmstart
from featx.cli import cli
from featx.errors import FeatxError
from featx.heads.fit import fit_head
from featx.heads import load_head, make_head
from featx.modelfile import ModelFile
from helpers import make_dataset


def test_svm_held_out_accuracy_on_noise_labels_is_chance():
    """Pure-noise labels at one fixed C (so choosing C adds no bias): the svm's held-out accuracy averages chance
    within its standard error. Calibrating on the scored rows gave .584 on 40 rows (16-d, 30 seeds)."""
    accuracy = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        X, y = rng.normal(size=(40, 8)), rng.permutation(np.arange(40) % 2)
        accuracy.append(make_head("svm", C=1.0).fit(X, y).selected_["cv_accuracy"])
    mean, error = np.mean(accuracy), np.std(accuracy, ddof=1) / np.sqrt(len(accuracy))
    assert abs(mean - 0.5) < 2.5 * error + 1e-9, (mean, error)
    assert mean < 0.56


@pytest.fixture
def features(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 6, "val": 4, "test": 3})
    return data, featx.extract(tiny, str(data), cache_dir=tmp_path / "c", workers=0, progress=False).path


def test_exclude_drops_training_rows_only_and_a_file_that_matches_nothing_fails(features, tmp_path, capsys):
    data, cache = features
    lines = ["train/a/000.jpg", str(data / "train" / "b" / "001.jpg"), "val/a/002.jpg", "train/a/nothing.jpg"]
    m = fit_head("logreg", features=cache, exclude=lines, out=tmp_path / "x", progress=False)
    assert m["selected"]["excluded"] == ["train/a/000.jpg", "train/b/001.jpg"]  # relative and absolute both match
    assert m["selected"]["excluded_but_scored"] == ["val/a/002.jpg"]
    assert m["val"]["n"] == 8 and m["test"]["n"] == 6  # val and test scored in full
    second = m["val"]["without_excluded"]
    assert second["n"] == 7 and second["excluded"] == 1 and "optimistic" in second["note"]
    assert "without_excluded" not in m["test"]
    assert "1 of the 4 --exclude lines match no image" in capsys.readouterr().err
    assert m["provenance"]["trained_on"][0]["n"] == 10 and m["provenance"]["left_out"][0]["n"] == 2
    with pytest.raises(FeatxError, match=r"none of its 2 lines names an image of .* \(the first: '/elsewhere/a.jpg'\)"):
        fit_head("logreg", features=cache, exclude=["/elsewhere/a.jpg", "b.jpg"], out=tmp_path / "y", progress=False)
    (tmp_path / "drop.txt").write_text("nothing/here.jpg\n")
    out = CliRunner().invoke(cli, ["fit-head", "--features", str(cache), "--exclude", str(tmp_path / "drop.txt"),
                                   "--out", str(tmp_path / "z"), "--quiet"])
    assert out.exit_code != 0 and "the first: 'nothing/here.jpg'" in str(out.exception)
    (tmp_path / "drop.txt").write_text("train/a/000.jpg\nval/a/002.jpg\n")
    out = CliRunner().invoke(cli, ["fit-head", "--features", str(cache), "--exclude", str(tmp_path / "drop.txt"),
                                   "--out", str(tmp_path / "z"), "--quiet"])
    assert out.exit_code == 0 and "val without the 1 excluded images (optimistic" in out.stdout, out.output


def test_a_head_fitted_without_some_images_keeps_the_run_it_is_compared_with(features, tmp_path):
    data, cache = features
    (tmp_path / "drop.txt").write_text("train/a/000.jpg\n")
    runs = []
    for extra in ([], ["--exclude", str(tmp_path / "drop.txt")]):
        res = CliRunner().invoke(cli, ["fit-head", "--features", str(cache), *extra, "--quiet", "--json"])
        assert res.exit_code == 0, res.output
        runs.append(Path(json.loads(res.stdout)["model"]).parent)
    assert runs[0].name.startswith("d__") and runs[0].name.endswith("__logreg")
    assert runs[1].name.startswith(runs[0].name + "__exclude-1-")
    assert (runs[0] / "model.featx").is_file() and (runs[1] / "model.featx").is_file()
    from featx.heads.fit import default_run_name

    odd = default_run_name({"dataset": "d", "backbone": "b", "layer": "pool"}, "svm", ["train/a/\udcff.jpg"])
    assert odd.startswith("d__b__pool__svm__exclude-1-")  # a file name that is not UTF-8 has a digest too
    kept = ModelFile.load(runs[0] / "model.featx").info["provenance"]["trained_on"][0]["n"]
    assert kept == ModelFile.load(runs[1] / "model.featx").info["provenance"]["trained_on"][0]["n"] + 1


def test_a_head_that_saw_the_fine_tunes_val_is_not_warm_started(tiny, tmp_path, capsys):
    net = featx.create_backbone(tiny)
    data = make_dataset(tmp_path / "d", {"train": 6, "val": 3})
    fit_head("logreg", backbone=tiny, data=str(data), select_on="val", cache_dir=tmp_path / "c", out=tmp_path / "v",
             progress=False)
    ds = data_mod.load(str(data))
    assert warmstart.choose_head(None, net, ds, tmp_path / "c") is None
    assert "was trained or chose its settings on val images, which hold the val images" in \
        capsys.readouterr().err
    with pytest.raises(FeatxError, match=r"--head .* chose its settings on val images, and this fine-tune "
                                         r"chooses its epoch on val"):
        warmstart.choose_head(str(tmp_path / "v" / "model.featx"), net, ds, tmp_path / "c")
    fit_head("logreg", backbone=tiny, data=str(data), cache_dir=tmp_path / "c", out=tmp_path / "cv", progress=False)
    assert warmstart.choose_head(None, net, ds, tmp_path / "c") == str((tmp_path / "cv" / "model.featx").resolve())
    # no val/: the fine-tune carves val out of train, which a cross-validated head was trained on
    bare = make_dataset(tmp_path / "bare", {"train": 6, "test": 2})
    fit_head("logreg", backbone=tiny, data=str(bare), cache_dir=tmp_path / "c", out=tmp_path / "b", progress=False)
    assert warmstart.choose_head(None, net, data_mod.load(str(bare)).with_val_from_train(0.3), tmp_path / "c") is None
    assert "which hold the val (carved from train) images" in capsys.readouterr().err


def synthetic(n_per_class=16, classes=3, flips=(), seed=0, dim=12):
    """Features of a three-blob problem as the cache holds them (one split: train), labels of ``flips`` rows
    moved to the next class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    X = (rng.normal(size=(len(y), dim)) + 3.0 * np.eye(classes, dim)[y]).astype(np.float32)
    given = y.copy()
    given[list(flips)] = (given[list(flips)] + 1) % classes
    paths = np.array([f"train/c{c}/{i:03d}.jpg" for i, c in enumerate(y)])
    return store.Features(X, given, paths, np.array(["train"] * len(y)), [f"c{c}" for c in range(classes)],
                          {"dataset_root": "/nowhere"}, Path("/nowhere/f.h5"))


def test_audit_with_the_mlp_scores_every_row():
    from featx.heads.audit import out_of_fold

    F = synthetic(n_per_class=12)
    proba, _ = out_of_fold(F, "mlp")
    one_hot = np.eye(len(F.classes))[F.y]
    assert not np.isclose(proba, one_hot).all(1).any()  # no row kept its own label at probability 1
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert (proba.argmax(1) == F.y).mean() > 0.9  # and they are real predictions


def test_audit_label_findings_are_cleanlabs_on_the_same_out_of_fold_probabilities():
    """The Datalab call featx makes against cleanlab's find_label_issues called directly on the same
    probabilities, and a planted-flip fixture where featx's recall reaches that of cleanlab on scikit-learn's
    5-fold out-of-fold logistic regression."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.heads.audit import find_issues, out_of_fold

    flips = [0, 17, 35, 40, 60]
    F = synthetic(n_per_class=24, flips=flips)
    proba, _ = out_of_fold(F, "logreg")
    small = synthetic(n_per_class=8, seed=1)  # an audit before, on other rows, leaves nothing behind for this one
    find_issues(small, out_of_fold(small, "logreg")[0])
    ours = find_issues(F, proba).get_issues()["is_label_issue"].to_numpy()
    direct = find_label_issues(F.y, proba, min_examples_per_class=10)  # Datalab's default minimum
    assert ours.tolist() == direct.tolist()
    sklearn = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)), F.X, F.y,
                                cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    reference = find_label_issues(F.y, sklearn)
    recall = lambda found: np.isin(flips, np.flatnonzero(found)).mean()  # noqa: E731
    assert recall(reference) >= 0.8 and recall(ours) >= recall(reference)


def test_an_svm_warm_start_keeps_its_calibrated_probabilities(tiny, tmp_path):
    for classes in (("a", "b"), ("a", "b", "c")):
        data = make_dataset(tmp_path / "-".join(classes), {"train": 6, "val": 3}, classes=classes)
        stage2 = fit_head("svm", backbone=tiny, data=str(data), cache_dir=tmp_path / "c",
                          out=tmp_path / f"s{len(classes)}", progress=False)
        head = warmstart.head_from_model(stage2["model"], featx.create_backbone(tiny), list(classes))
        X = np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32)
        with torch.no_grad():
            ours = torch.softmax(head(torch.as_tensor(X)).double(), 1).numpy()
        np.testing.assert_allclose(ours, load_head(ModelFile.load(stage2["model"]).head_arrays, ModelFile.load(stage2["model"]).head_config).predict_proba(X), atol=1e-4)
    from featx.finetuning.training import finetune

    # an epoch that moves nothing: the fine-tune's val loss is fit-head's val log-loss
    m = finetune(tiny, str(data), "none", epochs=1, lr=1e-12, head=stage2["model"], out=tmp_path / "ft",
                 workers=0, progress=False, augment="none")
    assert m["history"][0]["val_loss"] == pytest.approx(stage2["val"]["log_loss"], abs=1e-4)
    assert m["provenance"]["warm_start"]["trained_on"][0]["split"] == "train"


def test_quantisation_is_decided_without_reading_test_labels(tiny, tmp_path):
    from featx.serve.export import export_model
    from featx.serve.onnxfile import load_exported

    data = make_dataset(tmp_path / "d", {"train": 6, "val": 3, "test": 3})
    fit_head("logreg", backbone=tiny, data=str(data), cache_dir=tmp_path / "c", out=tmp_path / "lr", progress=False)
    decision = lambda meta: {k: v for k, v in meta.items() if k.startswith(("quantize", "val_"))}  # noqa: E731
    first = load_exported(export_model(tmp_path / "lr" / "model.featx", tmp_path / "one.onnx", quantize="int8"))
    (data / "test" / "a").rename(data / "test" / "x")  # every test label swapped
    (data / "test" / "b").rename(data / "test" / "a")
    (data / "test" / "x").rename(data / "test" / "b")
    second = load_exported(export_model(tmp_path / "lr" / "model.featx", tmp_path / "two.onnx", quantize="int8"))
    assert decision(first) == decision(second) and first["quantize_decided_on"] == "val"
    assert first["val_images"] == "6" and first["test_images"] == "6"
    assert float(first["test_accuracy_fp32"]) == pytest.approx(1 - float(second["test_accuracy_fp32"]))


def test_compare_ranks_every_head_on_the_same_rows_with_paired_intervals(tiny, tmp_path):
    from featx.heads.leaderboard import compare

    data = make_dataset(tmp_path / "d", {"train": 8}, classes=("a", "b", "c"))  # no val: 5-fold on train
    result = compare(str(data), [tiny], None, ["logreg", "svm", "mlp"], cache_dir=tmp_path / "c",
                     out=tmp_path / "cmp", progress=False)
    rows = result["rows"]
    assert len(rows) == 3 and {r["ranked_on"] for r in rows} == {"cv"} and {r["scored_images"] for r in rows} == {24}
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert rows[0]["against_best"]["margin"] == 0
    for r in rows[1:]:
        low, high = r["against_best"]["interval95"]
        assert r["against_best"]["margin"] == pytest.approx(r["accuracy"] - rows[0]["accuracy"]) and low <= high


def test_taps_are_ranked_on_the_rows_every_tap_scored():
    from featx.heads.selection import choose_tap

    def head(rows, right):
        return SimpleNamespace(held_out_=(np.asarray(rows), None), held_out_right_=np.asarray(right))
    # the early tap is wrong on row 0, which the other never scored: on the shared rows 1-4 they tie
    early, pool = head([0, 1, 2, 3, 4], [False, True, True, True, False]), head([1, 2, 3, 4], [True, True, True, False])
    _, record = choose_tap(["early", "pool"], [early, pool])
    assert [t["accuracy"] for t in record["layers"]] == [0.75, 0.75] and record["layer_margin"]["rows"] == 4


def test_evaluate_and_predict_show_provenance_and_old_files_say_unknown(features, tmp_path):
    data, cache = features
    m = fit_head("logreg", features=cache, out=tmp_path / "lr", progress=False)
    prov = m["provenance"]
    assert [e["split"] for e in prov["trained_on"]] == ["train"] and [e["split"] for e in prov["held_out"]] == \
        ["val", "test"]
    assert prov["trained_on"][0]["sha256"] == provenance.paths_digest(
        [f"train/{c}/{i:03d}.jpg" for c in "ab" for i in range(6)])
    assert json.loads((tmp_path / "lr" / "metrics.json").read_text())["provenance"] == prov
    ev = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "lr" / "model.featx"), "--data", str(data),
                                  "--split", "train", "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert ev.exit_code == 0, ev.output
    assert "provenance: trained on train [12 images" in ev.stdout and "this figure is optimistic" in ev.stdout
    image = str(data / "test" / "a" / "000.jpg")
    out = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "lr" / "model.featx"), image, "--json"])
    assert json.loads(out.stdout)["provenance"] == prov
    old = ModelFile.load(tmp_path / "lr" / "model.featx")
    old.info.pop("provenance")
    old.save(tmp_path / "old" / "model.featx")
    out = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "old" / "model.featx"), image, "--json"])
    assert json.loads(out.stdout)["provenance"] == provenance.UNKNOWN
    shutil.rmtree(tmp_path / "old")
