"""SECURITY.md escape attempts 1-4, 8-14 and 16, each from inside a sandboxed app."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from integration.fs.harness import PYTHON, Host, sandbox_host

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with sandbox_host() as h:
        yield h


@pytest.fixture(scope="module")
def escape(host: Host) -> dict[str, Any]:
    """Run the escape probe once in app 'victim' next to a neighbour app."""
    secret = host.base / "secret"
    secret.write_text("host secret")
    data = host.base / "victim-data"
    ro = host.base / "victim-ro"
    ro.mkdir()
    neighbour = host.start(host.app("neighbour"), ["sleep", "60"])
    victim = host.app("victim", {"paths": {
        "data": {"path": str(data), "mode": "rw", "create": True},
        "ro": {"path": str(ro), "mode": "ro"},
    }, "limits": {"processes": 32}})
    # a symlink planted in the granted dir, pointing at a host file outside every grant
    data.mkdir(exist_ok=True)
    assert victim.uid is not None
    os.chown(data, victim.uid, victim.uid)
    os.symlink(str(secret), data / "to-secret")
    cgroup = host.sandbox.cgroups.directories("neighbour.web.0")[0] / "pids.max"
    run = host.start(victim, [PYTHON, "escape.py"], env={
        "DATA": str(data), "RO": str(ro), "APP": victim.directory, "SECRET": str(secret),
        "NEIGHBOUR": str(neighbour.pid), "CGROUP": str(cgroup)})
    result = run.result()
    result["_host"] = {"data": data, "ro": ro, "app": victim.directory, "neighbour": neighbour}
    return result


def test_writes_outside_grants_fail(escape: dict[str, Any]) -> None:
    """Writes to /, /etc, /usr, via '..' and via /proc/self/root hit a read-only file system."""
    for name in ("write_root", "write_etc", "write_usr", "write_dotdot", "write_proc_root"):
        assert escape[name] == "EROFS", (name, escape[name])
    assert not os.path.exists(os.path.join(escape["_host"]["data"], "..", "escape"))


def test_rename_and_link_out_fail(escape: dict[str, Any]) -> None:
    """Renaming or hard-linking a granted file elsewhere crosses a mount: refused."""
    assert escape["rename_out"] in ("EXDEV", "EROFS")
    assert escape["link_out"] in ("EXDEV", "EROFS")


def test_symlinks_and_proc_root_do_not_lead_out(escape: dict[str, Any]) -> None:
    """A symlink to a host file, the file's own path and /proc/self/root resolve inside."""
    for name in ("symlink_read", "read_secret", "read_secret_proc_root", "proc1_root_secret"):
        assert escape[name] == "ENOENT", (name, escape[name])


def test_read_only_grants_are_read_only(escape: dict[str, Any]) -> None:
    """A path granted 'ro' and the app directory refuse writes."""
    assert escape["write_ro_grant"] == "EROFS"
    assert escape["write_app_dir"] == "EROFS"


def test_host_secrets_are_unreadable(escape: dict[str, Any]) -> None:
    """/etc/shadow is refused; pid 1 is the sandbox's own init, the host's is invisible."""
    assert escape["read_shadow"] == "EACCES"
    assert escape["proc1_cmdline"] == "tini"


def test_other_apps_processes_are_out_of_reach(escape: dict[str, Any]) -> None:
    """Another app's /proc/PID/mem, environ, signals, ptrace and process_vm_readv fail."""
    assert escape["neighbour_mem"] == "ENOENT"
    assert escape["neighbour_environ"] == "ENOENT"
    assert escape["kill_neighbour"] == "ESRCH"
    assert escape["ptrace_attach"] == "EPERM"
    assert escape["process_vm_readv"] == "EPERM"


def test_setuid_binaries_gain_nothing(escape: dict[str, Any]) -> None:
    """su and mount run without privileges (nosuid, no_new_privs): they fail."""
    assert escape["su"] != "0"
    assert escape["mount_binary_rc"] != 0
    assert escape["uid"][0] == escape["uid"][1] != 0
    assert escape["uid"][3] == []
    status = escape["status"]
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_mount_namespace_operations_fail(escape: dict[str, Any]) -> None:
    """mount, umount, pivot_root, chroot, user namespaces, propagation changes: EPERM."""
    for name in ("mount", "umount", "pivot_root", "chroot", "unshare_user", "clone_newuser",
                 "propagation", "setns"):
        assert escape[name] == "EPERM", (name, escape[name])


def test_kernel_attack_surface_calls_fail(escape: dict[str, Any]) -> None:
    """keyctl, add_key, bpf, perf_event_open, userfaultfd, open_by_handle_at: EPERM."""
    for name in ("keyctl", "add_key", "bpf", "perf_event_open", "userfaultfd",
                 "open_by_handle_at"):
        assert escape[name] == "EPERM", (name, escape[name])


def test_tiocsti_fails(escape: dict[str, Any]) -> None:
    """TIOCSTI is refused by the filter (EPERM), not merely by the descriptor kind."""
    assert escape["tiocsti"] == "EPERM"


def test_cgroup_filesystem_is_unreachable(escape: dict[str, Any]) -> None:
    """pids.max of a group and release_agent cannot be written: no cgroupfs inside."""
    assert escape["cgroup_pids_max"] == "ENOENT"
    assert escape["cgroup_release_agent"] == "ENOENT"
    assert escape["cgroup_dir"] == "ENOENT"


def test_no_leaked_descriptors(escape: dict[str, Any]) -> None:
    """The app holds exactly stdin, stdout and stderr."""
    assert escape["fds"] == [0, 1, 2]


def test_fork_bomb_is_capped_and_neighbour_lives(host: Host) -> None:
    """Forking past processes=16 fails with EAGAIN; the app's children and a neighbour live."""
    neighbour = host.start(host.app("calm"), ["sleep", "60"])
    bomb = host.start(host.app("bomb", {"limits": {"processes": 16}}),
                      [PYTHON, "forkbomb.py"])
    result = bomb.result()
    assert result["failure"] == "EAGAIN"
    assert result["forked"] <= 16 - 2  # tini and the probe count too
    assert result["alive"] == result["forked"]
    from corral.launch import is_alive

    assert is_alive(neighbour.pid, neighbour.start_time)
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork


def test_memory_hog_is_killed_inside_its_cgroup(host: Host) -> None:
    """Allocating past memory=64MiB kills the allocating process only (SIGKILL, OOM)."""
    from corral.launch import is_alive

    neighbour = host.start(host.app("steady"), ["sleep", "60"])
    hog = host.start(host.app("hog", {"limits": {"memory": "64MiB"}}), [PYTHON, "memhog.py"])
    result = hog.result(timeout=60)
    assert result["child_signal"] == 9
    assert is_alive(neighbour.pid, neighbour.start_time)
    time.sleep(0.05)
    assert shutil.which("true")
