"""Writing files a user keeps: atomically (a temp file next to the target, then ``os.replace``), so a crash
never leaves a half-written file under the real name, and with the permissions of any new file (the
umask's), not ``tempfile``'s private 0600/0700."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_temp_file(path: PathLike) -> str:
    """A fresh, empty temporary file next to ``path`` (same file system, so ``os.replace`` is atomic), with
    the permissions a newly created file gets."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return tmp


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` then a rename over ``path``; on any failure the temp file is removed and ``path``
    is left as it was."""
    tmp = new_temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """``text`` (UTF-8) into ``path``, atomically and flushed to disk."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
