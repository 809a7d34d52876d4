"""``featx audit``: planted label errors and leaking copies in real images are found; bad input is one line."""
import hashlib
import json

import pytest
from click.testing import CliRunner
from PIL import Image

import featx
from featx.audit import audit
from featx.cli import cli
from featx.fit import fit_head
from helpers import SHARED_DATA, make_dataset


def planted(root):
    """60 + 60 real cats_dogs training photos with 3 of each class filed under the other (5%), 20 + 20 test
    photos, and 2 test photos a class copied into train re-encoded and resized (near-copies: leakage)."""
    source, flipped, copies = SHARED_DATA / "cats_dogs", set(), set()
    for cls, other in (("cats", "dogs"), ("dogs", "cats")):
        for i, f in enumerate(sorted((source / "train" / cls).glob("*.jpg"))[:60]):
            target = root / "train" / (other if i % 20 == 0 else cls) / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
            if i % 20 == 0:
                flipped.add(str(target.relative_to(root)))
        tests = sorted((source / "test" / cls).glob("*.jpg"))[:20]
        for f in tests:
            (root / "test" / cls).mkdir(parents=True, exist_ok=True)
            (root / "test" / cls / f.name).symlink_to(f)
        for f in tests[:2]:
            Image.open(f).convert("RGB").resize((140, 140)).save(root / "train" / cls / f"copy_{f.name}", quality=85)
            copies.add(f"test/{cls}/{f.name}")
    return flipped, copies


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.integration
def test_audit_finds_planted_label_errors_and_every_leaking_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flipped, copies = planted(tmp_path / "planted")
    before = snapshot(tmp_path / "planted")
    result = CliRunner().invoke(cli, ["audit", "--data", str(tmp_path / "planted"), "--quiet", "--json",
                                      "--write-exclude", "drop.txt"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    found = json.loads((tmp_path / "runs" / "planted__audit" / "audit.json").read_text())
    flagged = {i["path"] for i in found["label_issues"]}
    assert len(flipped & flagged) >= 0.8 * len(flipped) and len(flipped & flagged) >= 0.5 * len(flagged), flagged
    assert set(found["leakage"]["leaking_test_images"]) == copies  # every planted copy, named from the test side
    assert summary["leaks"] >= len(copies) and summary["images"] == 164
    for suggestion in (i for i in found["label_issues"] if i["path"] in flipped):
        assert suggestion["given"] != suggestion["suggested"] == suggestion["path"].split("/")[-1][:3] + "s"
    page = (tmp_path / "runs" / "planted__audit" / "report.html").read_text()
    assert "Likely label errors" in page and "Leak: " in page and page.count("<img") >= len(flagged)
    assert (tmp_path / "runs" / "planted__audit" / "label_issues.csv").read_text().count("\n") == len(flagged) + 1
    assert snapshot(tmp_path / "planted") == before  # an audit changes nothing
    dropped = (tmp_path / "drop.txt").read_text().split()
    assert flipped & flagged <= set(dropped) and copies <= set(dropped)
    m = fit_head("logreg", data=str(tmp_path / "planted"), exclude=dropped, out=tmp_path / "clean", progress=False)
    assert m["selected"]["excluded"] == sorted(set(dropped)) and m["test"]["n"] == 40 - len(copies) - len(
        [p for p in dropped if p.startswith("test/") and p not in copies])


def test_an_audit_needs_two_classes_and_images_to_fold(tiny, tmp_path):
    one = make_dataset(tmp_path / "one", {"train": 4}, classes=("a",))
    with pytest.raises(featx.FeatxError, match="has one class with images: an audit compares classes"):
        audit(str(one), tiny, cache_dir=tmp_path / "c", progress=False)
    single = make_dataset(tmp_path / "single", {"train": 1})
    with pytest.raises(featx.FeatxError, match="has one image a class: out-of-fold probabilities need"):
        audit(str(single), tiny, cache_dir=tmp_path / "c", progress=False)
