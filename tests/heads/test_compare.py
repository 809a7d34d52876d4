"""featx compare: every (backbone, layer, head) fitted, ranked best first, with its cost and a page."""
import json

from click.testing import CliRunner

from featx.cli import cli
from featx.errors import FeatxError
from helpers import make_dataset
from report.test_report_page import Page  # tests/report, on the path conftest sets


def test_compare_ranks_layers_and_heads_and_links_their_pages(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 8, "val": 4, "test": 4})
    out = CliRunner().invoke(cli, ["compare", "--data", str(data), "--backbones", tiny, "--layers", "block1,pool",
                                   "--clf", "logreg,knn", "--cache-dir", str(tmp_path / "c"), "--out",
                                   str(tmp_path / "cmp"), "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    rows = result["rows"]
    assert {(r["layer"], r["clf"]) for r in rows} == {(l, c) for l in ("block1", "pool") for c in ("logreg", "knn")}
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert all(r["ranked_on"] == "val" and r["interval95"][0] <= r["accuracy"] <= r["interval95"][1] for r in rows)
    assert {r["feature_dim"] for r in rows} == {16, 32} and all(r["extract_img_per_s"] > 0 for r in rows)
    assert result["best"] == rows[0] and f"--layer {rows[0]['layer']}" in rows[0]["command"]
    remembered = json.loads((tmp_path / "c" / "workspace.json").read_text())  # later stages take the winner
    assert remembered["extract"]["layer"] == rows[0]["layer"] and remembered["fit_head"]["clf"] == rows[0]["clf"]
    page = Page(open(result["report_page"]).read())
    assert len(page.links) == 4 and all((tmp_path / "cmp" / link).is_file() for link in page.links)


def test_without_val_compare_ranks_on_cross_validation(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 9}, classes=("a", "b", "c"))  # train/ only: no val to rank on
    out = CliRunner().invoke(cli, ["compare", "--data", str(data), "--backbones", tiny, "--clf", "svm",
                                   "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "cmp"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert " cv " in out.stdout and "reproduce: featx extract" in out.stdout


def test_an_unknown_head_is_one_line_before_any_work(tiny, tmp_path):
    data = make_dataset(tmp_path / "d", {"train": 2})
    out = CliRunner().invoke(cli, ["compare", "--data", str(data), "--backbones", tiny, "--clf", "forest",
                                   "--cache-dir", str(tmp_path / "c")])
    assert isinstance(out.exception, FeatxError) and "--clf forest: use logreg, svm, knn, mlp" in str(out.exception)
    assert not (tmp_path / "c").exists()
