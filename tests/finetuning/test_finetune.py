import re
import time

import numpy as np
import pytest
import torch

import featx
from featx.finetuning import training as ft
from featx.heads import fit
from featx.serve import predictor
from featx.finetuning import warmstart
from featx.modelfile import ModelFile
from featx.errors import FeatxError
from helpers import forked_cli, make_dataset


def snapshot(net_model):
    return {k: v.detach().clone() for k, v in net_model.state_dict().items()}


def trained(tiny, dataset, tmp_path, unfreeze, **kw):
    before = snapshot(featx.create_backbone(tiny).model)
    m = ft.finetune(tiny, str(dataset), unfreeze, epochs=2, lr=0.05, backbone_lr_scale=1.0, out=tmp_path / "run",
                    workers=0, progress=False, **kw)
    saved = ModelFile.load(m["model"])
    after = {k: torch.as_tensor(v).reshape(before[k].shape) for k, v in saved.backbone_state.items()}
    return m, before, after


def test_only_named_blocks_change(tiny, dataset, tmp_path):
    m, before, after = trained(tiny, dataset, tmp_path, "block2")
    for name, value in before.items():
        if name.startswith("block2."):
            continue
        assert torch.equal(value, after[name]), f"{name} changed although frozen"
    changed = [n for n in before if n.startswith("block2.") and not torch.equal(before[n], after[n])]
    assert "block2.0.weight" in changed and "block2.1.running_mean" in changed
    assert m["unfreeze"] == ["block2"] and m["val"]["accuracy"] == 1.0


def test_unfreeze_none_trains_only_the_head(tiny, dataset, tmp_path):
    m, before, after = trained(tiny, dataset, tmp_path, "none", augment="strong")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m["trainable_params"] == 32 * 2 + 2


def test_unknown_block_lists_valid_names(tiny, dataset, tmp_path):
    with pytest.raises(FeatxError, match="has no block block9: choose from stem, block1, block2, all, none or top:N"):
        ft.finetune(tiny, str(dataset), "block9", out=tmp_path / "x", progress=False)
    with pytest.raises(FeatxError, match="top:N with N from 1 to 3"):
        ft.finetune(tiny, str(dataset), "top:4", out=tmp_path / "y", progress=False)


def test_top_n_names_the_last_blocks(tiny):
    net = featx.create_backbone(tiny)
    assert ft.parse_unfreeze("top:2", net) == ["block1", "block2"]
    with torch.device("meta"):  # names only
        assert ft.parse_unfreeze("top:2", featx.create_backbone("vgg16", pretrained=False)) == ["block5", "fc"]
        assert ft.parse_unfreeze("top:2", featx.create_backbone("efficientnet_lite0", pretrained=False)) == [
            "block7", "top"]


def test_outputs_and_model_file_work_with_predict_and_evaluate(tiny, dataset, tmp_path):
    m, _, _ = trained(tiny, dataset, tmp_path, "all")
    run = tmp_path / "run"
    for name in ("history.csv", "curves_loss.svg", "curves_accuracy.svg", "confusion_val.svg", "metrics.json"):
        assert (run / name).exists(), name
    assert len(m["history"]) == 2 and {"train_loss", "val_accuracy"} <= set(m["history"][0])
    preds = predictor.predict(m["model"], [dataset / "test" / "b"])
    assert [p["label"] for p in preds] == ["b"] * 3
    ev = predictor.evaluate(m["model"], str(dataset), "test", cache_dir=tmp_path / "c", progress=False)
    assert ev["test"]["accuracy"] == m["test"]["accuracy"]


def test_head_warm_start_reproduces_stage_two(tiny, dataset, tmp_path):
    stage2 = fit.fit_head("logreg", backbone=tiny, data=str(dataset), cache_dir=tmp_path / "c",
                            out=tmp_path / "s2", progress=False)
    net = featx.create_backbone(tiny)
    head = warmstart.head_from_model(stage2["model"], net, ["a", "b"])
    loaded = predictor.load_predictor(stage2["model"])
    X = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    with torch.no_grad():
        ours = torch.softmax(head(torch.as_tensor(X)), 1).numpy()
    np.testing.assert_allclose(ours, loaded.head.predict_proba(X), atol=1e-5)
    m = ft.finetune(tiny, str(dataset), "none", epochs=1, head=stage2["model"], out=tmp_path / "ft", workers=0,
                    progress=False)
    assert m["val"]["accuracy"] == 1.0


def test_imagenet_rows_seed_the_head(tiny, dataset, tmp_path):
    net = featx.create_backbone(tiny)
    logits_net = featx.create_backbone(tiny, "logits")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    head = warmstart.head_from_imagenet("imagenet:7,-", net, ["a", "b"])
    with torch.no_grad():
        seeded, logits = head(net(images)), logits_net(images)
    torch.testing.assert_close(seeded[:, 0], logits[:, 7])
    assert head.bias[1] == 0 and not torch.allclose(seeded[:, 1], logits[:, 7])
    m = ft.finetune(tiny, str(dataset), "none", epochs=1, head="imagenet:3,-", out=tmp_path / "ft", workers=0,
                    progress=False)
    assert ModelFile.load(m["model"]).info["finetune"]["head"] == "imagenet:3,-"


@pytest.mark.parametrize("rows, says", [("imagenet:1", "one ImageNet class per dataset class (a, b)"),
                                        ("imagenet:1,10", "'10' is not an index below 10"),
                                        ("imagenet:ant,-", "'ant' is not an index below 10")])
def test_imagenet_rows_errors_say_what_to_write(tiny, rows, says):
    with pytest.raises(FeatxError, match=re.escape(says)):
        warmstart.head_from_imagenet(rows, featx.create_backbone(tiny), ["a", "b"])


def test_from_scratch_trains_everything(tiny, dataset, tmp_path):
    m = ft.finetune(tiny, str(dataset), "none", from_scratch=True, epochs=1, out=tmp_path / "s", workers=0,
                    progress=False)
    assert m["trainable_params"] == m["total_params"]


def test_kill_and_resume_keeps_finished_epochs(tiny, tiny_weights, tmp_path, one_torch_thread):
    data = make_dataset(tmp_path / "d", {"train": 12, "val": 3})
    out = tmp_path / "run"
    proc = forked_cli(["finetune", "--backbone", "tiny", "--data", data, "--unfreeze", "block2", "--epochs", "6",
                       "--out", out, "--workers", "0", "--batch-size", "4", "--quiet"], tiny_weights, delay=0.05)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.kill()
    proc.join()
    done = (out / "history.csv").read_text().strip().splitlines()[1:]
    assert 1 <= len(done) < 6
    options = {"epochs": 6, "workers": 0, "batch_size": 4, "progress": False}  # the killed command's, in-process
    resumed = ft.finetune(tiny, str(data), "block2", out=out, resume=True, **options)
    history = resumed["history"]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    first = done[0].split(",")
    assert float(first[1]) == pytest.approx(history[0]["train_loss"])
    with pytest.raises(FeatxError, match="--resume"):
        ft.finetune(tiny, str(data), "block2", out=out, **options)
    uninterrupted = ft.finetune(tiny, str(data), "block2", out=tmp_path / "whole", **options)  # never killed
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert [h[key] for h in history] == pytest.approx([h[key] for h in uninterrupted["history"]], abs=1e-6)
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert resumed["val"]["log_loss"] == pytest.approx(uninterrupted["val"]["log_loss"], abs=1e-6)


def test_a_resume_right_after_the_checkpoint_reproduces_the_run_with_augmentation_and_workers(
        tiny, tiny_weights, tmp_path, one_torch_thread):
    """Killed as soon as epoch 1's checkpoint lands, with light augmentation drawn in two persistent DataLoader
    workers: the resumed run's history equals an uninterrupted run's (augmentation is seeded per image and
    epoch, not by whichever worker process draws it), and so does the patience count."""
    from featx.finetuning.checkpoints import read_checkpoint

    data = make_dataset(tmp_path / "d", {"train": 12, "val": 3})
    out = tmp_path / "run"
    argv = ["finetune", "--backbone", "tiny", "--data", data, "--unfreeze", "block2", "--epochs", "3", "--out", out,
            "--workers", "2", "--batch-size", "4", "--augment", "light", "--head", "none", "--patience", "5",
            "--quiet"]
    proc = forked_cli(argv, tiny_weights, delay=0.05, daemon=False)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.kill()
    proc.join()
    saved = read_checkpoint(out / "checkpoint.pt")
    assert saved["epoch"] == 0 and "since_best" in saved
    options = {"epochs": 3, "workers": 2, "batch_size": 4, "augment": "light", "head": "none", "patience": 5,
               "progress": False}
    resumed = ft.finetune(tiny, str(data), "block2", out=out, resume=True, **options)
    whole = ft.finetune(tiny, str(data), "block2", out=tmp_path / "whole", **options)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [h[key] for h in resumed["history"]] == pytest.approx([h[key] for h in whole["history"]], abs=1e-6)


def test_resume_says_which_option_differs_and_ignores_the_starting_head(tiny, dataset, one_epoch):
    # the head a run starts from is in its checkpoint's weights: a default that changed since (a later
    # fit-head in the folder) does not stop --resume
    m = ft.finetune(tiny, str(dataset), "block2", epochs=2, resume=True, head="imagenet:1,2", **one_epoch)
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    with pytest.raises(FeatxError, match=r"different finetune setup \(lr: 0.001 then, 0.01 now\)"):
        ft.finetune(tiny, str(dataset), "block2", epochs=3, resume=True, lr=0.01, **one_epoch)


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False)])
def test_fp16_scales_its_loss_and_bf16_does_not(tiny, dataset, tmp_path, precision, scaled):
    """fp16's range flushes small gradients to zero, so its loss goes through a GradScaler, whose state the
    checkpoint keeps for --resume; bf16 has fp32's range and needs none (autocast on the CPU here)."""
    from featx.finetuning.checkpoints import read_checkpoint

    kw = dict(out=tmp_path / precision, workers=0, progress=False, precision=precision)
    m = ft.finetune(tiny, str(dataset), "block2", epochs=1, **kw)
    saved = read_checkpoint(tmp_path / precision / "checkpoint.pt")["scaler"]
    assert bool(saved) is scaled and np.isfinite(m["history"][0]["train_loss"])
    # the boundary cache keeps fp16 rows as they are, and bf16 rows (not all exact in fp16) as fp32
    assert m["boundary_cache"]["dtype"] == ("float16" if precision == "fp16" else "float32")
    if scaled:
        assert saved["scale"] > 1
        resumed = ft.finetune(tiny, str(dataset), "block2", epochs=2, resume=True, **kw)
        assert len(resumed["history"]) == 2 and np.isfinite(resumed["history"][1]["train_loss"])


def test_a_training_step_out_of_device_memory_is_split_and_keeps_its_batch(tiny, dataset, tmp_path, monkeypatch):
    """Steps of 4 images that do not fit run as two halves with their gradients accumulated: the same
    steps, the same history (the head alone trains, so no BatchNorm sees the smaller parts)."""
    kw = dict(epochs=2, batch_size=4, workers=0, progress=False, augment="none", head="none")
    whole = ft.finetune(tiny, str(dataset), "none", out=tmp_path / "whole", **kw)
    real = ft.FineTuneNet.forward

    def small_device(self, images):
        if self.training and len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images)

    monkeypatch.setattr(ft.FineTuneNet, "forward", small_device)
    split = ft.finetune(tiny, str(dataset), "none", out=tmp_path / "split", **kw)
    assert split["notes"] == ["out of device memory at 4 images a step: continued with 2 at a time (gradients "
                              "accumulated, same step)"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [h[key] for h in split["history"]] == pytest.approx([h[key] for h in whole["history"]], abs=1e-5)


def test_resume_restores_the_generators_of_the_gpus_that_exist(tiny, tmp_path, monkeypatch):
    """Saved by a rank that saw two GPUs, resumed where one is visible: one generator restored, no crash."""
    from featx.finetuning import checkpoints

    net = featx.create_backbone(tiny, pretrained=False).model
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.get_rng_state(), torch.get_rng_state()])
    checkpoints.save_checkpoint(tmp_path / "c.pt", net, opt, sched, 0, checkpoints.Progress([]), {"epochs": 1})
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("indexes GPUs that are gone"))
    checkpoints.load_checkpoint(tmp_path / "c.pt", net, opt, sched, {"epochs": 1})
    assert restored == [0]


@pytest.mark.gpu
def test_fp16_fine_tuning_on_cuda_keeps_small_gradients(tiny, dataset, tmp_path):
    m = ft.finetune(tiny, str(dataset), "block2", epochs=2, out=tmp_path / "f", workers=0, progress=False,
                    precision="fp16", device="cuda")
    assert all(np.isfinite(h["train_loss"]) for h in m["history"])
    assert m["history"][1]["train_loss"] < m["history"][0]["train_loss"] + 0.05


def test_folders_without_val_carve_a_stable_share_of_train(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 10, "test": 3})
    m = ft.finetune(tiny, str(data), "none", epochs=2, out=tmp_path / "run", workers=0, progress=False)
    assert m["val_source"] == "15% of train, by path hash" and m["selected_on"] == "val"
    assert m["test"]["n"] == 6 and 1 <= m["val"]["n"] <= 8  # 15% of 20 on average, by hash
    from featx import data as data_mod
    from featx.report.metrics import summary_line
    carved = data_mod.load(str(data)).with_val_from_train(0.15)
    assert carved.splits == data_mod.load(str(data)).with_val_from_train(0.15).splits
    assert summary_line(m).startswith("val (chose the epoch, optimistic) acc")


def test_every_class_keeps_a_training_image_when_val_is_carved(tmp_path):
    from featx import data as data_mod
    data = make_dataset(tmp_path / "d", {"train": 1, "test": 1}, classes=tuple("abcdefgh"))
    carved = data_mod.load(str(data)).with_val_from_train(0.99)
    assert carved.counts == data_mod.load(str(data)).counts  # counts are of the scan; splits below
    assert all(("train", c) in {(s, carved.labels[i]) for i, s in enumerate(carved.splits)} for c in range(8))


def test_epoch_ties_go_to_the_lower_val_loss():
    progress = ft.Progress([])
    assert progress.improves({"val_accuracy": 0.9, "val_loss": 0.5})
    assert not progress.improves({"val_accuracy": 0.9, "val_loss": 0.6})
    assert progress.improves({"val_accuracy": 0.9, "val_loss": 0.4})
    assert not progress.improves({"val_accuracy": 0.8, "val_loss": 0.1})


@pytest.mark.gpu
def test_resume_on_cuda(tiny, dataset, tmp_path):
    kw = dict(epochs=2, out=tmp_path / "run", workers=0, progress=False, device="cuda")
    ft.finetune(tiny, str(dataset), "block2", **{**kw, "epochs": 1})
    m = ft.finetune(tiny, str(dataset), "block2", resume=True, **kw)
    assert [h["epoch"] for h in m["history"]] == [1, 2]


@pytest.fixture
def one_epoch(tiny, dataset, tmp_path):
    kw = dict(out=tmp_path / "run", workers=0, progress=False)
    ft.finetune(tiny, str(dataset), "block2", epochs=1, **kw)
    return kw


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "pickle"])
def test_a_damaged_checkpoint_is_one_line(tiny, dataset, one_epoch, damage):
    path = one_epoch["out"] / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    path.write_bytes({"flip": bytes(raw), "truncate": bytes(raw[:len(raw) // 3]), "empty": b""}.get(damage, b""))
    if damage == "pickle":
        torch.save({"net": {}}, path)
    with pytest.raises(FeatxError, match=r"checkpoint.pt (fails its SHA-256 check|is not a featx checkpoint)"):
        ft.finetune(tiny, str(dataset), "block2", epochs=2, resume=True, **one_epoch)


def test_resume_with_more_epochs_rebuilds_the_schedule(tiny, dataset, one_epoch, tmp_path):
    resumed = ft.finetune(tiny, str(dataset), "block2", epochs=3, resume=True, **one_epoch)
    clean = ft.finetune(tiny, str(dataset), "block2", epochs=3, out=tmp_path / "clean", workers=0, progress=False)
    # epoch 1 ran under the 1-epoch plan; from epoch 2 the rates are those of a clean 3-epoch run
    assert [h["lr"] for h in resumed["history"]][1:] == pytest.approx([h["lr"] for h in clean["history"]][1:])
    assert clean["history"][0]["lr"] == pytest.approx(1e-3)  # the lr column is the rate the epoch used


@pytest.mark.parametrize("option,value", [("lr", float("nan")), ("lr", -1.0), ("epochs", 0), ("batch_size", -4),
                                          ("weight_decay", -0.1), ("backbone_lr_scale", float("inf"))])
def test_numeric_options_are_validated_before_any_work(tiny, dataset, tmp_path, option, value):
    with pytest.raises(FeatxError, match=f"--{option.replace('_', '-')} {value}: must be a finite number"):
        ft.finetune(tiny, str(dataset), "none", out=tmp_path / "run", **{option: value})
    assert not (tmp_path / "run").exists()


def test_a_diverging_loss_stops_before_a_model_is_written(tiny, dataset, tmp_path):
    with pytest.raises(FeatxError, match="loss became nan: the network diverged, so lower --lr"):
        ft.finetune(tiny, str(dataset), "all", epochs=1, lr=1e30, out=tmp_path / "run", workers=0, progress=False)
    assert not (tmp_path / "run" / "model.featx").exists()


def test_balanced_class_weight_weighs_the_training_loss(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 2, "val": 2})
    for f in sorted((data / "train" / "b").glob("*.jpg")):
        for k in range(4):  # class b: ten images against a's two
            (f.parent / f"copy{k}_{f.name}").write_bytes(f.read_bytes())
    kw = dict(unfreeze="none", head="none", epochs=1, augment="none", shuffle=False, workers=0, progress=False)
    plain = ft.finetune(tiny, str(data), out=tmp_path / "plain", **kw)
    balanced = ft.finetune(tiny, str(data), out=tmp_path / "balanced", class_weight="balanced", **kw)
    assert balanced["history"][0]["train_loss"] != pytest.approx(plain["history"][0]["train_loss"], abs=1e-4)
    assert ModelFile.load(balanced["model"]).info["finetune"]["class_weight"] == "balanced"


@pytest.mark.parametrize("boundary_cache", [True, False])
def test_an_epoch_trains_every_image_but_a_last_one_alone(tiny, tmp_path, monkeypatch, boundary_cache):
    """14 training images in steps of 4 train all 14 each epoch (a last step of 2); 13 train 12, since a step of
    one image is left out. Both the boundary cache's batches and the image loader's."""
    import shutil

    assert not ft.drops_last_batch(14, 4) and ft.drops_last_batch(13, 4) and not ft.drops_last_batch(1, 4)
    real, seen = ft.FineTuneNet.forward, [0]

    def counted(self, images):
        seen[0] += len(images) if self.training else 0
        return real(self, images)

    monkeypatch.setattr(ft.FineTuneNet, "forward", counted)
    for per_class, trained in ((7, 14), (6, 12)):
        data = make_dataset(tmp_path / f"d{per_class}", {"train": per_class, "val": 2})
        if per_class == 6:  # 13 images: one more in class a
            shutil.copy(data / "train" / "a" / "000.jpg", data / "train" / "a" / "extra.jpg")
        seen[0] = 0
        ft.finetune(tiny, str(data), "block2", epochs=2, batch_size=4, workers=0, progress=False, augment="none",
                    head="none", boundary_cache=boundary_cache, out=tmp_path / f"run{per_class}",
                    cache_dir=tmp_path / "cache")
        assert seen[0] == 2 * trained, (per_class, seen)
