"""One way to write a file: atomically (a reader sees the old file or the whole new one)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "fsync_dir"]


def _temporary(path: Path) -> Path:
    # pid and thread: two writers of one file never share a temporary name
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (best effort: not every OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int | None:
    """This process's umask, read without changing it (``os.umask`` sets it; Linux only)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _give_usual_mode(path: Path) -> None:
    """The mode a new file gets from ``open``: some writers (safetensors) make theirs 0600,
    so a converted model in a shared cache was unreadable by the other users."""
    mask = _umask()
    if mask is not None:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (safetensors,
    pyarrow, torch.save); renamed to ``path`` when the block ends without an error, removed
    otherwise. ``durable``: fsync the file and its folder, for files a resume relies on."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _give_usual_mode(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object],
                 durable: bool = True) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then rename it to ``path``."""
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        write(f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        fsync_dir(Path(path).parent)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)
