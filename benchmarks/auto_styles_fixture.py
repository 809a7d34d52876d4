"""A few-shot, many-class fixture far from ImageNet's look, for ``featx auto``'s figures: 16 classes, each a
subject (ants, bees, cats, dogs: the shared photos) drawn in one of four styles (an edge map, an inverted grey
image, a 2-bit poster, a contour sketch), 6 training and 10 test images a class, no val/ folder. Every image is a
different photo, so neither the subject nor the style can be told from a repeated picture.

    python benchmarks/auto_styles_fixture.py SHARED_DATA OUT_DIR   # SHARED_DATA holds hymenoptera/ and cats_dogs/
"""
import sys
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

SUBJECTS = {"ants": "hymenoptera/train/ants", "bees": "hymenoptera/train/bees", "cats": "cats_dogs/train/cats",
            "dogs": "cats_dogs/train/dogs"}
TRAIN, TEST, SIZE = 6, 10, 128


def edges(im: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(ImageOps.grayscale(im).filter(ImageFilter.FIND_EDGES))


def inverted(im: Image.Image) -> Image.Image:
    return ImageOps.invert(ImageOps.equalize(ImageOps.grayscale(im)))


def poster(im: Image.Image) -> Image.Image:
    return ImageOps.posterize(ImageOps.autocontrast(im), 2)


def sketch(im: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(ImageOps.grayscale(im).filter(ImageFilter.CONTOUR))


STYLES = {"edges": edges, "inverted": inverted, "poster": poster, "sketch": sketch}


def main(shared: Path, out: Path) -> None:
    per_class = TRAIN + TEST
    for subject, folder in SUBJECTS.items():
        photos = sorted((shared / folder).glob("*.jpg"))
        if len(photos) < per_class * len(STYLES):
            raise SystemExit(f"{shared / folder}: needs {per_class * len(STYLES)} photos, has {len(photos)}")
        for s, (style, draw) in enumerate(STYLES.items()):
            for i, photo in enumerate(photos[s * per_class:(s + 1) * per_class]):
                split = "train" if i < TRAIN else "test"
                target = out / split / f"{subject}_{style}" / f"{photo.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                image = ImageOps.fit(Image.open(photo).convert("RGB"), (SIZE, SIZE))
                draw(image).convert("RGB").save(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
