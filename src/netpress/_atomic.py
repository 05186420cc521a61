"""Atomic file writes: a failure leaves no partial file and any existing file intact.

The temporary file is ``.<name>.<pid>.<random>.tmp`` next to the destination. A writer killed
mid-write (SIGKILL, power loss) cannot clean up after itself, so every write first removes
the temporary files of the *same destination* whose writer process is gone (and those of
older netpress versions, which carry no pid, once they are an hour old).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "remove_stale_temps"]

_LEGACY_AGE = 3600.0  # seconds


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # maybe another thread of this process, writing now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files left in ``target``'s folder by dead writers of ``target``;
    returns them. Files of other destinations and of live writers are left alone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp\Z")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = match.group(1)
        try:
            stale = (not _alive(int(pid))) if pid else \
                time.time() - entry.stat().st_mtime > _LEGACY_AGE
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # raced with another cleaner, or not ours to remove
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` in one step.

    The new file keeps an existing file's permissions, else gets ``0o644``-style permissions
    (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``. Stale temporary files of
    ``path`` left by killed writers are removed first.
    """
    target = Path(path)
    if target.exists():
        mode = target.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> int:
    """Write ``data`` (text as UTF-8) atomically and durably; returns the bytes written."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return len(raw)
