"""Teardown is exact: mounts, cgroups and processes are as before once instances are released."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from conftest import require
from corral_fs.sandbox import cgroup_base
from integration.fs.harness import PYTHON, make_host

pytestmark = pytest.mark.root


def _mounts(ours: Path) -> list[str]:
    """The host's mounts, less what other kernels on a shared host do meanwhile (network
    namespaces, sandbox roots under other runtime dirs)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith("/run/netns") or ("/roots" in point
                                                  and not point.startswith(str(ours))):
                continue
            found.append(" ".join(line.split()[3:5]))
    return sorted(found)


def _cgroups(base: str) -> set[str]:
    """Everything under this host's cgroup base, in every hierarchy."""
    found = set()
    for top in Path("/sys/fs/cgroup").iterdir():
        for dirpath, _, _ in os.walk(top / base):
            found.add(dirpath)
    return found


def test_release_restores_mounts_cgroups_processes() -> None:
    """Two apps with grants and limits, started and released: the host compares equal."""
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    host = make_host()
    base = cgroup_base(host.base / "run")
    before = (_mounts(host.base), _cgroups(base))
    tracked: list[psutil.Process] = []
    try:
        data = host.base / "data"
        for name in ("one", "two"):
            app = host.app(name, {"paths": {"d": {"path": str(data / name), "mode": "rw",
                                                  "create": True}},
                                  "limits": {"processes": 8, "memory": "64MiB", "cpu": 0.5}})
            run = host.start(app, [PYTHON, "-c",
                                   "import os, time; os.fork(); time.sleep(60)"])
            top = psutil.Process(run.pid)
            tracked += [top, *top.children(recursive=True)]
        assert _mounts(host.base) != before[0]
        assert _cgroups(base) != before[1]
    finally:
        host.close()
    assert _mounts(host.base) == before[0]
    assert _cgroups(base) == before[1] == set()
    assert not [p for p in tracked if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
