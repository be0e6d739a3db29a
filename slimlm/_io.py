"""Atomic file writes: nothing the user owns is ever left half-written.

Every file slimlm writes goes to a temporary name in the target's folder and is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a reader sees
either the old file or the new one, and a crash leaves at most a stray ``.NAME.*.tmp``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would
        # (or the replaced file's), so checkpoints and results stay readable as before.
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_many(writers: dict[str | os.PathLike, Callable[[str], None]]) -> list[Path]:
    """Several files that belong together (weights and their config): every one is
    written to a temporary name first, and only then are all renamed into place, so an
    interruption while writing leaves the old set whole (the renames themselves take
    microseconds)."""
    done: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                       dir=path.parent)
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            os.chmod(tmp, _target_mode(path))
    except BaseException:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    try:
        for tmp, path in done:
            os.replace(tmp, path)
    finally:
        for tmp, _ in done:  # whatever a failed rename left behind
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [path for _, path in done]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``staging`` onto ``target`` (same parent folder): an
    existing ``target`` is first renamed aside, put back if the swap fails, and deleted
    only once the new folder is in place, so a crash leaves the old or the new folder
    whole (and at worst a stray ``.NAME.old-*``)."""
    import shutil
    import uuid

    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return target
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
