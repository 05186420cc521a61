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


def test_a_killed_writer_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import textwrap

    target = tmp_path / "model.npress"
    import netpress._atomic

    child = textwrap.dedent(f"""
        import importlib.util, os, signal
        spec = importlib.util.spec_from_file_location("a", {netpress._atomic.__file__!r})
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)  # without importing torch: the child starts fast
        with atomic.atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"x" * (4 << 20))
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write, as under the OOM killer
    """)
    proc = subprocess.run([sys.executable, "-c", child], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stale = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model.npress.")
    other = tmp_path / ".other.npress.1.abcdefgh.tmp"  # another destination's: not ours
    other.write_bytes(b"")
    atomic_write(target, b"new")
    assert sorted(os.listdir(tmp_path)) == [".other.npress.1.abcdefgh.tmp", "model.npress"]
    assert target.read_bytes() == b"new"


def test_a_live_writers_temp_file_is_kept(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "r.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".r.json.{sleeper.pid}.abcdefgh.tmp"
        live.write_bytes(b"half")
        legacy_old = tmp_path / ".r.json.abcdefgh.tmp"  # older netpress: no pid
        legacy_old.write_bytes(b"")
        os.utime(legacy_old, (0, 0))
        legacy_new = tmp_path / ".r.json.zyxwvuts.tmp"
        legacy_new.write_bytes(b"")
        atomic_write(target, "{}")
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, legacy_new.name, "r.json"])
    finally:
        sleeper.kill()
        sleeper.wait()
