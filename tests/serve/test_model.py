import json
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featx
from featx.heads import fit
from featx.serve import predictor
from featx.extraction import store
from featx.modelfile import ModelFile
from featx.cli import cli
from featx.errors import FeatxError
from helpers import make_dataset, register_tiny, save_tiny_weights


@pytest.fixture(scope="module")
def fitted(tiny_weights, tmp_path_factory):
    """One logreg model on the ``dataset`` fixture's images, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("fitted")
    m = fit.fit_head("logreg", backbone=register_tiny(tiny_weights).name, data=str(make_dataset(work / "colours")),
                     cache_dir=work / "c", out=work / "run", progress=False)
    return m, work / "run"


def confusion_counts(path) -> list:
    """The matrix a confusion SVG draws, read back from its cells' tooltips (row by row)."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    counts = [int(r.find(f"{ns}title").text.rsplit(": ", 1)[1]) for r in ET.parse(path).getroot().iter(f"{ns}rect")
              if r.find(f"{ns}title") is not None]
    k = int(round(len(counts) ** 0.5))
    return [counts[i * k:(i + 1) * k] for i in range(k)]


def test_fit_head_writes_everything(fitted):
    m, run = fitted
    assert set(m) >= {"val", "test", "selected", "model"}
    for split in ("val", "test"):
        assert m[split]["accuracy"] == 1.0 and m[split]["n"] == 6
        assert {"balanced_accuracy", "macro_f1", "per_class", "confusion_matrix", "top_losses"} <= set(m[split])
        assert confusion_counts(run / f"confusion_{split}.svg") == m[split]["confusion_matrix"]
        assert (run / f"top_losses_{split}.csv").exists()
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] == 6
    assert m["selected"]["C"] > 0
    saved = ModelFile.load(run / "model.featx")
    assert saved.head_config["preprocessing"].startswith("standardise") and saved.classes == ["a", "b"]
    assert saved.identity.layer == "pool" and len(saved.identity.weights_sha256) == 64


def test_predict_and_evaluate_use_the_model(fitted, dataset, tmp_path):
    m, run = fitted
    results = predictor.predict(run / "model.featx", [dataset / "val" / "b" / "000.jpg", dataset / "val" / "a"], top_k=2,
                            plot=str(tmp_path / "grid.png"))
    assert [r["label"] for r in results] == ["b", "a", "a", "a"]
    assert all(0.5 < r["probability"] <= 1 for r in results) and len(results[0]["top_k"]) == 2
    assert (tmp_path / "grid.png").stat().st_size > 1000
    ev = predictor.evaluate(run / "model.featx", str(dataset), "test", cache_dir=tmp_path / "c", progress=False)
    assert ev["test"]["confusion_matrix"] == m["test"]["confusion_matrix"]


def test_model_file_tampering_is_refused(fitted, tmp_path):
    path = fitted[1] / "model.featx"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "tampered.featx").write_bytes(bytes(raw))
    with pytest.raises(FeatxError, match="fails its SHA-256 check"):
        ModelFile.load(tmp_path / "tampered.featx")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickle.featx")
    with pytest.raises(FeatxError, match="is not a featx model file"):
        ModelFile.load(tmp_path / "pickle.featx")


def test_features_of_another_backbone_are_refused(fitted, tmp_path):
    other = save_tiny_weights(tmp_path / "other.pth")
    torch.save({k: v + 1 for k, v in torch.load(other, weights_only=True).items()}, other)
    with pytest.raises(FeatxError, match="weights_sha256 differ"):
        predictor.load_predictor(fitted[1] / "model.featx", weights=str(other))


def test_select_on_val_reports_test_only(tiny, dataset, tmp_path):
    m = fit.fit_head("svm", backbone=tiny, data=str(dataset), cache_dir=tmp_path / "c", out=tmp_path / "r",
                       select_on="val", progress=False)
    assert "val" not in m and m["test"]["accuracy"] == 1.0 and m["selected"]["select_on"] == "val"


@pytest.mark.parametrize("clf", ["knn", "mlp"])
def test_cli_fit_head_json(tiny, dataset, tmp_path, clf):
    r = featx.extract(tiny, str(dataset), cache_dir=tmp_path / "c", progress=False, workers=0)
    res = CliRunner().invoke(cli, ["fit-head", "--clf", clf, "--features", r.path, "--out", str(tmp_path / clf),
                                   "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["test"]["accuracy"] == 1.0 and payload["model"].endswith("model.featx")
    res = CliRunner().invoke(cli, ["predict", "--model", payload["model"], str(dataset / "test" / "a" / "000.jpg")])
    assert res.exit_code == 0, res.output
    assert res.stdout.split("\t")[1].startswith("a ")


def test_fit_head_needs_train_split(tiny, tmp_path):
    from helpers import make_dataset
    data = make_dataset(tmp_path / "d", {"val": 3, "test": 3})
    r = featx.extract(tiny, str(data), cache_dir=tmp_path / "c", progress=False, workers=0)
    with pytest.raises(FeatxError, match="has no train split"):
        fit.fit_head("logreg", features=r.path)
    assert store.load(r.path).X.shape[0] == 12
    assert np.isfinite(store.load(r.path).X).all()


def test_evaluate_refuses_unknown_classes_before_extracting(fitted, tmp_path):
    from helpers import make_dataset
    other = make_dataset(tmp_path / "other", {"test": 2}, classes=("a", "zebra"))
    with pytest.raises(FeatxError, match=r"classes the model does not know \(zebra\)"):
        predictor.evaluate(fitted[1] / "model.featx", str(other), cache_dir=tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_predict_exit_code_and_tab_safe_output(fitted, dataset, tmp_path):
    model_file = str(fitted[1] / "model.featx")
    odd = tmp_path / "a\tb\nc.jpg"
    odd.write_bytes((dataset / "test" / "a" / "000.jpg").read_bytes())
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    res = CliRunner().invoke(cli, ["predict", "--model", model_file, str(odd), str(tmp_path / "junk.jpg")])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0].endswith("a\\tb\\nc.jpg") and lines[0].split("\t")[1][0] == "a"
    assert "junk.jpg: could not be read" in res.stderr
    from featx.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", model_file, str(tmp_path / "junk.jpg")])
    assert exit_info.value.code == 2


def test_broken_symlinks_in_a_dataset_are_listed_as_skipped(tiny, dataset, tmp_path):
    (dataset / "train" / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (dataset / "train" / "b" / "loop.jpg").symlink_to(dataset / "train" / "b" / "loop.jpg")
    r = featx.extract(tiny, str(dataset), cache_dir=tmp_path / "c", progress=False, workers=0)
    reasons = {s["path"]: s["reason"] for s in r.skipped_files}
    assert reasons["train/a/gone.jpg"].startswith("dangling symlink") and r.images == 24
    assert reasons["train/b/loop.jpg"].startswith("symlink loop") and r.skipped == 2


def test_features_of_another_feature_code_version_are_refused(fitted, monkeypatch):
    from featx import modelfile

    assert ModelFile.load(fitted[1] / "model.featx").identity.code == modelfile.FEATURE_CODE
    monkeypatch.setattr(modelfile, "FEATURE_CODE", "2")  # as if featx's preprocessing or tap code had changed
    with pytest.raises(FeatxError, match=r"feature code 1, and this featx computes version 2: refit it"):
        ModelFile.load(fitted[1] / "model.featx")


def test_random_networks_are_named_by_their_tensors(tiny):
    torch.manual_seed(1)
    one = featx.create_backbone(tiny, pretrained=False)
    torch.manual_seed(2)
    two = featx.create_backbone(tiny, pretrained=False)
    assert one.identity().weights == two.identity().weights == "random"
    assert len(one.identity().weights_sha256) == 64
    assert one.identity().digest() != two.identity().digest()  # two caches and two ONNX exports, never one


def test_fit_head_summary_says_each_warning_on_a_line_of_its_own():
    from featx.report.summary import selection_line

    line = selection_line({"C": 1e4, "selection": "5-fold stratified cross-validation on train", "select_on": "cv",
                           "cv_accuracy": 0.9, "scored_rows": 100, "edge": "C at the largest value tried (10000)",
                           "warnings": ["3 of 86 fits stopped at their iteration limit before converging"]})
    assert line.splitlines()[1:] == ["warning: C at the largest value tried (10000)",
                                     "warning: 3 of 86 fits stopped at their iteration limit before converging"]


def test_evaluate_refuses_a_split_the_data_lacks_before_building_the_backbone(tmp_path, monkeypatch):
    """The split is checked on the folder's listing: no backbone is built and nothing extracted."""
    from featx.serve import predictor as predictor_mod

    data = make_dataset(tmp_path / "d", {"train": 2, "test": 2})
    model = tmp_path / "m.featx"
    monkeypatch.setattr(predictor_mod, "load_predictor", lambda path, weights=None: types.SimpleNamespace(
        classes=["a", "b"]))  # no backbone, no head: the check must come before either is used
    with pytest.raises(FeatxError, match=r"has no 'val' split \(it has train, test\): pass --split"):
        predictor_mod.evaluate(model, str(data), "val", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    from featx.errors import listed

    assert listed(list("abcdefg"), 5) == "a, b, c, d, e and 2 more" and listed(["a"]) == "a"
