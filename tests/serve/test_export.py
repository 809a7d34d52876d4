"""``featx export``: one ONNX file per model whose probabilities are featx's, refused when tampered with."""
import json

import numpy as np
import onnx
import pytest

import featx
from featx.serve.export import export_model
from featx.serve.onnxfile import load_exported
from featx.heads.fit import fit_head
from featx.serve.predictor import predict
from helpers import make_dataset


@pytest.fixture
def colours(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 8, "test": 4}, classes=("a", "b", "c"))
    return data, featx.extract(tiny, str(data), cache_dir=tmp_path / "c", workers=0, progress=False).path


def probabilities(model, images):
    return np.array([[t["probability"] for t in sorted(r["top_k"], key=lambda t: t["label"])]
                     for r in predict(model, images, top_k=3)])


@pytest.mark.parametrize("clf", ["logreg", "svm", "mlp"])
def test_an_exported_head_gives_featxs_probabilities(colours, tmp_path, clf):
    data, features = colours
    fit_head(clf, features=features, out=tmp_path / clf, progress=False)
    exported = export_model(tmp_path / clf / "model.featx")
    images = sorted((data / "test").rglob("*.jpg"))
    np.testing.assert_allclose(probabilities(exported, images), probabilities(tmp_path / clf / "model.featx", images),
                               atol=1e-4)
    meta = load_exported(exported)
    assert json.loads(meta["classes"]) == ["a", "b", "c"] and meta["input_size"] == "32"
    if clf == "logreg":  # a fixed batch, for runtimes that want static shapes
        fixed = export_model(tmp_path / clf / "model.featx", tmp_path / "fixed.onnx", batch=2)
        shape = onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in shape] == [2, 3, 32, 32] and load_exported(fixed)["batch"] == "2"
        np.testing.assert_allclose(probabilities(fixed, images[:3]), probabilities(exported, images[:3]), atol=1e-5)
        with pytest.raises(featx.FeatxError, match="--batch 0: use dynamic or a positive whole number"):
            export_model(tmp_path / clf / "model.featx", tmp_path / "bad.onnx", batch=0)


def test_a_fine_tuned_model_exports_too(tiny, colours, tmp_path):
    from featx.finetuning.training import finetune

    data, _ = colours
    m = finetune(tiny, str(data), "block2", epochs=1, out=tmp_path / "ft", workers=0, progress=False, head="none")
    exported = export_model(m["model"], tmp_path / "ft.onnx")
    images = sorted((data / "test").rglob("*.jpg"))
    np.testing.assert_allclose(probabilities(exported, images), probabilities(m["model"], images), atol=1e-4)


def test_knn_and_tampered_files_are_one_line(colours, tmp_path):
    _, features = colours
    fit_head("knn", features=features, out=tmp_path / "knn", progress=False)
    with pytest.raises(featx.FeatxError, match="a knn head does not export"):
        export_model(tmp_path / "knn" / "model.featx")
    fit_head("logreg", features=features, out=tmp_path / "lr", progress=False)
    exported = export_model(tmp_path / "lr" / "model.featx")
    graph = onnx.load(str(exported))
    graph.graph.initializer[0].raw_data = bytes(len(graph.graph.initializer[0].raw_data))  # zeroed weights
    onnx.save(graph, str(tmp_path / "tampered.onnx"))
    with pytest.raises(featx.FeatxError, match="fails its SHA-256 check"):
        predict(tmp_path / "tampered.onnx", [next((tmp_path / "d" / "test").rglob("*.jpg"))])
    (tmp_path / "other.onnx").write_bytes(b"not a model")
    with pytest.raises(featx.FeatxError, match="is not an ONNX model featx exported"):
        load_exported(tmp_path / "other.onnx")


def test_int8_is_decided_on_train_without_val_and_refused_when_it_costs(colours, tmp_path, monkeypatch):
    from featx.serve import export

    _, features = colours
    fit_head("logreg", features=features, out=tmp_path / "lr", progress=False)
    small = export_model(tmp_path / "lr" / "model.featx", tmp_path / "int8.onnx", quantize="int8")
    meta = load_exported(small)
    assert meta["quantized"] == "int8" and meta["quantize_decided_on"] == "train" and meta["train_images"] == "24"
    assert float(meta["train_accuracy_fp32"]) - float(meta["train_accuracy_int8"]) <= export.QUANTIZE_TOLERANCE
    assert meta["test_images"] == "12"  # reported after the decision
    assert predict(small, [next((tmp_path / "d" / "test").rglob("*.jpg"))])[0]["label"] in ("a", "b", "c")
    monkeypatch.setattr(export, "QUANTIZE_TOLERANCE", -1.0)  # any change is too much
    with pytest.raises(featx.FeatxError, match=r"int8 loses .* of accuracy on the model's 24 train images .*--force"):
        export_model(tmp_path / "lr" / "model.featx", tmp_path / "refused.onnx", quantize="int8")
    assert not (tmp_path / "refused.onnx").exists()
    assert load_exported(export_model(tmp_path / "lr" / "model.featx", tmp_path / "forced.onnx", quantize="int8",
                                      force=True))["quantized"] == "int8"


def test_a_backbone_that_does_not_export_is_one_line(colours, tmp_path, monkeypatch):
    import torch

    _, features = colours
    fit_head("logreg", features=features, out=tmp_path / "lr", progress=False)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(featx.FeatxError, match=r"^tiny:pool does not export to ONNX \(RuntimeError: Exporting the "
                       r"operator 'aten::fancy' .* is not supported.\): try another --opset"):
        export_model(tmp_path / "lr" / "model.featx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
