"""The cgroup v2 backend, for real, on hosts whose unified hierarchy has the controllers.

This CI host mounts the pids, memory and cpu controllers as cgroup v1 (the unified mount
carries none of them), so here the v1 backend is the one every enforcement test exercises
and this test is skipped with that reason: it is a host variant, not a missing facility.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from corral_fs._cgroups import CONTROLLERS, CgroupV2, Limits, _cgroup_mounts


def _v2_mount_with_controllers() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        v2, _v1 = _cgroup_mounts(f.read())
    if v2 is None:
        return None
    available = set((v2 / "cgroup.controllers").read_text().split())
    return v2 if set(CONTROLLERS) <= available else None


@pytest.mark.root
def test_v2_limits_join_kill_remove() -> None:
    """Limits land in pids.max/memory.max/cpu.max; a joined process is killed; no trace left."""
    mount = _v2_mount_with_controllers()
    if mount is None:
        pytest.skip("the unified cgroup hierarchy here has no pids/memory/cpu controllers "
                    "(they are mounted as v1); the v1 backend is tested instead")
    tree = CgroupV2(mount, base=f"corral-test-{os.getpid()}")
    procs = tree.create("app.web.1", Limits(processes=7, memory=64 << 20, cpu=0.5))
    group = Path(procs[0]).parent
    try:
        assert (group / "pids.max").read_text().strip() == "7"
        assert (group / "memory.max").read_text().strip() == str(64 << 20)
        assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
        child = subprocess.Popen(["sleep", "60"])
        Path(procs[0]).write_text(str(child.pid))
        assert tree.pids("app.web.1") == {child.pid}
        tree.kill("app.web.1")
        child.wait(5)
    finally:
        tree.remove("app.web.1")
        tree.release_base()
    time.sleep(0.05)
    assert not group.exists() and not tree.base.exists()
