"""Images: decoding files to upright 8-bit RGB, on the CPU (Pillow) or in batches on the device.

Files are judged by content, not extension. A file that cannot be decoded becomes a skip with its
reason, never a crash. ``decode="device"`` has loader workers read plain JPEG bytes only; the device
(nvjpeg on CUDA) decodes them in batches, and anything it refuses goes through Pillow, so every file
ends the same way with either decoder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import FeatxError

DECODERS = ("pil", "device")
EXIF_ORIENTATION = 0x0112
IO_ERROR = "I/O "  # reasons that start so came from the file system, not the file's content: worth retrying
READ_ATTEMPTS = 3


def check_decode(decode: str) -> None:
    if decode not in DECODERS:
        raise FeatxError(f"--decode {decode} is not supported: use one of {', '.join(DECODERS)}")


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
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return IO_ERROR + text if isinstance(exc, OSError) and exc.errno is not None else text


class ImageFiles(torch.utils.data.Dataset):
    """Decodes files to uint8 tensors; a file that fails becomes a skip with its reason, never a crash."""

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


class EncodedFiles(ImageFiles):
    """For decoding on the device: a plain JPEG (baseline, RGB or grey, upright) comes back as its
    bytes, a 1-D uint8 tensor; anything else is decoded here by Pillow, as ImageFiles does, because
    nvjpeg refuses other formats and one refusal sends its whole batch to file-by-file decoding."""

    def load(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and "progressive" not in img.info
                     and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
        if not plain:
            return self.decode(i)
        return torch.frombuffer(bytearray(Path(self.files[i]).read_bytes()), dtype=torch.uint8)


def collate(batch, stack: bool = True):
    """(indices, images, failures) from dataset items; ``images`` is a stacked tensor (or None when
    nothing decoded), or with ``stack=False`` the list of per-file tensors for device decoding."""
    ok = [b for b in batch if b[1] is not None]
    images = [b[1] for b in ok]
    if stack:
        images = torch.stack(images) if ok else None
    return [b[0] for b in ok], images, [(b[0], b[2]) for b in batch if b[1] is None]


def decode_on_device(indices: list, items: list, dataset: EncodedFiles, device: torch.device):
    """Batched JPEG decode on ``device`` (nvjpeg on CUDA), resize and crop there. Files the device
    decoder refuses are decoded by Pillow, so the outcome per file is the same as on the CPU path."""
    encoded = [k for k, t in enumerate(items) if t.dim() == 1]
    decoded = dict(zip(encoded, decode_jpegs([items[k] for k in encoded], device)))
    kept, images, failures = [], [], []
    for k, i in enumerate(indices):
        try:
            if k not in decoded:
                image = items[k]
            elif decoded[k] is not None:
                image = dataset.transform(decoded[k])
            else:
                image = dataset.decode(i)
        except Exception as exc:
            failures.append((i, failure_reason(exc)))
            continue
        kept.append(i)
        images.append(image.to(device, non_blocking=True))
    return kept, torch.stack(images) if images else None, failures


def decode_jpegs(encoded: list, device: torch.device) -> list:
    """Decode in one batch; if the batch fails, file by file, with None for each file refused."""
    import torchvision

    if not encoded:
        return []
    rgb = torchvision.io.ImageReadMode.RGB
    try:
        return torchvision.io.decode_jpeg(encoded, mode=rgb, device=device)
    except RuntimeError:
        out = []
        for raw in encoded:
            try:
                out.append(torchvision.io.decode_jpeg(raw, mode=rgb, device=device))
            except RuntimeError:
                out.append(None)
        return out
