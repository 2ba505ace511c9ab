"""`[limits] memory = "100MB"` reaches a deployed app's cgroup as 10^8 bytes, not 100 MiB.

The manifest's size goes through the kernel (``corral check`` resolves it) and the fs driver
(which writes the cgroup); both read it with ``corral.units``, where MB is 10^6 bytes.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from conftest import require
from corral.testing import KernelProcess, free_port, wait_for
from corral_fs._cgroups import CgroupV1, CgroupV2, detect
from corral_fs.sandbox import cgroup_base
from e2e.apps import write_app

pytestmark = pytest.mark.root

HUNDRED_MB = 100_000_000


def _fs_running(k: KernelProcess) -> bool:
    r = k.cli("drivers", "--json")
    drivers = json.loads(r.stdout) if r.returncode == 0 else []
    if isinstance(drivers, dict):
        drivers = drivers.get("drivers", [])
    return any(d["name"] == "fs" and d["state"] == "running" for d in drivers)


def test_memory_100mb_reaches_the_cgroup_as_10_8_bytes(public_dir: Path) -> None:
    """`corral check` resolves "100MB" to 100000000 and the deployed instance's cgroup holds
    it: memory.max on cgroup v2; on v1 memory.limit_in_bytes, which the kernel rounds down
    to a whole number of pages (99999744 with 4 KiB pages). 100 MiB would be 104857600."""
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    port = free_port()
    app = write_app(public_dir / "sized", "sized", {"http": port},
                    {"web": '{ command = "python3 server.py", port = "http" }'},
                    extra='[limits]\nmemory = "100MB"\n')
    (app / "server.py").chmod(0o644)
    base = public_dir / "k"
    base.mkdir()
    with KernelProcess(base, "[drivers.fs]\n") as k:
        wait_for(lambda: _fs_running(k), what="fs driver running")
        check = k.cli("check", str(app))
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout)["limits"]["memory"] == HUNDRED_MB
        r = k.cli("up", str(app), "--json", timeout=180)
        assert r.returncode == 0, f"{r.stderr}\n{k.log()}"
        instance = json.loads(r.stdout)["instances"][0]["id"]
        tree = detect(cgroup_base(k.runtime))
        if isinstance(tree, CgroupV2):
            (group,) = tree.directories(instance)
            assert (group / "memory.max").read_text().strip() == str(HUNDRED_MB)
        else:
            assert isinstance(tree, CgroupV1)
            memory = tree.mounts["memory"] / tree.base / instance
            written = int((memory / "memory.limit_in_bytes").read_text())
            assert written == HUNDRED_MB // mmap.PAGESIZE * mmap.PAGESIZE
        down = k.cli("down", "sized")
        assert down.returncode == 0, down.stderr
