"""``featx extract --exclude`` leaves out training images only: val and test stay in the cache and are scored
in full, so an audit's exclude list cannot pick which held-out images a later fit-head is scored on."""
import featx
from featx.extraction import store
from helpers import make_dataset


def test_extract_exclude_keeps_val_and_test_whole(tiny, tmp_path, capsys):
    data = make_dataset(tmp_path / "d", {"train": 5, "val": 3, "test": 3})
    named = ["train/a/000.jpg", str(data / "val" / "b" / "001.jpg"), "test/a/002.jpg"]
    result = featx.extract(tiny, str(data), cache_dir=tmp_path / "c", workers=0, progress=False, exclude=named)
    assert result.excluded == ["train/a/000.jpg"]
    F = store.load(result.path)
    counts = {split: int((F.splits == split).sum()) for split in ("train", "val", "test")}
    assert counts == {"train": 9, "val": 6, "test": 6}
    assert "val/b/001.jpg" in set(F.paths) and "train/a/000.jpg" not in set(F.paths)
    assert "2 of the files it names are in val or test and stay in the cache" in capsys.readouterr().err
