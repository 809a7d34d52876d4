"""The documented "without featx" script (docs/export.md), run exactly as written, gives ``featx predict``'s probabilities on real
photos: large, EXIF-rotated, grey, palette, RGBA and 16-bit ones among them."""
import json
import re
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from PIL import Image

import featx
from featx.extraction.backbones import BackboneSpec, Preprocess, Tap, Weights
from featx.serve.export import export_model
from featx.serve.onnxfile import load_exported
from featx.heads.fit import fit_head
from featx.serve.predictor import predict
from helpers import REPO, TinyNet, linked_subset

DEPLOY_PAGE = REPO / "docs" / "export.md"


def readme_script() -> str:
    """The python block that follows "Without featx" on the deployment page, as written there."""
    text = DEPLOY_PAGE.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index("Without featx"):], re.S).group(1)


@pytest.fixture
def cropping_tiny(tiny_weights):
    """The tiny net behind a resize to 37 and a crop of 32, so both rounding rules decide pixels."""
    spec = BackboneSpec(name="tiny_crop", family="tiny", build=partial(TinyNet), weights=Weights("file", str(tiny_weights)),
                        preprocess=Preprocess(32, 37, "bilinear"), feature_dim=32, taps={"pool": Tap("fc", "input")},
                        default_tap="pool", blocks={"stem": ["stem"]}, classifier="fc")
    return featx.register_backbone(spec).name


def odd_photos(photos: list, folder) -> list:
    """From real photos: a large JPEG (upscaled), an EXIF-rotated JPEG, grey, palette, RGBA and 16-bit PNGs."""
    folder.mkdir()
    img = [Image.open(p).convert("RGB") for p in photos[:6]]
    large = folder / "large.jpg"
    img[0].resize((img[0].width * 6, img[0].height * 6), Image.Resampling.BICUBIC).save(large, quality=90)
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    img[1].save(rotated, exif=exif)
    img[2].convert("L").save(folder / "grey.jpg")
    img[3].convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = img[4].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    grey16 = (np.asarray(img[5].convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16
    return [large, rotated, folder / "grey.jpg", folder / "palette.png", folder / "rgba.png", folder / "grey16.png"]


def test_the_readme_script_gives_featx_predicts_probabilities(cropping_tiny, shared_data, tmp_path):
    root = shared_data / "hymenoptera"
    train = [f"train/{c}/{p.name}" for c in ("ants", "bees") for p in sorted((root / "train" / c).iterdir())[:8]]
    data = linked_subset(root, tmp_path / "hym", train)
    features = featx.extract(cropping_tiny, str(data), cache_dir=tmp_path / "cache", workers=0, progress=False).path
    fit_head("logreg", features=features, out=tmp_path / "lr", progress=False)
    model = tmp_path / "lr" / "model.featx"
    export_model(model, tmp_path / "deploy" / "model.onnx")
    assert json.loads(load_exported(tmp_path / "deploy" / "model.onnx")["preprocessing"])["crop"].startswith("32 x 32")

    val = [p for c in ("ants", "bees") for p in sorted((root / "val" / c).iterdir())[:10]]
    photos = val[:14] + odd_photos(val[14:], tmp_path / "odd")
    sizes = [Image.open(p).size for p in val[:14]]  # the photos decide both rules, so the old ones would fail here
    assert any(int(37 * max(s) / min(s)) != round(37 * max(s) / min(s)) for s in sizes)
    assert any(round((int(37 * max(s) / min(s)) - 32) / 2) != (int(37 * max(s) / min(s)) - 32) // 2 for s in sizes)

    script = tmp_path / "deploy" / "recipe.py"
    script.write_text(readme_script())
    out = subprocess.run([sys.executable, str(script), *map(str, photos)], cwd=tmp_path / "deploy",
                         capture_output=True, text=True, check=True).stdout.splitlines()
    got = np.array([[json.loads(line.split(" ", 2)[2])[c] for c in ("ants", "bees")] for line in out])
    expected = np.array([[t["probability"] for t in sorted(r["top_k"], key=lambda t: t["label"])]
                         for r in predict(model, photos, top_k=2)])
    assert len(got) == 20 and np.abs(got - expected).max() <= 1e-5
    assert got.std(0).max() > 1e-3  # the head tells these photos apart: the comparison is not between constants
