"""Files on disk: the one atomic-write helper, the one content-digest helper, and the one way a full or
read-only output folder is reported, which every module uses."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .errors import FeatxError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
REPORT_BYTES = 4 << 20  # what a report needs beside any model file: metrics, plots, the page with its thumbnails


@contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it into place.

    Readers see the old file or the new one, never half of one. The temporary name carries the pid, so
    two writers never share it, and it is removed if the block raises. The file gets the mode the umask
    gives any new file (some writers, safetensors among them, create 0600 files).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder that cannot be searched: nothing could be written there either
            pass


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove what ``atomic_write`` left in ``folder`` when its process was killed: a ``NAME.tmp<pid>`` whose
    process no longer runs (a live one may still be writing it)."""
    for tmp in Path(folder).glob("*.tmp[0-9]*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not running(int(pid)):
            tmp.unlink(missing_ok=True)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content, remembered per (path, size, mtime) for the life of the process."""
    st = os.stat(path)
    return _cached_digest(str(path), algorithm, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _cached_digest(path: str, algorithm: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def free_space(folder: Path) -> int:
    """Free bytes where ``folder`` is (or would be created)."""
    for place in [folder, *folder.parents]:
        try:
            return shutil.disk_usage(place).free
        except OSError:  # not there yet, or not searchable: the nearest folder above that is
            continue
    return 0


def make_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """``folder`` created (with its parents), or one line naming it and the option that moves it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FeatxError(f"{folder} cannot be created ({exc.strerror or exc}): pass {option} a writable folder") from None
    return folder


def full_disk(exc: BaseException) -> bool:
    """``ENOSPC`` or ``EDQUOT``, also inside another library's own error (safetensors', matplotlib's, torch's)."""
    return getattr(exc, "errno", None) in NO_SPACE or "No space left on device" in str(exc) or \
        "Disk quota exceeded" in str(exc)


def not_writable(exc: BaseException) -> bool:
    """A read-only file system or a folder featx may not write to, also inside another library's own error."""
    return getattr(exc, "errno", None) in NOT_WRITABLE or "Read-only file system" in str(exc) or \
        "Permission denied" in str(exc)


@contextmanager
def room(folder: str | os.PathLike, needed: int, option: str = "--out"):
    """Writes into ``folder``, about ``needed`` bytes of them: a folder short of that much free space before
    they start, or a full disk (``ENOSPC``, also inside safetensors' or matplotlib's own errors) or a read-only
    folder met while writing, is one line naming the folder, the space needed and the option that moves it.
    Whatever was written before stays (every file is written atomically)."""
    folder = Path(folder)
    free = free_space(folder)
    if free < needed:
        raise FeatxError(no_room(folder, needed, free, option))
    try:
        yield
    except FeatxError:
        raise
    except Exception as exc:
        if full_disk(exc):
            raise FeatxError(no_room(folder, needed, free_space(folder), option)) from None
        if not_writable(exc):
            why = getattr(exc, "strerror", None) or "not writable"
            raise FeatxError(f"{folder} is not writable ({why}): pass {option} a writable folder") from None
        raise


def no_room(folder: Path, needed: int, free: int, option: str) -> str:
    return (f"no room in {folder}: about {needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free; free some "
            f"space or pass {option} elsewhere")
