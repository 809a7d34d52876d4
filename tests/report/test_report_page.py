"""report.html: every figure on the page is metrics.json's, every image it shows is there."""
import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.report import metrics as report
from featx.heads.fit import fit_head
from helpers import make_dataset


class Page(HTMLParser):
    """The page's tagged figures ({data-key: text}) and image sources."""

    def __init__(self, text: str):
        super().__init__()
        self.figures, self.images, self.links, self._key = {}, [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-key" in attrs:
            self._key = attrs["data-key"]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        if self._key is not None:
            self.figures[self._key] = data
            self._key = None


def lookup(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def check_page(folder: Path) -> Page:
    page = Page((folder / "report.html").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert page.figures, "the page shows no tagged figure"
    for key, text in page.figures.items():
        assert text == f"{lookup(metrics, key):.4f}", key
    for src in page.images:
        if src.startswith("data:image/jpeg;base64,"):
            assert base64.b64decode(src.split(",", 1)[1])[:2] == b"\xff\xd8"
        else:
            assert (folder / src).is_file(), src
    for href in page.links:
        assert (folder / href).is_file(), href
    return page


@pytest.fixture
def noisy(tmp_path):
    """Colour classes with a few test images filed under the wrong class, so there are mistakes to show."""
    data = make_dataset(tmp_path / "d", {"train": 8, "val": 4, "test": 6})
    for f in sorted((data / "test" / "a").glob("*.jpg"))[:2]:
        f.rename(data / "test" / "b" / f"moved_{f.name}")
    return data


def test_fit_head_page_matches_metrics_json(tiny, noisy, tmp_path):
    result = fit_head("logreg", backbone=tiny, data=str(noisy), cache_dir=tmp_path / "c", out=tmp_path / "run",
                      progress=False)
    assert result["report_page"] == str(tmp_path / "run" / "report.html")
    page = check_page(tmp_path / "run")
    for split in ("val", "test"):
        for metric in report.HEADLINE:
            assert f"{split}.{metric}" in page.figures and f"{split}.interval95.{metric}.1" in page.figures
    assert len(page.images) == len(result["test"]["top_losses"]) >= 2  # the moved images, as thumbnails
    assert "moved_" in (tmp_path / "run" / "report.html").read_text()


def test_evaluate_finetune_and_run_pages(tiny, noisy, tmp_path):
    fitted = fit_head("logreg", backbone=tiny, data=str(noisy), cache_dir=tmp_path / "c", out=tmp_path / "fit",
                      progress=False)
    evaluated = featx.evaluate(fitted["model"], str(noisy), "test", cache_dir=tmp_path / "c", out=tmp_path / "ev",
                               progress=False)
    check_page(Path(evaluated["report_page"]).parent)
    tuned = featx.finetune(tiny, str(noisy), "block2", epochs=2, out=tmp_path / "ft", workers=0, progress=False)
    page = check_page(Path(tuned["report_page"]).parent)
    assert "Training curves" in (tmp_path / "ft" / "report.html").read_text() and "test.accuracy" in page.figures
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'name = "page"\ndata = "{noisy}"\nbackbone = "{tiny}"\n'
                        '[[steps]]\nname = "logreg"\nkind = "fit-head"\nclf = "logreg"\n')
    ran = featx.run_pipeline(pipeline, cache_dir=tmp_path / "c", out=tmp_path / "pipe", progress=False)
    links = Page(Path(ran["report_page"]).read_text()).links
    assert links == ["logreg/report.html"] and (tmp_path / "pipe" / "logreg" / "report.html").is_file()


def test_bootstrap_intervals_hold_the_figure_and_narrow_with_more_images():
    rng = np.random.default_rng(0)
    for n in (150, 1500):
        y = rng.integers(0, 3, n)
        proba = rng.dirichlet([1, 1, 1], n)
        proba[np.arange(n), y] += 1.5 * (rng.random(n) < 0.9)
        proba /= proba.sum(1, keepdims=True)
        m = report.classification_metrics(y, proba, ["a", "b", "c"])
        for metric in report.HEADLINE:
            low, high = m["interval95"][metric]
            assert low <= m[metric] <= high, metric
        width = m["interval95"]["accuracy"][1] - m["interval95"]["accuracy"][0]
        normal = 2 * 1.96 * np.sqrt(m["accuracy"] * (1 - m["accuracy"]) / n)  # the textbook interval's width
        assert 0.7 * normal < width < 1.3 * normal


@pytest.mark.parametrize("n,classes", [(3, 5), (40, 2), (333, 12)])
def test_bootstrap_intervals_are_each_resample_counted_on_its_own(n, classes):
    """The intervals, counted a block of resamples at a time, equal one resample at a time with the same
    seeded draws: per-class recall and F1 over the classes each resample holds, accuracy, log-loss and ECE."""
    rng = np.random.default_rng(n)
    y = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, classes, n))
    loss, confidence = rng.random(n) * 3, rng.random(n)
    draws, seeded = {k: [] for k in report.HEADLINE}, np.random.default_rng(0)
    for _ in range(report.BOOTSTRAP):
        i = seeded.integers(0, n, n)
        support, predicted = (np.bincount(v[i], minlength=classes) for v in (y, pred))
        hits = np.bincount(y[i][pred[i] == y[i]], minlength=classes)
        recall, precision = hits / np.maximum(support, 1), hits / np.maximum(predicted, 1)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        draws["accuracy"].append((pred[i] == y[i]).mean())
        draws["log_loss"].append(loss[i].mean())
        draws["balanced_accuracy"].append(recall[support > 0].mean())
        draws["macro_f1"].append(f1[support > 0].mean())
        draws["ece"].append(report.ece_of(confidence[i], pred[i] == y[i]))
    expected = {k: [np.percentile(v, 2.5), np.percentile(v, 97.5)] for k, v in draws.items()}
    got = report.bootstrap_intervals(y, pred, loss, confidence, classes)
    for metric in report.HEADLINE:
        np.testing.assert_allclose(got[metric], expected[metric], rtol=1e-12, atol=1e-12, err_msg=metric)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless browser installed (apt install chromium)")
def test_the_page_renders_in_a_headless_browser(tiny, noisy, tmp_path):
    fit_head("logreg", backbone=tiny, data=str(noisy), cache_dir=tmp_path / "c", out=tmp_path / "run", progress=False)
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2400", (tmp_path / "run" / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (2400, 1280) and image.std() > 10  # drawn, not blank


def test_a_class_with_no_image_in_the_split_is_said_and_shows_no_figure():
    """Four classes, none of class c in the split and nothing predicted as d: the summary line says one class has
    no image, and the page shows a dash for each 0 / 0 (c's three figures, d's precision), where 0.0000 would
    read as a measurement; d's recall, 0 of its 1 image, is a figure."""
    from featx.report.page import NOT_HERE, metrics_section

    proba = np.array([[0.9, 0.05, 0.05, 0.0], [0.2, 0.7, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.1, 0.8, 0.1, 0.0],
                      [0.1, 0.5, 0.1, 0.3]])
    m = report.classification_metrics(np.array([0, 1, 1, 1, 3]), proba, ["a", "b", "c", "d"])
    assert m["classes_present"] == 3 and m["balanced_accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report.summary_line({"test": m}).endswith("(n=5; 1 of 4 classes has no image here)")
    assert report.summary_line({"test": report.classification_metrics(np.array([0, 1, 2]), np.eye(3), list("abc"))}
                               ).endswith("(n=3)")
    per_class = metrics_section("test", m, {}).split("<h3>Per class</h3>")[1].split("</table>")[0]
    rows = {r.split("</td>", 1)[0].rsplit(">", 1)[1]: r for r in per_class.split("<tr>")[2:]}
    assert [rows[c].count(f"<td>{NOT_HERE}</td>") for c in "abcd"] == [0, 0, 3, 1], per_class
    assert rows["d"].startswith(f'<td class="l">d</td><td>{NOT_HERE}</td><td><span data-key="test.per_class.d.recall">0.0000<')
