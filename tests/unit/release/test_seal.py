"""The seal of a built release, for real (root: it chowns)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corral.deploy._release import seal

pytestmark = pytest.mark.root


def test_seal_leaves_root_owned_read_only_files_and_no_set_id_bit(tmp_path: Path) -> None:
    """What a build left, owned by the app's uid with every kind of mode, comes out root's,
    not group- or world-writable, readable (executables and directories enterable), and
    without a set-user-ID, set-group-ID or sticky bit, also where the mode needed no other
    change; a symlink is not followed."""
    release = tmp_path / "v1"
    (release / "bin").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    modes = {"bin/suid": 0o4755, "bin/sgid": 0o2755, "bin/both": 0o6777, "data": 0o666,
             "private": 0o600, "tool": 0o700, "plain": 0o644}
    for rel, mode in modes.items():
        path = release / rel
        path.write_text(rel)
        os.chown(path, 61234, 61234)
        os.chmod(path, mode)  # after the chown, which would clear the set-ID bits
    os.chmod(release / "bin", 0o3777)  # setgid and sticky on a directory
    os.chown(release / "bin", 61234, 61234)
    (release / "link").symlink_to(outside)
    seal(release)
    expected = {"bin/suid": 0o755, "bin/sgid": 0o755, "bin/both": 0o755, "data": 0o644,
                "private": 0o644, "tool": 0o755, "plain": 0o644, "bin": 0o755}
    for rel, mode in expected.items():
        st = os.lstat(release / rel)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), rel
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target untouched
    assert stat.S_IMODE(release.stat().st_mode) == 0o755 and release.stat().st_uid == 0
