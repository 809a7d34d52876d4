"""Several taps in one pass, and the tap chosen like a hyper-parameter (tiny network, synthetic images)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.extraction import backbones
from featx.extraction import runner as extraction
from featx.extraction import store
from featx.cli import cli
from featx.heads.fit import fit_head
from featx.heads import make_head
from featx.heads.selection import choose_tap, paired_comparison, wilson
from featx.extraction.specs import auto_layers, parse_layers


def taps(tiny, data, cache, layer, **kw):
    return extraction.extract_taps(tiny, str(data), layer, cache_dir=cache, progress=False, workers=0, batch_size=4,
                                   **kw)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_tap_taken_in_one_pass_equals_its_single_tap_run(tiny, dataset, tmp_path, runtime):
    several = taps(tiny, dataset, tmp_path / "one_pass", "pool,block1,block2", runtime=runtime)
    assert [r.layer for r in several] == ["block1", "block2", "pool"]  # network order
    assert [(r.new, r.feature_dim, r.runtime) for r in several] == [(24, 16, runtime), (24, 32, runtime),
                                                                     (24, 32, runtime)]
    for r in several:
        single = taps(tiny, dataset, tmp_path / "single", r.layer, runtime=runtime)[0]
        a, b = store.load(r.path), store.load(single.path)
        assert a.identity() == b.identity() and list(a.paths) == list(b.paths)
        np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)


def test_one_more_tap_computes_only_that_tap(tiny, dataset, tmp_path, monkeypatch):
    taps(tiny, dataset, tmp_path, "block1,pool")
    built = []
    real = extraction.create_backbone
    monkeypatch.setattr(extraction, "create_backbone", lambda name, layer, **kw: built.append(layer) or
                        real(name, layer, **kw))
    again = taps(tiny, dataset, tmp_path, "block1,block2,pool")
    assert built == [["block2"]]
    assert [(r.layer, r.new, r.images) for r in again] == [("block1", 0, 24), ("block2", 24, 24), ("pool", 0, 24)]
    assert taps(tiny, dataset, tmp_path, "block1,block2,pool")[1].new == 0 and built == [["block2"]]


def test_the_pass_stops_at_the_deepest_tap(tiny):
    import torch

    net = featx.create_backbone(tiny, "block1,pool")
    ran = []
    net.model.fc.register_forward_hook(lambda *args: ran.append("fc"))
    out = net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 16 + 32) and net.tap_dims() == [16, 32] and not ran
    shallow = featx.create_backbone(tiny, "block1")
    shallow.model.block2.register_forward_hook(lambda *args: ran.append("block2"))
    shallow(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert not ran


def test_the_onnx_export_has_one_output_per_tap(tiny, dataset, tmp_path):
    import onnxruntime as ort

    taps(tiny, dataset, tmp_path, "block1,pool", runtime="onnxruntime")
    export, = (tmp_path / "onnx").glob("*.onnx")
    assert "block1+pool" in export.name
    session = ort.InferenceSession(str(export), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape[1]) for o in session.get_outputs()] == [("block1", 16), ("pool", 32)]


def test_layer_names_auto_and_order(tiny):
    spec = backbones.get_spec(tiny)
    assert auto_layers(spec) == ["block1", "block2", "pool"]  # a spec naming none: the default and the taps before
    assert parse_layers(spec, " pool, block1 ") == ["block1", "pool"] == parse_layers(spec, ["pool", "block1", "pool"])
    assert parse_layers(spec, None) == ["pool"] and parse_layers(spec, "auto") == auto_layers(spec)
    with pytest.raises(featx.FeatxError, match="has no layer 'blockX'.*or auto \\(block1,block2,pool\\)"):
        parse_layers(spec, "block1,blockX")
    for spec in backbones.builtin_specs().values():  # every family's auto list: real taps, ending with the default
        assert set(spec.auto_taps) <= set(spec.taps) and spec.auto_taps[-1] == spec.default_tap, spec.name


def test_every_tap_dimension_backbones_prints_is_the_networks(monkeypatch):
    from featx.extraction.network import tap_dims

    for name in ("vgg16", "resnet50", "efficientnet_b3", "mobilenet_v3_large", "densenet121", "convnext_tiny",
                 "efficientnet_lite2"):  # one of each family, and the widths that differ within one
        spec = backbones.get_spec(name)
        assert tap_dims(spec) == {t: tap.dim for t, tap in spec.taps.items() if t != "logits"}, name
    out = CliRunner().invoke(cli, ["backbones"]).output
    assert "block5 112" in out and "pool5 25088" in out and "auto: block5,block6,block7,pool" in out
    listed = json.loads(CliRunner().invoke(cli, ["backbones", "--json"]).output)["backbones"]
    lite0 = next(b for b in listed if b["name"] == "efficientnet_lite0")
    assert lite0["layer_dims"]["block6"] == 192 and lite0["auto_layers"] == ["block5", "block6", "block7", "pool"]


def fitted(X, y, clf="logreg"):
    return make_head(clf).fit(X, y)


def test_choose_tap_keeps_the_informative_tap_and_gives_ties_to_the_later_one():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    signal = rng.normal(0, 1, (80, 6)) + y[:, None] * 1.5
    noise = rng.normal(0, 1, (80, 6))
    index, record = choose_tap(["early", "pool"], [fitted(signal, y), fitted(noise, y)])
    assert (index, record["layer"]) == (0, "early")
    early, pool = record["layers"]
    assert early["chosen"] and not pool["chosen"] and early["accuracy"] > pool["accuracy"] + 0.3
    assert early["interval95"][0] < early["accuracy"] < early["interval95"][1] and early["scored_rows"] == 80
    margin = record["layer_margin"]
    assert margin["over"] == "pool" and margin["told_apart"] and margin["interval95"][0] > 0
    assert margin["margin"] == pytest.approx(early["accuracy"] - pool["accuracy"])
    same = fitted(signal, y)
    index, record = choose_tap(["early", "pool"], [same, fitted(signal, y)])
    assert record["layer"] == "pool" and not record["layer_margin"]["told_apart"]  # a tie goes to the later tap
    for clf in ("knn", "mlp", "svm"):  # every head scores its taps on held-out rows
        assert choose_tap(["early", "pool"], [fitted(signal, y, clf), fitted(noise, y, clf)])[1]["layer"] == "early"


def test_taps_within_one_standard_error_tie_and_the_later_one_is_kept():
    from types import SimpleNamespace

    y = np.zeros(100, int)
    def head(right):  # noqa: E306
        proba = np.zeros((100, 2))
        proba[np.arange(100), (np.arange(100) >= right).astype(int)] = 1
        return SimpleNamespace(classes_=np.array([0, 1]), held_out_=(np.arange(100), proba), held_out_right_=np.arange(100) < right)
    # 0.95 against 0.94 on 100 images: one standard error is 0.022, so they tie and pool is kept
    index, record = choose_tap(["block6", "pool"], [head(95), head(94)])
    assert record["layer"] == "pool" and record["layer_margin"]["over"] == "block6"
    assert record["layer_margin"]["margin"] == pytest.approx(-0.01)
    assert choose_tap(["block6", "pool"], [head(95), head(90)])[1]["layer"] == "block6"  # 0.05 apart: no tie


def test_nothing_held_out_keeps_the_last_tap():
    X, y = np.eye(2), np.array([0, 1])  # one image a class: no fold can score anything
    index, record = choose_tap(["early", "pool"], [fitted(X, y), fitted(X, y)])
    assert index == 1 and record["layer_selection"].startswith("none")


def test_paired_comparison_is_narrower_than_separate_intervals():
    a = np.r_[np.ones(90), np.zeros(10)].astype(bool)
    b = a.copy()
    b[:5] = False  # wrong on five more images, right wherever a is wrong
    m = paired_comparison(b, a)
    low, high = m["interval95"]
    assert m["margin"] == pytest.approx(0.05) and m["discordant"] == 5 and m["p_value"] == pytest.approx(2 / 2 ** 5)
    assert low < 0 < high == pytest.approx(0.05) and not m["told_apart"]  # five of five discordant rows: p = 0.0625
    assert high - low < wilson(0.9, 100)[1] - wilson(0.9, 100)[0]
    b[5:10] = False  # ten of ten: p = 0.002, told apart
    assert paired_comparison(b, a)["told_apart"] and paired_comparison(b, a)["interval95"][0] > 0


def test_paired_comparison_interval_is_clopper_pearson_on_the_discordant_rows():
    from scipy.stats import beta

    rng = np.random.default_rng(1)
    leader, other = rng.random(60) < 0.7, rng.random(60) < 0.8
    m = paired_comparison(leader, other)
    wins, d = int(np.sum(other & ~leader)), int(np.sum(other != leader))
    low, high = beta.ppf(0.025, wins, d - wins + 1), beta.ppf(0.975, wins + 1, d - wins)
    np.testing.assert_allclose(m["interval95"], [d / 60 * (2 * low - 1), d / 60 * (2 * high - 1)], atol=1e-9)
    assert m["margin"] == pytest.approx(other.mean() - leader.mean())
    assert paired_comparison(leader, leader) == {"margin": 0.0, "interval95": [0.0, 0.0], "p_value": 1.0,
                                                 "discordant": 0, "told_apart": False}


@pytest.mark.parametrize("n", [1, 7, 40, 600])
def test_wilson_is_the_textbook_formula(n):
    z = 1.959963984540054
    for k in range(n + 1):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        np.testing.assert_allclose(wilson(p, n), [max(0, centre - half), min(1, centre + half)], atol=1e-6)


def test_the_tap_tie_rule_is_best_index(monkeypatch):
    from featx.heads import selection

    seen = []
    real = selection.best_index
    monkeypatch.setattr(selection, "best_index", lambda *a: seen.append(a) or real(*a))
    X, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
    fitted = [make_head("logreg", C=1.0, cv=3).fit(X, y) for _ in range(2)]
    assert choose_tap(["a", "b"], fitted)[0] == 1 and seen[-1][1] == [0, -1]  # equal taps: the later one


def test_fit_head_auto_scores_test_for_the_chosen_tap_only(tiny, tmp_path, monkeypatch):
    from helpers import make_dataset

    data = make_dataset(tmp_path / "colours", {"train": 10, "val": 3, "test": 3})
    cache = tmp_path / "cache"
    several = taps(tiny, data, cache, "auto")
    scored = []
    real = featx.report.metrics.classification_metrics
    monkeypatch.setattr(featx.report.metrics, "classification_metrics", lambda y, proba, *a: scored.append(len(y)) or
                        real(y, proba, *a))
    m = fit_head("logreg", cache_dir=cache, out=tmp_path / "run", progress=False)  # no --layer: the last extract's
    assert [t["layer"] for t in m["selected"]["layers"]] == ["block1", "block2", "pool"]
    chosen = m["selected"]["layer"]
    assert m["features"] == next(r.path for r in several if r.layer == chosen) and scored == [6, 6]  # val, test once
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["selected"]["layers"] == m["selected"]["layers"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Layer, chosen by held-out score" in page and "(chosen)" in page
    assert f'data-key="selected.layers.0.accuracy">{m["selected"]["layers"][0]["accuracy"]:.4f}<' in page
    assert featx.ModelFile.load(m["model"]).identity.layer == chosen
    one = fit_head("logreg", cache_dir=cache, layer="block2", out=tmp_path / "one", progress=False)
    assert "layers" not in one["selected"] and one["features"] == several[1].path
    on_val = fit_head("knn", cache_dir=cache, layer="auto", select_on="val", out=tmp_path / "val", progress=False)
    assert "val" not in on_val and on_val["test"]["n"] == 6  # val chose the tap (and k): only test is reported
    assert all(t["scored_rows"] == 6 for t in on_val["selected"]["layers"])


def test_cli_extract_several_taps_then_fit_head_chooses(tiny, tmp_path, monkeypatch):
    from helpers import make_dataset

    monkeypatch.chdir(tmp_path)
    make_dataset(tmp_path / "colours", {"train": 8, "test": 3})
    runner = CliRunner()
    out = runner.invoke(cli, ["extract", "--backbone", tiny, "--data", "colours", "--layer", "block2,pool", "--quiet",
                              "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert out.output.count(" new, ") == 2 and f"{tiny}:block2 32-d" in out.output
    as_json = json.loads(runner.invoke(cli, ["extract", "--backbone", tiny, "--data", "colours", "--layer",
                                             "block2,pool", "--quiet", "--json"]).stdout)
    assert [(r["layer"], r["new"]) for r in as_json["layers"]] == [("block2", 0), ("pool", 0)]
    fit = runner.invoke(cli, ["fit-head", "--clf", "knn", "--quiet"])
    assert fit.exit_code == 0, fit.output
    assert "layer chosen by held-out accuracy" in fit.output and "<- chosen" in fit.output
    assert "block2" in fit.output and "test acc" in fit.output


def test_compare_extracts_each_backbones_layers_in_one_pass(tiny, dataset, tmp_path, monkeypatch):
    from featx.heads.leaderboard import compare

    built = []
    real = extraction.create_backbone
    monkeypatch.setattr(extraction, "create_backbone", lambda name, layer, **kw: built.append(layer) or
                        real(name, layer, **kw))
    result = compare(str(dataset), [tiny], ["block1", "pool"], ["knn"], cache_dir=tmp_path / "c",
                     out=tmp_path / "out", progress=False)
    assert built == [["block1", "pool"]]
    assert sorted(r["layer"] for r in result["rows"]) == ["block1", "pool"]
