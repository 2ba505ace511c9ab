"""Teardown is exact: mounts, cgroups and processes are as before once instances are released."""

from __future__ import annotations

import os

import psutil
import pytest
from conftest import require
from integration.fs.harness import PYTHON, make_host

pytestmark = pytest.mark.root


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        # network namespaces come and go with other tests on a shared host: not ours
        return sorted(m for m in (" ".join(line.split()[3:5]) for line in f)
                      if "/run/netns/" not in m)


def _cgroups() -> set[str]:
    found = set()
    for dirpath, _, _ in os.walk("/sys/fs/cgroup"):
        found.add(dirpath)
    return found


def _processes() -> set[tuple[int, float]]:
    return {(p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"])}


def test_release_restores_mounts_cgroups_processes() -> None:
    """Two apps with grants and limits, started and released: the host compares equal."""
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    before = (_mounts(), _cgroups(), _processes())
    host = make_host()
    try:
        data = host.base / "data"
        for name in ("one", "two"):
            app = host.app(name, {"paths": {"d": {"path": str(data / name), "mode": "rw",
                                                  "create": True}},
                                  "limits": {"processes": 8, "memory": "64MiB", "cpu": 0.5}})
            host.start(app, [PYTHON, "-c", "import os; os.fork(); import time; time.sleep(60)"])
        assert _mounts() != before[0]
    finally:
        host.close()
    assert _mounts() == before[0]
    assert _cgroups() == before[1]
    leftover = _processes() - before[2]
    assert not {p for p in leftover if psutil.pid_exists(p[0]) and
                psutil.Process(p[0]).uids().real >= 61000}
