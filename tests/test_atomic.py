"""Atomic writes: whole file or nothing, readable permissions, existing files kept on failure."""

import os
import stat

import pytest

from netpress._atomic import atomic_path, atomic_write


def test_new_file_is_not_private(tmp_path):
    p = tmp_path / "r.json"
    assert atomic_write(p, "{}") == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    assert p.read_text() == "{}"


def test_existing_mode_is_kept_and_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "m.bin"
    p.write_bytes(b"old")
    os.chmod(p, 0o640)
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.bin"]
    atomic_write(p, b"new")
    assert p.read_bytes() == b"new" and stat.S_IMODE(p.stat().st_mode) == 0o640
