import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from featx import data
from featx.extraction.images import open_rgb
from featx.errors import FeatxError
from helpers import make_dataset


def test_scan_split_folders(dataset):
    ds = data.scan(dataset)
    assert ds.classes == ["a", "b"]
    assert len(ds) == 24
    assert ds.split_source == "folders"
    assert ds.counts == {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 3}, "test": {"a": 3, "b": 3}}
    paths, labels = ds.subset("val")
    assert paths[0] == "val/a/000.jpg" and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_class_folders_only_get_a_hashed_split(tmp_path):
    make_dataset(tmp_path / "flat", {"": 200})
    first, second = data.scan(tmp_path / "flat"), data.scan(tmp_path / "flat")
    assert first.splits == second.splits
    assert first.split_source == "name-hash:0"
    for c in ("a", "b"):  # 70/15/15 on average
        assert 120 <= first.counts["train"][c] <= 160 and 15 <= first.counts["test"][c] <= 45


def test_adding_or_removing_files_moves_no_other_file(tmp_path):
    make_dataset(tmp_path / "flat", {"": 100})
    before = dict(zip(data.scan(tmp_path / "flat").paths, data.scan(tmp_path / "flat").splits))
    for name in ("000_first.jpg", "zzz_last.jpg", "050_middle.jpg"):  # sorts first, last and between
        (tmp_path / "flat" / "a" / name).write_bytes((tmp_path / "flat" / "a" / "000.jpg").read_bytes())
    (tmp_path / "flat" / "b" / "007.jpg").unlink()
    after = dict(zip(data.scan(tmp_path / "flat").paths, data.scan(tmp_path / "flat").splits))
    assert {p: s for p, s in after.items() if p in before and before[p] != s} == {}
    assert len(after) == len(before) + 2


def test_files_in_sub_folders_of_a_class_belong_to_it(tmp_path, tiny):
    """As torchvision's ImageFolder reads them: a class folder's sub-folders are part of it, listed by their path
    below it (hidden folders not); a link to a folder listed already, or to another class, split or the dataset
    itself, is not read again (an image listed twice, under another class or split, would leak); predict on the
    folder reads the same files."""
    import os
    import featx
    from featx.serve.predictor import image_files

    root = make_dataset(tmp_path / "d", {"train": 3, "test": 2})
    (root / "train" / "a" / "more" / "deeper").mkdir(parents=True)
    (root / "train" / "a" / ".hidden").mkdir()
    for where in ("more", "more/deeper", ".hidden"):
        (root / "train" / "a" / where / "x.jpg").write_bytes((root / "train" / "a" / "000.jpg").read_bytes())
    os.symlink(root / "train" / "a" / "more", root / "train" / "a" / "zz_link")  # the same folder, later in order
    os.symlink(root / "train" / "b", root / "test" / "a" / "other_class")  # another split's other class
    os.symlink(root, root / "train" / "b" / "up")  # the dataset itself
    ds = data.scan(root)
    nested = [p for p in ds.paths if p.count("/") > 2]
    assert nested == ["train/a/more/deeper/x.jpg", "train/a/more/x.jpg"] and ds.counts["train"]["a"] == 5
    assert len(ds) == 12 and len(set(map(os.path.realpath, (root / p for p in ds.paths)))) == 12
    listed = set(map(os.path.realpath, image_files([root])))  # predict reads the files extract lists, hidden ones not
    assert listed == set(os.path.realpath(root / p) for p in ds.paths)
    result = featx.extract(tiny, str(root), cache_dir=tmp_path / "c", workers=0, progress=False)
    assert result.images == 12 and set(nested) <= set(featx.extraction.store.load(result.path).paths)


def test_train_per_class_policy():
    paths = [f"{c}/{i:03d}.jpg" for c in "ab" for i in range(70)]
    splits = data.hashed_split(paths, np.repeat([0, 1], 70), train_per_class=60)
    assert splits.count("train") == 120 and splits.count("val") == 20 and "test" not in splits


def test_empty_class_and_empty_dataset_errors(tmp_path):
    make_dataset(tmp_path / "d", {"train": 2})
    (tmp_path / "d" / "train" / "c").mkdir()
    with pytest.raises(FeatxError, match="class folder .*train/c is empty"):
        data.scan(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(FeatxError, match="no images under"):
        data.scan(tmp_path / "e")


def test_unknown_name_lists_registered(tmp_path):
    with pytest.raises(FeatxError, match="hymenoptera, cats_dogs"):
        data.resolve("not-a-dataset", tmp_path)


def test_name_resolves_under_env_root(tmp_path, monkeypatch):
    make_dataset(tmp_path / "hymenoptera")
    monkeypatch.setenv("FEATX_DATA", str(tmp_path))
    name, folder, spec = data.resolve("hymenoptera")
    assert name == "hymenoptera" and folder == (tmp_path / "hymenoptera").resolve() and spec.url


def test_digits_materialise_offline(tmp_path):
    ds = data.load("digits", tmp_path)
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    img = Image.open(ds.root / ds.paths[0])
    assert img.size == (8, 8) and img.mode == "L"


def test_manual_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(FeatxError, match=r"cats_dogs' is not at .*Kaggle"):
        data.resolve("cats_dogs", tmp_path)


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    spec = data.DatasetSpec("remote", "x", url="http://127.0.0.1:9/remote.zip")
    monkeypatch.setitem(data.DATASETS, "remote", spec)
    with pytest.raises(FeatxError) as err:
        data.resolve("remote", tmp_path)
    assert "could not download 'remote'" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.partial"))


def zip_dataset(path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with zipfile.ZipFile(path, "w") as z:
        for name in ("pack/train/x/1.png", "pack/train/y/1.png"):
            z.writestr(name, buf.getvalue())


def test_local_archive_is_verified_and_unpacked(tmp_path, monkeypatch):
    zip_dataset(tmp_path / "pack.zip")
    good = data.DatasetSpec("pack", "x", url="http://127.0.0.1:9/pack.zip",
                            checksum=("sha1", data.file_digest(tmp_path / "pack.zip", "sha1")), archive_root="pack")
    monkeypatch.setitem(data.DATASETS, "pack", good)
    ds = data.load("pack", tmp_path)
    assert ds.paths == ["train/x/1.png", "train/y/1.png"]


def test_bad_checksum_refused(tmp_path, monkeypatch):
    zip_dataset(tmp_path / "pack.zip")
    bad = data.DatasetSpec("pack", "x", url="http://127.0.0.1:9/pack.zip", checksum=("sha1", "0" * 40),
                           archive_root="pack")
    monkeypatch.setitem(data.DATASETS, "pack", bad)
    with pytest.raises(FeatxError, match="expected 0000"):
        data.load("pack", tmp_path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_open_rgb_converts_every_mode(tmp_path, mode):
    img = Image.new("RGB", (10, 6), (200, 30, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((6, 10), 40000, np.uint16))
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (10, 6)


def test_open_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (20, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "o.jpg", exif=exif)
    assert open_rgb(tmp_path / "o.jpg").size == (10, 20)


def test_open_rgb_decides_by_content(tmp_path):
    Image.new("P", (5, 5)).save(tmp_path / "looks_like.jpg", "GIF")
    assert open_rgb(tmp_path / "looks_like.jpg", draft_size=256).size == (5, 5)


def test_draft_mode_decodes_large_jpeg_smaller(tmp_path):
    Image.new("RGB", (2000, 1600), (10, 200, 10)).save(tmp_path / "big.jpg", quality=90)
    assert open_rgb(tmp_path / "big.jpg", draft_size=256).size == (500, 400)
    assert open_rgb(tmp_path / "big.jpg").size == (2000, 1600)


def test_sixteen_bit_images_scale_by_bit_depth_not_their_own_maximum(tmp_path):
    dark = np.full((4, 4), 1000, np.uint16)
    dark[0, 0] = 4000
    for suffix in ("png", "tiff"):
        Image.fromarray(dark).save(tmp_path / f"dark.{suffix}")
        out = np.asarray(open_rgb(tmp_path / f"dark.{suffix}"))
        assert out[1, 1].tolist() == [4, 4, 4] and out[0, 0].tolist() == [16, 16, 16]  # 1000 / 65535 * 255
