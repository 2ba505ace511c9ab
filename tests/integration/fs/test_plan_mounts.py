"""Extra plan mounts on a prepared root (the kernel's NOTIFY_SOCKET bind), and per-kernel
cgroup bases: one kernel's garbage collection never touches another kernel's instances."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import LaunchError
from corral.launch import is_alive, launch
from corral.protocol._lifecycle import AppSpec, BindMount, InstanceSpec, LaunchPlan
from corral_fs.sandbox import Sandbox, cgroup_base
from integration.fs.harness import PYTHON, Host, Running, sandbox_host

pytestmark = pytest.mark.root


@pytest.fixture
def host() -> Iterator[Host]:
    with sandbox_host() as h:
        yield h


def _plan(host: Host, app: AppSpec, argv: list[str], mounts: list[BindMount]
          ) -> tuple[LaunchPlan, Path]:
    name = app.name
    assert app.uid is not None
    instance = InstanceSpec(id=f"{name}.web.0", app=name, process="web", index=0, argv=argv,
                            cwd=app.directory, env={"PATH": "/usr/bin:/bin"})
    fragment = host.sandbox.prepare(app, instance, app.uid, app.uid)
    output = host.base / f"{name}.out"
    plan = LaunchPlan(instance=instance, root=fragment.root, cgroup_procs=fragment.cgroup_procs,
                      uid=fragment.uid, gid=fragment.gid, pid_namespace=True,
                      seccomp=fragment.seccomp, stdout=str(output), stderr=str(output),
                      mounts=mounts)
    return plan, output


def test_plan_mounts_are_grafted_onto_a_prepared_root(host: Host) -> None:
    """A socket outside every grant, bound by the plan, is reachable inside; its mount point
    is made on the root's tmpfs, which stays read-only for the app; the host is untouched."""
    notify_dir = Path(tempfile.mkdtemp(prefix="corral-notify-", dir="/var/tmp"))
    try:
        path = notify_dir / "app.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(path))
        server.settimeout(20)
        app = host.app("grafted")
        assert app.uid is not None
        os.chown(path, app.uid, -1)
        script = ("import errno, json, os, socket\n"
                  "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'READY=1', os.environ['SOCK'])\n"
                  "r = {}\n"
                  "for p in ('/escape', os.path.dirname(os.environ['SOCK']) + '/escape'):\n"
                  "    try:\n"
                  "        open(p, 'w')\n"
                  "        r[p] = 'ok'\n"
                  "    except OSError as e:\n"
                  "        r[p] = errno.errorcode[e.errno]\n"
                  "print(json.dumps(r))\n")
        plan, output = _plan(host, app, [PYTHON, "-c", script],
                             [BindMount(source=str(path), target=str(path), mode="rw")])
        plan.instance.env["SOCK"] = str(path)
        pid, start = launch(plan)
        run = Running(plan.instance.id, pid, start, output)
        host.running.append(run)
        assert server.recv(100) == b"READY=1"
        result = run.result()
        assert result == {"/escape": "EROFS", str(notify_dir / "escape"): "EROFS"}
        assert sorted(os.listdir(notify_dir)) == ["app.sock"]
        server.close()
    finally:
        for entry in notify_dir.iterdir():
            entry.unlink()
        notify_dir.rmdir()


def test_plan_mount_inside_a_bound_host_dir_is_refused(host: Host) -> None:
    """A mount point that would have to be created inside a host bind (/usr) is refused at
    step 'mounts' (EROFS), and nothing appears on the host."""
    source = host.base / "extra"
    source.mkdir()
    target = "/usr/share/corral-test-graft"
    plan, _ = _plan(host, host.app("refused"), ["true"],
                    [BindMount(source=str(source), target=target, mode="ro")])
    with pytest.raises(LaunchError) as info:
        launch(plan)
    assert (info.value.step, info.value.details["errno_name"]) == ("mounts", "EROFS")
    assert not os.path.exists(target)
    host.sandbox.release(plan.instance.id)


def test_cgroup_bases_are_per_kernel_and_removed_with_their_last_group(host: Host) -> None:
    """Two sandboxes (two kernels' runtime dirs) have separate bases; collecting one leaves
    the other's instance alone; a base is gone once its last group is."""
    assert cgroup_base(Path("/run/corral")) == "corral"
    mine = cgroup_base(host.base / "run")
    assert mine.startswith("corral-") and mine != cgroup_base(host.base / "other")
    other = Sandbox(host.base / "other")
    victim = host.start(host.app("survivor"), ["sleep", "60"])
    assert other.collect(live=[]) == []  # sees nothing of ours
    assert is_alive(victim.pid, victim.start_time)
    assert host.sandbox.collect(live=[]) == ["survivor.web.0"]
    assert not is_alive(victim.pid, victim.start_time)
    for base in host.sandbox.cgroups.bases():
        assert not base.exists(), base
    assert other.known() == set()
