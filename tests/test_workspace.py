"""The three commands users start from, typed as written in one project folder."""
import json

import pytest
import torch
from click.testing import CliRunner

from featx.extraction import backbones
from featx.extraction import network
from featx.cli import cli
from helpers import make_dataset, register_tiny_vgg16

THREE = ["extract --backbone vgg16 --data cats_dogs", "fit-head --clf svm", "finetune --unfreeze block4,block5"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder, FEATX_DATA holding a small cats_dogs, and vgg16 standing for a tiny VGG-shaped net."""
    make_dataset(tmp_path / "data" / "cats_dogs", {"train": 8, "val": 3, "test": 3}, classes=("cats", "dogs"))
    monkeypatch.setenv("FEATX_DATA", str(tmp_path / "data"))
    monkeypatch.setitem(backbones.REGISTERED, "vgg16", register_tiny_vgg16(tmp_path))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


def typed(line: str):
    return CliRunner().invoke(cli, line.split() + ["--json", "--quiet"])


def test_the_three_commands_work_as_written(project):
    runs = [typed(line) for line in THREE]
    assert [r.exit_code for r in runs] == [0, 0, 0], [r.output for r in runs]
    extracted, fitted, tuned = (json.loads(r.stdout) for r in runs)
    assert extracted["backbone"] == "vgg16" and extracted["layer"] == "fc7" and extracted["images"] == 28
    assert "using backbone vgg16 · data cats_dogs · layer fc7" in runs[1].stderr and fitted["test"]["n"] == 6
    assert fitted["features"] == extracted["path"]
    assert "starting the head from the last fit-head" in runs[2].stderr and "svm" in runs[2].stderr
    assert tuned["unfreeze"] == ["block4", "block5"] and tuned["test"]["n"] == 6


def test_explicit_flags_win_and_no_record_says_what_to_run(project):
    res = typed("fit-head --clf svm")
    assert "run 'featx extract --backbone NAME --data FOLDER' first" in str(res.exception)
    assert typed(THREE[0]).exit_code == 0
    res = typed("fit-head --clf logreg --layer fc6 --out runs/fc6")
    assert res.exit_code == 0 and "layer fc7" not in res.stderr and json.loads(res.stdout)["features"].find("fc6") > 0
    res = typed("finetune --unfreeze none --epochs 1 --head none --out runs/fresh")
    assert res.exit_code == 0 and "fresh (Xavier) head" in res.stderr


def test_block4_block5_reproduce_seed_s3_on_the_real_vgg16():
    """Conv blocks 4-5 and the head train; everything else is frozen (VGG16's layer sizes, built on meta)."""
    from featx.finetuning.training import FineTuneNet, training_setup, trainable, used_params

    spec = backbones.get_spec("vgg16")
    with torch.device("meta"):
        net = FineTuneNet(network.Backbone(spec, spec.build(), "fc7", spec.preprocess, "r", "n"),
                          torch.nn.Linear(4096, 2))
    training_setup(net, ["block4", "block5"], 1e-3, 0.1, "adamw", "cosine", 5, 7, 1e-4)
    conv = lambda cin, cout: 3 * 3 * cin * cout + cout  # noqa: E731
    block4, block5 = conv(256, 512) + 2 * conv(512, 512), 3 * conv(512, 512)
    assert trainable(net) == block4 + block5 + 4096 * 2 + 2 == 12_987_394
    assert used_params(net) == 138_357_544 - (4096 * 1000 + 1000) + 4096 * 2 + 2
    names = {n.split(".")[2] + "." + n.split(".")[3] for n, p in net.named_parameters() if p.requires_grad
             and n.startswith("backbone.")}
    assert names == {f"features.{i}" for i in (17, 19, 21, 24, 26, 28)}


def test_vgg_dropouts_follow_train_and_eval():
    from featx.finetuning.training import FineTuneNet

    spec = backbones.get_spec("vgg16")
    with torch.device("meta"):
        net = FineTuneNet(network.Backbone(spec, spec.build(), "fc7", spec.preprocess, "r", "n"),
                          torch.nn.Linear(4096, 2))
    net.trainable_blocks = ["fc"]
    net.train()
    assert net.backbone.model.classifier[2].training and net.backbone.model.classifier[5].training
    net.eval()
    assert not net.backbone.model.classifier[2].training


def test_a_command_given_backbone_and_data_reads_no_record(project):
    assert typed("extract --backbone vgg16 --data cats_dogs --layer fc6").exit_code == 0
    res = typed("fit-head --clf logreg --data cats_dogs --out runs/partial")  # backbone left out: fc6 comes along
    assert "__fc6__" in json.loads(res.stdout)["features"] and "layer fc6" in res.stderr
    res = typed("fit-head --clf logreg --backbone vgg16 --data cats_dogs --out runs/explicit")
    assert res.exit_code == 0 and "from the last extract" not in res.stderr
    assert "__fc7__" in json.loads(res.stdout)["features"]  # the default layer, not the recorded fc6


def test_fit_head_and_predict_follow_a_flip_extraction(tiny, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", {"train": 6, "test": 3})
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(cli, ["extract", "--backbone", tiny, "--data", str(data), "--tta", "flip", "--quiet", "--json"])
    assert done.exit_code == 0, done.output
    fitted = runner.invoke(cli, ["fit-head", "--clf", "logreg", "--quiet", "--json"])
    assert fitted.exit_code == 0, fitted.output
    result = json.loads(fitted.stdout)
    assert result["features"] == json.loads(done.stdout)["path"]
    from featx.modelfile import ModelFile
    from featx.serve.predictor import load_predictor

    assert ModelFile.load(result["model"]).identity.tta == "flip"
    predictor = load_predictor(result["model"])
    assert predictor.backbone.tta == "flip"


def test_predict_without_model_uses_the_last_fit_head(project, tmp_path):
    image = str(tmp_path / "data" / "cats_dogs" / "test" / "dogs" / "000.jpg")
    missing = CliRunner().invoke(cli, ["predict", image])
    assert missing.exit_code != 0 and "no --model given and no fit-head or auto ran in this folder" in str(missing.exception)
    assert [typed(line).exit_code for line in THREE[:2]] == [0, 0]
    fitted = json.loads((project / "cache" / "workspace.json").read_text())["fit_head"]["model"]
    res = CliRunner().invoke(cli, ["predict", image, "--json"])
    assert res.exit_code == 0 and f"using the last fitted model {fitted}" in res.stderr
    assert json.loads(res.stdout)["predictions"][0]["label"] in ("cats", "dogs")
