import json
import shlex
from functools import partial

import pytest
import torch
from torch import nn

import featx
from featx.heads.advice import advise
from featx.extraction.backbones import BackboneSpec, Preprocess, Tap, Weights
from helpers import TinyNet, make_dataset


def tiny_without_batchnorm() -> nn.Module:
    net = TinyNet()
    for block in (net.stem, net.block1, net.block2):
        block[1] = nn.Identity()
    return net


@pytest.fixture
def no_bn_backbone(tmp_path):
    torch.save(tiny_without_batchnorm().state_dict(), tmp_path / "nobn.pth")
    spec = BackboneSpec("tiny_nobn", "tiny", partial(tiny_without_batchnorm), Weights("file", str(tmp_path / "nobn.pth")),
                        Preprocess(32, 32), 32, {"block1": Tap("block1"), "block2": Tap("block2"),
                                                 "pool": Tap("fc", "input")}, "pool",
                        {"stem": ["stem"], "block1": ["block1"], "block2": ["block2"]}, "fc")
    return featx.register_backbone(spec).name


def test_classes_with_few_or_no_training_images_are_named_apart():
    from featx.heads.advice import training_warnings

    few, none = training_warnings(["a", "b", "c", "d"], [3, 0, 9, 1])
    assert few.startswith("2 classes have fewer than 5 training images (a, d)")
    assert none == "no training image for b: no head can predict it; add training images"
    assert training_warnings(["a"], [9]) == []


def test_few_shot_data_gets_a_warning_and_runnable_commands(tiny, tmp_path, monkeypatch):
    from featx.cli import main

    data = make_dataset(tmp_path / "few", {"train": 3, "test": 2}, classes=("a", "b", "c"))
    r = advise(str(data), tiny)
    assert r["scenario"] in (1, 3) and r["images_per_class"] == 3.0
    assert any("3 classes have fewer than 5 training images (a, b, c)" in w for w in r["warnings"])
    assert [t["layer"] for t in r["layers"]] == ["block1", "block2", "pool"] and r["probe"]["images"] == 9
    assert r["commands"] == [f"featx extract --backbone {tiny} --data {data} --layer {r['layer']}",
                             "featx fit-head --clf logreg"]
    monkeypatch.chdir(tmp_path)
    for command in r["commands"]:  # typed in order, they fit the head advise measured
        main(shlex.split(command)[1:] + ["--quiet"])
    fitted = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert fitted["selected"]["cv_accuracy"] == r["layers"][[t["layer"] for t in r["layers"]].index(r["layer"])][
        "accuracy"]


def test_advise_needs_several_taps(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 4})
    with pytest.raises(featx.FeatxError, match="--layer pool names one tap: advise compares several"):
        advise(str(data), tiny, layer="pool")


def test_backbone_without_batchnorm_measures_shift_with_lite0(no_bn_backbone, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 6, "val": 2})
    r = advise(str(data), no_bn_backbone)
    json.dumps(r, allow_nan=False)  # valid JSON: no NaN shift
    assert r["shift_backbone"] == "efficientnet_lite0" and r["shift"] > 0
    assert any("tiny_nobn has no BatchNorm layers" in w for w in r["warnings"])
    assert r["commands"][0].startswith(f"featx extract --backbone tiny_nobn --data {data}")
