"""Atomic file output: a picture or page is written to a temporary file beside the target and renamed into place,
so an interrupted or failed run never leaves a half-written file under the requested name."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["atomic_write", "check_writable"]


def check_writable(path: Union[str, os.PathLike]) -> Path:
    """Raise OSError (with the reason) unless a file can be created at ``path``; creates nothing that stays."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise IsADirectoryError(f"{str(p)!r} is a directory")
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {str(parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)  # the real test: can we create?
    os.close(fd)
    os.unlink(tmp)
    return p


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace`` (atomic on POSIX)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
