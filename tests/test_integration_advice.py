"""advise and ``--layer auto`` on real efficientnet_lite0 weights: ../shared/data/hymenoptera and a texture set
(a file apart from test_integration.py, so the two test workers share the long integration tests)."""
import pytest

from helpers import SHARED_DATA, linked_subset

pytestmark = pytest.mark.integration


def test_advise_hymenoptera_is_small_and_similar(tmp_path):
    """Every 3rd ants and bees training photo (the probe then takes them all)."""
    from featx.heads.advice import advise

    root = SHARED_DATA / "hymenoptera"
    photos = [p.relative_to(root) for p in sorted((root / "train").rglob("*")) if p.is_file()][::3]
    data = linked_subset(root, tmp_path / "hymenoptera", photos)
    r = advise(str(data), cache_dir=str(tmp_path / "cache"))
    assert (r["scenario"], r["size"], r["similarity"], r["layer"]) == (1, "small", "similar", "pool")
    assert r["images_per_class"] == 41 and r["probe"]["images"] == 82 and 0.1 < r["shift"] < 0.25  # 0.163
    assert r["commands"] == [f"featx extract --backbone efficientnet_lite0 --data {data} --layer pool",
                             "featx fit-head --clf logreg"]


def test_advise_and_layer_auto_pick_an_early_tap_where_texture_tells_the_classes(tmp_path):
    """Classes told apart by pixel noise alone (``make_grain_dataset``): block5 sees it, pool barely."""
    from featx.heads import fit
    from featx.heads.advice import advise
    from helpers import make_grain_dataset

    data = make_grain_dataset(tmp_path / "grain")
    r = advise(str(data), cache_dir=str(tmp_path / "cache"))
    assert (r["similarity"], r["scenario"]) == ("different", 3) and r["layer"] != "pool"
    assert r["layer_margin"]["told_apart"] and r["layer_margin"]["over"] == "pool"  # measured: +0.25 [0.14, 0.36]
    assert f"--layer {r['layer']}" in r["commands"][0]
    m = fit.fit_head("logreg", data=str(data), layer="auto", cache_dir=tmp_path / "cache", out=tmp_path / "run",
                     progress=False)
    assert m["selected"]["layer"] == r["layer"]  # the whole train set is advise's sample here
