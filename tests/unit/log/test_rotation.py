"""RotatingFile: rotation by size and by age, keep N, gzip-compressed rotations."""

from __future__ import annotations

import gzip
from pathlib import Path

from corral_log.records import encode_lines
from corral_log.sinks import RotatingFile


def _line(i: int, t: int = 1_700_000_000_000_000_000) -> bytes:
    return encode_lines("a.web.1", "stdout", t, [b"line %06d" % i], frozenset())


def test_rotates_by_size_keeps_n_and_compresses(tmp_path: Path) -> None:
    """Past max_bytes the file rotates; rotations are gzip files; only ``keep`` remain, and
    together with the current file they hold the newest lines in order."""
    rf = RotatingFile(tmp_path / "app.log", max_bytes=1000, keep=3, compress=True)
    n = 200
    for i in range(n):
        rf.write(_line(i))
    rf.wait_idle()
    rf.prune()
    old = rf.rotated()
    assert len(old) == 3
    assert all(p.name.endswith(".gz") for p in old)
    data = b"".join(gzip.decompress(p.read_bytes()) for p in old) + rf.path.read_bytes()
    nums = [int(ln.rsplit(b" ", 1)[1]) for ln in data.splitlines()]
    assert nums == list(range(nums[0], n))  # contiguous, newest kept, in order
    assert all(p.stat().st_size < 1000 for p in old)
    assert rf.path.stat().st_size <= 1000
    rf.close()


def test_rotates_by_age(tmp_path: Path) -> None:
    """A file older than max_age_s rotates at the next write, even when small."""
    rf = RotatingFile(tmp_path / "app.log", max_bytes=None, max_age_s=3600, keep=5, compress=False)
    rf.write(_line(1))
    assert not rf.due(10)
    rf.opened_at -= 3601  # the file is now over an hour old
    assert rf.due(10)
    rf.write(_line(2))
    rf.wait_idle()
    old = rf.rotated()
    assert len(old) == 1 and not old[0].name.endswith(".gz")
    assert b"line 000001" in old[0].read_bytes()
    assert b"line 000002" in rf.path.read_bytes()
    rf.close()


def test_age_survives_reopen(tmp_path: Path) -> None:
    """A reopened file's age comes from its first record, so a restart does not reset it."""
    p = tmp_path / "app.log"
    p.write_bytes(_line(0, t=1_000_000_000 * 1_000_000_000))  # 2001
    rf = RotatingFile(p, max_bytes=None, max_age_s=86400, keep=1)
    assert rf.due(1)
    rf.close()


def test_keep_zero_deletes_rotations(tmp_path: Path) -> None:
    """keep=0 keeps no rotated file."""
    rf = RotatingFile(tmp_path / "app.log", max_bytes=100, keep=0)
    for i in range(20):
        rf.write(_line(i))
    rf.wait_idle()
    rf.prune()
    assert rf.rotated() == []
    rf.close()
