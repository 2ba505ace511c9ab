"""The operator's host: corrald's readiness for systemd, and `corral host reset` after a crash.

The reset test deploys through a real kernel with the net, fs, lb and log drivers (names
scoped to the test by ``NetHost``), kills the kernel and the drivers with SIGKILL, deletes the
home, and checks that `corral host reset --yes` leaves the host as it was before the deploy.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from corral.testing import KernelProcess
from e2e.test_daemon import NO_DRIVERS
from e2e.test_lb_deployed import NetHost, lb_app, new_net_host, require_net, start_kernel, up


def _notify_receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    return sock


def _ready_message(tmp_path: Path, notify_socket: str, bind: str) -> str:
    with _notify_receiver(bind) as sock:
        with KernelProcess(tmp_path, NO_DRIVERS, extra_env={"NOTIFY_SOCKET": notify_socket}) as k:
            message = sock.recv(4096).decode()
            assert k.proc is not None
            # once READY=1 is out, the kernel serves
            assert k.call("kernel.status", timeout=2)["pid"] == k.proc.pid
            return message


def test_corrald_sends_ready_on_notify_socket(tmp_path: Path) -> None:
    """Started with NOTIFY_SOCKET (a path), corrald sends READY=1 once it serves."""
    path = str(tmp_path / "notify.sock")
    lines = _ready_message(tmp_path, path, path).split("\n")
    assert "READY=1" in lines
    assert any(line.startswith("STATUS=serving ipc://") for line in lines), lines


def test_corrald_sends_ready_on_abstract_notify_socket(tmp_path: Path) -> None:
    """'@name' is an abstract socket (systemd's own form): READY=1 arrives there too."""
    name = f"corral-test-{secrets.token_hex(6)}"
    assert "READY=1" in _ready_message(tmp_path, "@" + name, "\0" + name).split("\n")


# ---- corral host reset -------------------------------------------------------------------------


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def _cgroup_dirs(runtime: Path) -> set[str]:
    from corral_fs._cgroups import detect
    from corral_fs.sandbox import cgroup_base

    tree = detect(cgroup_base(runtime))
    found = set()
    for base in tree.bases():
        if base.is_dir():
            found.add(str(base))
            found.update(str(p) for p in base.rglob("*") if p.is_dir())
    return found


def _corral_processes(home: Path, runtime: Path) -> set[str]:
    """Processes of this test's corral: instances (their manifest under the home), and the
    kernel, drivers and keepers (this runtime dir in their environment)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if (env.get("CORRAL_MANIFEST", "").startswith(str(home) + "/")
                    or env.get("CORRAL_RUNTIME_DIR") == str(runtime)):
                if proc.pid != os.getpid():
                    found.add(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except (psutil.Error, OSError):
            continue
    return found


def snapshot(host: NetHost, base: Path, public_dir: Path) -> dict[str, set[str]]:
    """The host state this test's corral may change, as the host's tools show it, kept to
    what carries this test's names (other test sessions may change the rest meanwhile).
    ``base`` is the kernel's directory (``KernelProcess``: home and run below it)."""
    home, runtime = base / "home", base / "run"
    tables = {line.strip() for line in _run("nft", "list", "tables").splitlines()
              if re.search(rf"\b({host.table}(_nat)?|{host.lb_table})$", line.strip())}
    links = {m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", _run("ip", "-o", "link"), re.M)
             if m.group(1).startswith(host.link_prefix)}
    netns = {line.split()[0] for line in _run("ip", "netns", "list").splitlines()
             if line.startswith(host.netns_prefix)}
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f
                  if line.split()[4].startswith((str(public_dir) + "/", f"{runtime}-notify"))}
    return {"nft tables": tables, "links": links, "netns": netns, "mounts": mounts,
            "cgroups": _cgroup_dirs(runtime), "processes": _corral_processes(home, runtime)}


@pytest.mark.root
def test_host_reset_after_a_crash_and_a_lost_home(public_dir: Path) -> None:
    """Two apps deployed (an HTTP proxy one and an nft-plane TCP one), then the kernel and
    every driver killed with SIGKILL and the home deleted: `corral host reset` without --yes
    lists what it would remove and removes nothing; with --yes it removes the instances and
    their tini and log keepers, the network namespaces, links and nft tables, the mounts,
    the cgroups and the runtime dir, and the host is as before the deploy."""
    require_net()
    host = new_net_host()
    base = public_dir / "k"
    k: KernelProcess | None = None
    try:
        before = snapshot(host, base, public_dir)
        k = start_kernel(base, host)
        _p1, _f1, _n1, web = lb_app(public_dir, "rweb")
        up(k, web)
        _p2, _f2, _n2, tcp = lb_app(public_dir, "rtcp", plane="nft", mode="tcp",
                                    health="tcp = true")
        up(k, tcp)
        during = snapshot(host, base, public_dir)
        for what, found in during.items():
            assert found - before[what], f"the deploy left no {what} to find: the test is void"
        assert f"table ip {host.lb_table}" in during["nft tables"], during["nft tables"]

        drivers = json.loads(k.cli("drivers", "--json").stdout)
        k.kill9()
        for d in drivers:
            if d["pid"]:
                os.kill(d["pid"], signal.SIGKILL)
        shutil.rmtree(k.home)
        keepers = [p for p in _corral_processes(k.home, k.runtime) if "corral-log-keeper:" in p]
        assert keepers, "the log keepers should have outlived the driver"

        dry = k.cli("host", "reset")
        assert dry.returncode == 0, dry.stderr
        assert "dry run: nothing was removed" in dry.stdout
        for name in during["netns"]:
            assert name in dry.stdout
        assert "instance rweb.web.1" in dry.stdout and "corral-log-keeper:" in dry.stdout
        assert snapshot(host, base, public_dir)["netns"] == during["netns"], "a dry run removed"

        done = k.cli("host", "reset", "--yes", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        for line in dry.stdout.splitlines():  # everything listed was removed
            if line.startswith("  "):
                assert f"  removed {line.strip().split(' (')[0]}" in done.stdout, line
        after = snapshot(host, base, public_dir)
        assert after == before, {w: after[w] - before[w] for w in after}
        assert not k.runtime.exists() and not Path(f"{k.runtime}-notify").exists()
        assert not Path(f"/run/corral-net/{host.table}.claim").exists()

        again = k.cli("host", "reset", "--yes")
        assert again.returncode == 0 and "nothing of corral's found" in again.stdout
    finally:
        if k is not None:
            k.kill9()
            k.cli("host", "reset", "--yes", timeout=180)  # a failed test leaves nothing either
