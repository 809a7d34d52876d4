"""The boundary cache (issue 27): the frozen part runs once per image and view; epochs train from the cache."""
from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featx
from featx.finetuning import boundary
from featx.finetuning import training as ft
from featx.cli import cli
from featx.extraction.specs import BackboneSpec, Preprocess, Tap, Weights

import helpers

EPOCHS = 3


def run(tiny, data, tmp_path, name, unfreeze="block2", **kw):
    options = {"epochs": EPOCHS, "lr": 0.05, "backbone_lr_scale": 1.0, "workers": 0, "progress": False,
               "head": "none", "cache_dir": tmp_path / "cache", "augment": "none", "runtime": "torch", **kw}
    return ft.finetune(tiny, str(data), unfreeze, out=tmp_path / name, **options)


def same_history(a: dict, b: dict) -> None:
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([h[key] for h in a["history"]], [h[key] for h in b["history"]], rtol=1e-5,
                                   err_msg=key)


def cached_rows(m: dict) -> dict:
    rows = {}
    for path in m["boundary_cache"]["files"]:
        with h5py.File(path) as f:
            rows[f.attrs["view"]] = (f["features"].shape, list(f["splits"].asstr()[:]))
    return rows


def test_without_augmentation_the_cached_run_is_the_uncached_one(tiny, dataset, tmp_path, one_torch_thread):
    cached = run(tiny, dataset, tmp_path, "cached")
    whole = run(tiny, dataset, tmp_path, "whole", boundary_cache=False)
    assert cached["boundary_cache"]["used"] and not whole["boundary_cache"]["used"]
    assert cached["boundary_cache"]["module"] == "block2"
    assert cached["boundary_cache"]["frozen"] == ["stem", "block1"]
    same_history(cached, whole)
    # one plain view of every train and val image (6 + 3 per class), 16 channels at 16 x 16, none of test
    (shape, splits), = cached_rows(cached).values()
    assert shape == (18, 16 * 16 * 16) and set(splits) == {"train", "val"}
    assert cached["val"]["accuracy"] == whole["val"]["accuracy"]


def test_views_are_the_uncached_epochs_augmentation(tiny, dataset, tmp_path, one_torch_thread):
    """View k is drawn as an uncached run draws epoch k: with as many views as epochs, the runs are equal; with
    fewer, epoch e trains on view e mod views and the histories part after the first views."""
    cached = run(tiny, dataset, tmp_path, "views", augment="light", views=EPOCHS)
    whole = run(tiny, dataset, tmp_path, "whole", augment="light", boundary_cache=False)
    same_history(cached, whole)
    rows = cached_rows(cached)
    assert sorted(rows) == ["light-seed0-view0", "light-seed0-view1", "light-seed0-view2", "plain"]
    assert rows["plain"][0][0] == 6 and rows["light-seed0-view1"][0][0] == 12
    fewer = run(tiny, dataset, tmp_path, "two", augment="light", views=2)
    assert fewer["boundary_cache"]["rows_computed"] == 0  # views 0 and 1 are already there
    np.testing.assert_allclose(fewer["history"][1]["train_loss"], whole["history"][1]["train_loss"], rtol=1e-5)
    assert fewer["history"][2]["train_loss"] != pytest.approx(whole["history"][2]["train_loss"], rel=1e-5)


def test_on_a_cpu_onnx_runtime_computes_the_same_rows(tiny, dataset, tmp_path):
    """The default runtime on a CPU runs the frozen part as a checked ONNX export (made once, under cache/onnx):
    its rows equal torch's to float precision."""
    by_torch = run(tiny, dataset, tmp_path / "t", "torch", epochs=1)
    by_onnx = run(tiny, dataset, tmp_path / "o", "onnx", epochs=1, runtime="auto")
    exports = list((tmp_path / "o" / "cache" / "onnx").glob("tiny__boundary:block2__*.onnx"))
    assert len(exports) == 1
    with h5py.File(by_torch["boundary_cache"]["files"][0]) as a, h5py.File(by_onnx["boundary_cache"]["files"][0]) as b:
        assert list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:])
        np.testing.assert_allclose(b["features"][:], a["features"][:], atol=1e-5)
        assert exports[0].name in b.attrs["onnx_exports"]


def test_the_cache_is_reused_and_grows_with_the_data(tiny, tmp_path):
    data = helpers.make_dataset(tmp_path / "data", {"train": 5, "val": 2})
    first = run(tiny, data, tmp_path, "first", epochs=2, augment="light", views=2)
    assert first["boundary_cache"]["rows_computed"] == 2 * 10 + 4
    again = run(tiny, data, tmp_path, "again", epochs=2, augment="light", views=2)
    assert again["boundary_cache"]["rows_computed"] == 0
    helpers.colour_image(0, np.random.default_rng(9)).save(data / "train" / "a" / "new.jpg")
    grown = run(tiny, data, tmp_path, "grown", epochs=2, augment="light", views=2)
    assert grown["boundary_cache"]["rows_computed"] == 2  # the new image, in each of the two views
    assert {shape[0] for shape, _ in cached_rows(grown).values()} == {11, 4}


def test_a_damaged_cache_file_is_computed_again(tiny, dataset, tmp_path, capfd):
    first = run(tiny, dataset, tmp_path, "first", epochs=1)
    path = first["boundary_cache"]["files"][0]
    with h5py.File(path, "r+") as f:
        f["labels"][0] = 1 - f["labels"][0]  # one changed label fails the file's checksum
    again = run(tiny, dataset, tmp_path, "again", epochs=1)
    assert "is damaged" in capfd.readouterr().err
    assert again["boundary_cache"]["rows_computed"] == 18
    same_history(first, again)


def test_over_the_budget_fewer_views_then_the_whole_network(tiny, dataset, tmp_path):
    row = 16 * 16 * 16 * 4  # bytes of one boundary row
    views3 = (12 * 3 + 6) * row  # three views of 12 training images, one of 6 val images
    fewer = run(tiny, dataset, tmp_path, "fewer", epochs=4, augment="light", views=4, boundary_cache_gb=views3 / 1e9)
    assert fewer["boundary_cache"]["views"] == 3 and "(not 4" in fewer["boundary_cache"]["note"]
    assert run(tiny, dataset, tmp_path, "one", epochs=1, augment="light", views=4)["boundary_cache"]["views"] == 1
    none = run(tiny, dataset, tmp_path, "none", epochs=1, augment="light", boundary_cache_gb=row / 1e9)
    assert not none["boundary_cache"]["used"]
    assert "whole network" in none["boundary_cache"]["note"] and none["history"][0]["train_accuracy"] > 0
    plain = run(tiny, dataset, tmp_path, "plain", epochs=1, boundary_cache_gb=17 * row / 1e9)  # 18 rows needed
    assert not plain["boundary_cache"]["used"] and "--boundary-cache-gb" in plain["boundary_cache"]["note"]


def test_unfreeze_none_caches_the_features_and_all_caches_nothing(tiny, dataset, tmp_path):
    head_only = run(tiny, dataset, tmp_path, "none", epochs=1, unfreeze="none")
    assert head_only["boundary_cache"]["module"] is None and head_only["boundary_cache"]["shape"] == [32]
    everything = run(tiny, dataset, tmp_path, "all", epochs=1, unfreeze="all")
    assert not everything["boundary_cache"]["used"]
    assert "nothing below the unfrozen blocks is frozen" in everything["boundary_cache"]["note"]


class SkipNet(helpers.TinyNet):
    """block2's output plus the stem's: the top part needs more than block2's input."""

    def forward(self, x):
        stem = self.stem(x)
        out = self.block2(self.block1(stem))
        return self.fc(self.flatten(self.pool(out) + self.pool(stem).mean(1, keepdim=True)))


def test_a_network_whose_top_part_needs_more_than_the_boundary_is_not_cut():
    spec = BackboneSpec("skip", "tiny", SkipNet, Weights("file", "-"), Preprocess(32, 32), 32,
                        {"pool": Tap("fc", "input")}, "pool", {"stem": ["stem"], "block1": ["block1"],
                                                              "block2": ["block2"]}, "fc")
    net = featx.extraction.network.Backbone(spec, SkipNet(), "pool", spec.preprocess, "w", "sha")
    why = boundary.find_cut(net, lambda name: name.startswith("block2"))
    assert why == "the features are not a function of what block2 receives alone"
    plain = featx.extraction.network.Backbone(spec, helpers.TinyNet(), "pool", spec.preprocess, "w", "sha")
    cut = boundary.find_cut(plain, lambda name: name.startswith("block2"))
    assert cut.module == "block2" and cut.frozen == ["stem", "block1"]
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(cut.resume(plain, cut.capture(plain, images)), plain(images))
    assert all(isinstance(m, nn.Module) and not isinstance(m, boundary.Replay) for m in plain.model.children())


def test_cli_flags(tiny, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["finetune", "--backbone", tiny, "--data", str(dataset), "--unfreeze", "block2", "--epochs", "2",
            "--workers", "0", "--head", "none", "--json"]
    out = CliRunner().invoke(cli, base + ["--views", "2", "--boundary-cache-gb", "1", "--out", "a"])
    assert out.exit_code == 0, out.output
    assert '"views": 2' in out.output and '"used": true' in out.output
    out = CliRunner().invoke(cli, base + ["--no-boundary-cache", "--out", "b"])
    assert out.exit_code == 0 and '"used": false' in out.output
    out = CliRunner().invoke(cli, base + ["--views", "0", "--out", "c"])
    assert out.exit_code == 2 and "--views" in out.output


def flush_every_batch():
    boundary.CHECKPOINT_SECONDS = -1


def test_a_boundary_pass_killed_midway_keeps_its_rows(tiny, tiny_weights, tmp_path, one_torch_thread):
    """Rows reach part files batch by batch; a run after a kill computes only what is missing, and trains as an
    uninterrupted run does."""
    data = helpers.make_dataset(tmp_path / "d", {"train": 12, "val": 3})
    cache = tmp_path / "cache"
    args = ["finetune", "--backbone", "tiny", "--data", data, "--unfreeze", "block2", "--epochs", "1", "--workers",
            "0", "--batch-size", "2", "--runtime", "torch", "--augment", "none", "--cache-dir", cache, "--head",
            "none", "--quiet"]
    proc = helpers.forked_cli(args + ["--out", tmp_path / "killed"], tiny_weights, delay=0.2, before=flush_every_batch)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(cache.glob("boundary/*.part*.h5"))) < 2:
        time.sleep(0.02)
    proc.kill()
    proc.join()
    kept = 0
    for part in cache.glob("boundary/*.part*.h5"):
        with h5py.File(part) as f:
            kept += f["features"].shape[0]
    assert 2 <= kept < 30
    options = {"epochs": 1, "workers": 0, "batch_size": 2, "runtime": "torch", "augment": "none", "head": "none",
               "progress": False}
    again = ft.finetune(tiny, str(data), "block2", out=tmp_path / "again", cache_dir=cache, **options)
    assert again["boundary_cache"]["rows_computed"] == 30 - kept
    whole = ft.finetune(tiny, str(data), "block2", out=tmp_path / "whole", cache_dir=tmp_path / "fresh", **options)
    same_history(again, whole)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121", "convnext_tiny", "mobilenet_v3_large"])
def test_every_family_is_cut_at_its_top_blocks(name):
    """The traced cut, proved by replaying it, on the registry's own architectures (random weights, 64 px)."""
    from featx.finetuning.training import in_blocks, parse_unfreeze

    net = featx.create_backbone(name, pretrained=False, input_size=64).eval()
    blocks = parse_unfreeze("top:2", net)
    cut = boundary.find_cut(net, lambda module: in_blocks(module, net, blocks))
    assert isinstance(cut, boundary.Cut), cut
    assert in_blocks(cut.module, net, blocks[:1]) and not any(in_blocks(m, net, blocks) for m in cut.frozen)
