"""Images: decoding files to upright 8-bit RGB, on the CPU (Pillow) or in batches on the device.

Files are judged by content, not extension. A file that cannot be decoded becomes a skip with its
reason, never a crash. ``decode="device"`` has loader workers read plain JPEG bytes only; the device
(nvjpeg on CUDA) decodes them in batches, and anything it refuses goes through Pillow, so every file
ends the same way with either decoder. torch is imported by the functions that make tensors.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from featx.errors import first_line

if TYPE_CHECKING:
    import torch


EXIF_ORIENTATION = 0x0112
IO_ERROR = "I/O "  # reasons that start so came from the file system, not the file's content: worth retrying
READ_ATTEMPTS = 3
DECODE_PIXELS = 64 * 2 ** 20  # decoded at once on the device: 64 MP is ~192 MB as uint8, ~0.8 GB as float


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode any image Pillow knows as upright 8-bit RGB; JPEGs are decoded at reduced size when
    ``draft_size`` allows, which is several times faster for large photos."""
    img = Image.open(path)
    if img.format == "JPEG" and draft_size:
        img.draft("RGB", (draft_size, draft_size))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # scaled by bit depth, not by the image's own maximum
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            full_scale = 1.0 if arr.max() <= 1 else 255.0
        else:
            full_scale = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else 2.0 ** 31 - 1
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA") and "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def failure_reason(exc: Exception) -> str:
    """One line naming the error; file-system errors (an errno: permissions, a flaky disk) start with
    ``IO_ERROR``, decoding errors (truncated, corrupt, not an image) do not."""
    text = f"{type(exc).__name__}: {first_line(exc)}".strip()
    return IO_ERROR + text if isinstance(exc, OSError) and exc.errno is not None else text


class ImageFiles:
    """A map-style dataset (for a DataLoader, or indexed directly) that decodes files with ``transform``
    (to uint8 CHW tensors or arrays); a file that fails becomes a skip with its reason, never a crash."""

    def __init__(self, files: list, transform, draft_size: int):
        self.files, self.transform, self.draft_size = files, transform, draft_size

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.files[i], self.draft_size))

    def load(self, i: int) -> torch.Tensor:
        return self.decode(i)

    def __getitem__(self, i: int):
        for attempt in range(READ_ATTEMPTS):
            try:
                return i, self.load(i), ""
            except Exception as exc:  # corrupt, truncated, empty or not an image: reported, not fatal
                reason = failure_reason(exc)
                if not reason.startswith(IO_ERROR):
                    break
                time.sleep(0.05 * (attempt + 1))  # a file-system hiccup may pass: read again
        return i, None, reason


class SeededImages(ImageFiles):
    """Images whose random augmentation is drawn after seeding torch from (seed, draw, image): the draw is
    the fine-tuning epoch, or a boundary cache's view (``boundary.py``, where view k is what epoch k draws),
    and each image is known by a key from its path (``keys``), so a draw is the same whichever process or
    DataLoader worker makes it, in a run resumed after a kill, and after other files are added.
    Items are (draw, index)."""

    def __init__(self, files: list, transform, draft_size: int, seed: int, keys: list[int]):
        super().__init__(files, transform, draft_size)
        self.seed, self.keys = seed, keys

    def __getitem__(self, item):
        import torch

        draw, i = item
        with torch.random.fork_rng(devices=[]):  # the process's own stream (dropout, in the main one) moves on untouched
            torch.manual_seed(int(np.random.SeedSequence([self.seed, draw, self.keys[i]]).generate_state(1)[0]))
            return super().__getitem__(i)


def path_keys(paths: list[str]) -> list[int]:
    """A stable number per relative path (``SeededImages``' keys)."""
    return [int.from_bytes(hashlib.sha256(p.encode("utf-8", "surrogateescape")).digest()[:8], "big") for p in paths]


class EncodedFiles(ImageFiles):
    """For decoding on the device: a plain JPEG (baseline, RGB or grey, upright) comes back as its
    bytes and pixel count; anything else is decoded here by Pillow, as ImageFiles does, because
    nvjpeg refuses other formats and one refusal sends its whole batch to file-by-file decoding."""

    def load(self, i: int):
        with Image.open(self.files[i]) as img:
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and "progressive" not in img.info
                     and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
            pixels = img.size[0] * img.size[1]
        if not plain:
            return self.decode(i)
        return Path(self.files[i]).read_bytes(), pixels


@dataclass
class EncodedBatch:
    """A batch for device decoding: every JPEG's bytes in one buffer (one shared-memory segment per
    batch, not one per image; never pinned, as nvJPEG reads pageable memory), with each file's
    (offset, length, pixels), and the images Pillow already decoded, by position in the batch."""

    buffer: torch.Tensor
    spans: dict  # position -> (offset, length, pixels)
    decoded: dict  # position -> uint8 CHW tensor

    def __len__(self) -> int:
        return len(self.spans) + len(self.decoded)


def collate(batch):
    """(indices, stacked uint8 images or None, failures) from ``ImageFiles`` items."""
    import torch

    ok = [b for b in batch if b[1] is not None]
    images = torch.stack([b[1] for b in ok]) if ok else None
    return [b[0] for b in ok], images, [(b[0], b[2]) for b in batch if b[1] is None]


def collate_encoded(batch):
    """(indices, ``EncodedBatch``, failures) from ``EncodedFiles`` items."""
    import torch

    ok = [b for b in batch if b[1] is not None]
    spans, decoded, chunks, offset = {}, {}, [], 0
    for position, (_, item, _) in enumerate(ok):
        if isinstance(item, tuple):
            raw, pixels = item
            spans[position] = (offset, len(raw), pixels)
            chunks.append(raw)
            offset += len(raw)
        else:
            decoded[position] = item
    buffer = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else torch.empty(0, dtype=torch.uint8)
    return [b[0] for b in ok], EncodedBatch(buffer, spans, decoded), [(b[0], b[2]) for b in batch if b[1] is None]


def pixel_groups(spans: dict, max_pixels: int) -> list[list[int]]:
    """Positions in groups of at most ``max_pixels`` decoded pixels (a larger image goes alone)."""
    groups, current, total = [], [], 0
    for position, (_, _, pixels) in spans.items():
        if current and total + pixels > max_pixels:
            groups.append(current)
            current, total = [], 0
        current.append(position)
        total += pixels
    return groups + ([current] if current else [])


def decode_on_device(indices: list, batch: EncodedBatch, dataset: EncodedFiles, device: torch.device,
                     max_pixels: int = DECODE_PIXELS):
    """Batched JPEG decode on ``device`` (nvjpeg on CUDA) in groups of at most ``max_pixels``, each group
    resized and cropped there before the next is decoded, so full-resolution photos never pile up in
    device memory. Files the device decoder refuses are decoded by Pillow, so the outcome per file is
    the same as on the CPU path."""
    import torch

    images, failures = dict(batch.decoded), []
    for group in pixel_groups(batch.spans, max_pixels):
        views = [batch.buffer[start:start + length] for start, length, _ in (batch.spans[p] for p in group)]
        for position, decoded in zip(group, decode_jpegs(views, device)):
            try:
                images[position] = dataset.transform(decoded) if decoded is not None else \
                    dataset.decode(indices[position])
            except Exception as exc:
                failures.append((indices[position], failure_reason(exc)))
    kept = sorted(images)
    stacked = torch.stack([images[p].to(device, non_blocking=True) for p in kept]) if kept else None
    return [indices[p] for p in kept], stacked, failures


def decode_batches(loader, dataset: EncodedFiles, device: torch.device):
    """``decode_on_device`` over a loader of ``collate_encoded`` batches: (indices, images, failures)."""
    for indices, batch, failures in loader:
        kept, images, refused = decode_on_device(indices, batch, dataset, device)
        yield kept, images, failures + refused


def decode_jpegs(encoded: list, device: torch.device) -> list:
    """Decode in one batch; if the batch fails, file by file, with None for each file refused."""
    import torch
    import torchvision

    if not encoded:
        return []
    rgb = torchvision.io.ImageReadMode.RGB
    try:
        out = torchvision.io.decode_jpeg(encoded, mode=rgb, device=device)
    except RuntimeError:
        out = []
        for raw in encoded:
            try:
                out.append(torchvision.io.decode_jpeg(raw, mode=rgb, device=device))
            except RuntimeError:
                out.append(None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the CUDA decoder writes on a stream of its own
    return out
