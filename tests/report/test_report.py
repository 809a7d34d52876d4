import os
import warnings

import numpy as np
import pytest

from featx.files import atomic_write
from featx.report.metrics import classification_metrics, expected_calibration_error


def test_absent_classes_do_not_count_and_nothing_leaks_to_stderr():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1])  # "c" is absent from this split, but predicted once
    proba = np.array([[.9, .05, .05], [.1, .1, .8], [.1, .8, .1], [.2, .7, .1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, proba, classes)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 1.0]))  # a: P 1, R 1/2; b: P 1, R 1; c absent
    assert m["predicted_absent"] == ["c"] and m["classes_present"] == 2


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    y = np.array([0] * 8 + [1] * 2)
    honest = np.tile([0.8, 0.2], (10, 1))  # 80% sure, right 80% of the time
    assert expected_calibration_error(honest, y) == pytest.approx(0.0)
    assert expected_calibration_error(np.tile([0.99, 0.01], (10, 1)), y) == pytest.approx(0.19)


def test_atomic_write_uses_a_per_process_name_and_cleans_up(tmp_path):
    target = tmp_path / "model.featx"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            assert str(os.getpid()) in tmp.name
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_writes_follow_the_umask(tmp_path):
    import numpy as np

    from featx.identity import FeatureIdentity
    from featx.modelfile import ModelFile

    old = os.umask(0o027)
    try:
        path = ModelFile("head", ["a", "b"], FeatureIdentity("b", "w", "s", "l", "t"), {}, {"kind": "logreg"},
                         {"coef": np.zeros((2, 2))}).save(tmp_path / "model.featx")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_the_confusion_svg_draws_the_matrix_and_escapes_names():
    import xml.etree.ElementTree as ET

    from featx.report.page import confusion_svg, curves_svg

    rng = np.random.default_rng(0)
    ns = "{http://www.w3.org/2000/svg}"
    for k in (2, 17, 120):  # every cell up to 30 classes, counts written in them; above, the non-zero cells only
        matrix = rng.integers(0, 9, (k, k)) * (rng.random((k, k)) < 0.5)
        classes = [f'<"class" & {i}>\x07' + "x" * 40 for i in range(k)]  # quotes, a control character, long
        root = ET.fromstring(confusion_svg(matrix, classes, "val: accuracy 0.5"))
        cells = [r.find(f"{ns}title").text for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
        shown = [c.replace("\x07", "\ufffd") for c in classes]
        assert cells == [f"true {shown[i]}, predicted {shown[j]}: {matrix[i, j]}" for i in range(k) for j in range(k)
                         if k <= 30 or matrix[i, j]]
        texts = [t.text for t in root.iter(f"{ns}text")]
        assert texts.count(shown[k - 1][:32]) == 2  # a row and a column label, shortened
        assert (sum(t.isdigit() for t in texts) == k * k) == (k <= 30)
        assert float(root.get("width")) >= 8 * len("val: accuracy 0.5")  # the title fits
    curve = ET.fromstring(curves_svg([{"train_loss": 1.0, "val_loss": float("nan")}, {"train_loss": 0.5,
                                                                                      "val_loss": 0.7}], "loss"))
    assert "nan" not in ET.tostring(curve, encoding="unicode") and curve.find(f"{ns}title").text == \
        "loss per epoch (0.500 – 1.000)"
