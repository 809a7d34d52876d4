import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import featx
from featx.extraction import backbones
from featx.extraction import network
from featx.errors import FeatxError


def test_registry_names_and_contract():
    names = {b["name"] for b in featx.list_backbones()}
    expected = {"vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_b0",
                "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "mobilenet_v3_large", "densenet121",
                "convnext_tiny", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert expected <= names
    vgg = backbones.get_spec("vgg16")
    assert list(vgg.blocks)[:5] == [f"block{i}" for i in range(1, 6)]
    assert {"pool5", "fc6", "fc7"} <= set(vgg.taps) and vgg.default_tap == "fc7"
    assert list(backbones.get_spec("resnet50").blocks) == ["stem", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name,layer,size,dim", [
    ("vgg16", "pool5", 150, 8192), ("vgg16", "fc7", 150, 4096), ("vgg16", "block4", 64, 512),
    ("resnet18", "avgpool", 64, 512), ("resnet18", "layer2", 64, 128), ("efficientnet_b0", "pool", 64, 1280),
    ("mobilenet_v3_large", "pool", 64, 960), ("densenet121", "pool", 64, 1024), ("convnext_tiny", "pool", 64, 768),
    ("efficientnet_lite0", "block5", 64, 112), ("efficientnet_lite0", "pool", 64, 1280),
    ("resnet18", "logits", 64, 1000),
])
def test_taps_have_documented_dims(name, layer, size, dim):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = featx.create_backbone(name, layer, pretrained=False, input_size=size)
        out = net(torch.zeros(2, 3, size, size, dtype=torch.uint8))
    assert out.shape == (2, dim)
    if layer == net.spec.default_tap:
        assert dim == net.spec.feature_dim


def test_every_block_names_real_parameters():
    for name in ("vgg16", "resnet18", "efficientnet_b0", "densenet121", "convnext_tiny", "efficientnet_lite0",
                 "mobilenet_v3_large"):
        with torch.device("meta"):  # names only
            net = featx.create_backbone(name, pretrained=False)
        for block in net.spec.blocks:
            assert net.block_parameters(block), f"{name}:{block} selects no parameters"


def test_unknown_backbone_and_layer():
    with pytest.raises(FeatxError, match="unknown backbone 'nope'.*vgg16"):
        featx.create_backbone("nope")
    with pytest.raises(FeatxError, match="no layer 'x'.*layer1"):
        featx.create_backbone("resnet18", "x", pretrained=False)


def test_missing_torchvision_weights_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FeatxError) as err:
        featx.create_backbone("resnet18")
    msg = str(err.value)
    assert "\n" not in msg and "put resnet18-f37072fd.pth in" in msg and str(tmp_path) in msg and "--weights" in msg
    assert capsys.readouterr().err == ""  # nothing printed before the one line (torch's "Downloading: ...")


def test_torchvision_weights_load_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    state = featx.create_backbone("resnet18", pretrained=False).model.state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert backbones.describe(backbones.get_spec("resnet18"))["weights_available"]
    net = featx.create_backbone("resnet18")
    assert torch.equal(net.model.conv1.weight, state["conv1.weight"])
    assert net.weights_id == "ResNet18_Weights.IMAGENET1K_V1" and len(net.weights_sha256) == 64


def test_weights_file(tmp_path, tiny, tiny_weights):
    net = featx.create_backbone(tiny)
    assert torch.equal(net.model.stem[0].weight, torch.load(tiny_weights, weights_only=True)["stem.0.weight"])
    with pytest.raises(FeatxError, match="does not fit resnet18"):
        featx.create_backbone("resnet18", weights=str(tiny_weights))
    (tmp_path / "junk.pth").write_bytes(b"not a tensor file")
    with pytest.raises(FeatxError, match="junk.pth is not a readable weights file"):
        featx.create_backbone("resnet18", weights=str(tmp_path / "junk.pth"))


def test_preprocess_carries_weights_config():
    assert backbones.get_spec("efficientnet_b0").preprocess.interpolation == "bicubic"
    pre = backbones.get_spec("resnet50").preprocess
    assert (pre.input_size, pre.resize_size) == (224, 232)
    lite = backbones.get_spec("efficientnet_lite0").preprocess
    assert lite.mean == backbones.TF_LITE_MEAN


BLOCK_MAP_NAMES = ["vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "densenet121", "convnext_tiny",
                   "efficientnet_lite0", "timm:efficientnet_b0", "timm:resnet50", "timm:mobilenetv3_large_100",
                   "timm:convnext_tiny", "timm:vit_tiny_patch16_224", "timm:regnety_002"]


@pytest.mark.parametrize("name", BLOCK_MAP_NAMES)
def test_blocks_partition_every_parameter_and_pool_has_feature_dim(name):
    """Every parameter on the image-to-features path is in exactly one block, no block is empty
    (so --unfreeze all trains everything), and the default (pooled) tap has the spec's feature_dim."""
    spec = backbones.get_spec(name)
    with torch.device("meta"):
        model = spec.build()
    names = [n for n, _ in model.named_parameters() if not n.startswith(spec.classifier + ".")]
    owners = {n: [b for b, prefixes in spec.blocks.items() if any(n == q or n.startswith(q + ".") for q in prefixes)]
              for n in names}
    assert {n: o for n, o in owners.items() if len(o) != 1} == {}
    assert sorted({o[0] for o in owners.values()}) == sorted(spec.blocks)
    net = network.Backbone(spec, model, spec.default_tap, spec.preprocess, "random", "none").to("meta")
    size = spec.preprocess.input_size
    assert net(torch.zeros(2, 3, size, size, dtype=torch.uint8, device="meta")).shape == (2, spec.feature_dim)


def test_order_mapping_checks_every_position(tiny_weights):
    from featx.extraction.weights import map_by_order

    target = torch.load(tiny_weights, weights_only=True)
    renamed = {f"t{i}": v for i, v in enumerate(target.values())}
    assert list(map_by_order(renamed, target, tiny_weights, "pkg")) == list(target)
    keys = list(renamed)
    assert list(target)[3] == "stem.1.bias" and list(target)[5] == "stem.1.running_var"
    swapped = dict(renamed)
    swapped["t3"], swapped["t5"] = renamed["t5"], renamed["t3"]  # same shape: a count check cannot see it
    with pytest.raises(FeatxError, match=r"t5 lands on stem.1.running_var but is not a variance\): reinstall pkg"):
        map_by_order(swapped, target, tiny_weights, "pkg")
    shuffled = dict(zip(keys, [renamed[keys[1]], renamed[keys[0]], *list(renamed.values())[2:]]))
    with pytest.raises(FeatxError, match=r"lands on stem.0.weight"):
        map_by_order(shuffled, target, tiny_weights, "pkg")


def test_weights_with_another_classifier_shape_is_one_line(tiny, tiny_weights, tmp_path):
    state = torch.load(tiny_weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(2, 32), torch.zeros(2)
    torch.save(state, tmp_path / "two_classes.pth")
    with pytest.raises(FeatxError, match=r"fc.weight \(2, 32\) \(needs \(10, 32\)\), fc.bias"):
        featx.create_backbone(tiny, weights=str(tmp_path / "two_classes.pth"))


@pytest.mark.parametrize("name", sorted(backbones.TORCHVISION_WEIGHTS))
def test_recorded_torchvision_weights_match_torchvision(name):
    """The registry records torchvision's DEFAULT weights as data (so reading it imports no torchvision);
    every field must still be torchvision's own."""
    import torchvision

    w = torchvision.models.get_model_weights(name).DEFAULT
    t = w.transforms()
    spec = backbones.get_spec(name)
    assert (spec.weights.ident, spec.weights.url) == (str(w), w.url)
    pre = spec.preprocess
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (t.crop_size[0], t.resize_size[0],
                                                                     t.interpolation.value)
    assert (pre.mean, pre.std) == (tuple(t.mean), tuple(t.std))


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "xdg"}, {"TORCH_HOME": "th", "XDG_CACHE_HOME": "xdg"}])
def test_hub_dir_without_torch_is_torchs(env, tmp_path, monkeypatch):
    from featx.extraction.weights import torch_hub_dir

    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / value))
    expected = torch.hub.get_dir()
    monkeypatch.delitem(sys.modules, "torch")  # as in a process that has not loaded torch
    assert torch_hub_dir() == Path(expected)


@pytest.mark.parametrize("pre", [backbones.Preprocess(224, 256), backbones.Preprocess(288, 288, "bicubic"),
                                 backbones.Preprocess(64, 48), backbones.get_spec("efficientnet_lite1").preprocess])
def test_pillow_preprocessing_equals_torchvisions(pre):
    """predict's torch-free path decodes with Pillow alone; its pixels must be exactly torchvision's."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for w, h in [(150, 150), (500, 333), (333, 500), (101, 37), (50, 300), (pre.input_size, pre.input_size)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(pre.pil_array(img), pre.transform()(img).numpy()), (w, h)
