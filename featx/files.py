"""Files on disk: the one atomic-write helper and the one content-digest helper every module uses."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


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
        tmp.unlink(missing_ok=True)


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
