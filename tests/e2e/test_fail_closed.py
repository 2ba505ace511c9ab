"""Fail closed: no app starts without a driver that confines it (SECURITY.md promise 1).

With the fs or the net driver down, merely restarting or failed (flapping), a deploy waits a
bounded time and is refused naming the driver, its state and its reason; nothing of it is
claimed or started; a crashed instance is not restarted until the driver is back, and then
it runs confined; `corral up` works again once the driver recovers. A host with no sandbox
driver at all refuses deploys unless its config says `unconfined = true`, and then says so.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from corral.testing import KernelProcess, wait_for
from e2e.apps import free_port, write_app
from e2e.test_lb_deployed import NetHost, driver_logs, drivers_running, new_net_host, require_net

pytestmark = pytest.mark.root

DRIVERS = ("net", "fs")
WAIT_S = 3.0  # host config driver_wait_s: how long a deploy waits for a missing driver

# Runs the real driver (``python -m MODULE``, by exec: same pid, as the supervisor knows it)
# once GATE_FILE is gone: while the file exists, a restarted driver stays "restarting".
GATE = textwrap.dedent('''
    import os, sys, time
    while os.path.exists(os.environ["GATE_FILE"]):
        time.sleep(0.05)
    os.execv(sys.executable, [sys.executable, "-m", sys.argv[1]])
''')


def gated_host(base: Path, host: NetHost, cap: str, extra: str = "") -> tuple[KernelProcess,
                                                                                Path]:
    """A kernel with the net and fs drivers, ``cap`` started through GATE."""
    base.mkdir()
    gate, flag = base / "gate.py", base / "gate.closed"
    gate.write_text(GATE)
    toml = host.host_toml(DRIVERS).replace(
        f"[drivers.{cap}]\n",
        f"[drivers.{cap}]\nexec = [\"{sys.executable}\", \"{gate}\", \"corral_{cap}\"]\n"
        f"capability = \"{cap}\"\nenv = {{ GATE_FILE = \"{flag}\" }}\n")
    k = KernelProcess(base, f"driver_wait_s = {WAIT_S}\n{extra}{toml}")
    k.start()
    try:
        wait_for(lambda: drivers_running(k, DRIVERS), 20, what="drivers running")
    except BaseException:
        print(k.log(), driver_logs(k))
        k.teardown()
        raise
    return k, flag


def app_dir(public_dir: Path, name: str) -> Path:
    """One instance of a small HTTP server, listening on every address of its namespace."""
    d = write_app(public_dir / name, name, {"http": free_port()},
                  {"web": '{ command = "python3 server.py", port = "http" }'})
    server = d / "server.py"
    server.write_text(server.read_text().replace('("127.0.0.1",', '("0.0.0.0",'))
    return d


def driver(k: KernelProcess, name: str) -> dict[str, Any]:
    r = k.cli("drivers", "--json")
    assert r.returncode == 0, r.stderr
    return next(d for d in json.loads(r.stdout) if d["name"] == name)  # type: ignore[no-any-return]


def instance(k: KernelProcess, app: str) -> dict[str, Any]:
    r = k.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    apps = {a["app"]: a for a in json.loads(r.stdout)}
    (inst,) = apps[app]["instances"]
    return inst  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().lower()


def assert_confined(pid: int) -> None:
    """The instance runs in its own mount and network namespaces, under the syscall filter
    and not as root: what the fs and net drivers contribute."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Seccomp"].strip() == "2", fields["Seccomp"]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Uid"].split()[0] != "0"
    for ns in ("mnt", "net", "pid"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def refused(k: KernelProcess, d: Path, app: str, exit_code: int = 1) -> str:
    """`corral up` is refused; nothing of the app is claimed or running."""
    r = k.cli("up", str(d), timeout=60)
    assert r.returncode == exit_code, (r.returncode, r.stdout, r.stderr)
    assert k.call("ledger.list", {"owner": app})["records"] == []
    assert app not in {a["app"] for a in k.call("app.ps")["apps"]}
    return r.stderr


def kill_driver(k: KernelProcess, name: str) -> int:
    pid = int(driver(k, name)["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: driver(k, name)["pid"] != pid, 10, what=f"{name} noticed dead")
    return pid


def back_and_confined(k: KernelProcess, cap: str, crashed_pid: int, late: Path) -> None:
    """Once the driver is connected again: the crashed instance restarts, confined, and the
    deploy that was refused now goes through, confined too."""
    wait_for(lambda: drivers_running(k, DRIVERS), 20, what=f"{cap} back")
    wait_for(lambda: instance(k, "keep")["pid"] != crashed_pid
             and instance(k, "keep")["state"] == "ready", 30, what="the restart")
    assert_confined(instance(k, "keep")["pid"])
    r = k.cli("up", str(late))
    assert r.returncode == 0, r.stderr
    assert_confined(instance(k, "late")["pid"])


@pytest.fixture
def net_host() -> NetHost:
    require_net()
    return new_net_host()


@pytest.mark.parametrize("cap", ["fs", "net"])
def test_restarting_driver_refuses_deploys_and_holds_back_restarts(
        cap: str, public_dir: Path, net_host: NetHost) -> None:
    """The driver stays 'restarting' (its new process waits at a gate): `corral up` waits
    driver_wait_s, then is refused naming it; the running app keeps running; its crashed
    instance waits, and comes back confined once the driver is connected again."""
    k, gate = gated_host(public_dir / "k", net_host, cap)
    try:
        r = k.cli("up", str(app_dir(public_dir, "keep")))
        assert r.returncode == 0, r.stderr + k.log()
        first = instance(k, "keep")
        gate.touch()
        kill_driver(k, cap)
        assert driver(k, cap)["state"] == "restarting"

        t0 = time.monotonic()
        err = refused(k, app_dir(public_dir, "late"), "late")
        waited = time.monotonic() - t0
        assert f"driver '{cap}' ({cap}) is restarting" in err, err
        assert "deploy of 'late' refused" in err and "exited (killed by SIGKILL)" in err, err
        assert WAIT_S - 0.5 <= waited <= WAIT_S + 20, waited  # it waited, boundedly
        assert alive(first["pid"]), "a running app must keep running"

        # a crash while the driver is down: no unconfined restart, the instance waits
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: instance(k, "keep")["waiting"], 20, what="the instance waiting")
        time.sleep(1.0)
        now = instance(k, "keep")
        assert now["pid"] == first["pid"] and not alive(now["pid"]), now
        assert f"driver '{cap}'" in now["waiting"], now
        assert "(waiting for a driver)" in k.cli("ps").stdout

        gate.unlink()  # the driver comes up; the instance is started again, confined
        back_and_confined(k, cap, first["pid"], public_dir / "late")
    finally:
        gate.unlink(missing_ok=True)
        k.teardown()


@pytest.mark.parametrize("cap", ["fs", "net"])
def test_failed_driver_refuses_at_once_until_restarted(cap: str, public_dir: Path,
                                                        net_host: NetHost) -> None:
    """Killed past the restart limit the driver is 'failed': `corral up` is refused at once
    with the reason and the way out; the crashed instance stays down; `corral drivers
    restart` brings the driver back and with it the instance, confined."""
    k, gate = gated_host(public_dir / "k", net_host, cap,
                         "restart_limit = 1\nrestart_window_s = 120\n")
    try:
        r = k.cli("up", str(app_dir(public_dir, "keep")))
        assert r.returncode == 0, r.stderr
        first = instance(k, "keep")
        kill_driver(k, cap)
        wait_for(lambda: drivers_running(k, DRIVERS), 20, what=f"{cap} restarted once")
        pid = int(driver(k, cap)["pid"])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: driver(k, cap)["state"] == "failed", 10, what=f"{cap} failed")

        t0 = time.monotonic()
        err = refused(k, app_dir(public_dir, "late"), "late")
        assert time.monotonic() - t0 < WAIT_S, "a failed driver is not waited for"
        assert f"driver '{cap}' ({cap}) is failed: exited 2 times" in err, err
        assert f"`corral drivers restart {cap}`" in err, err
        drivers_out = k.cli("drivers").stdout
        assert "failed" in drivers_out and "exited 2 times" in drivers_out, drivers_out

        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: instance(k, "keep")["waiting"], 20, what="the instance waiting")
        assert not alive(instance(k, "keep")["pid"])

        r = k.cli("drivers", "restart", cap)
        assert r.returncode == 0, r.stderr
        back_and_confined(k, cap, first["pid"], public_dir / "late")
    finally:
        gate.unlink(missing_ok=True)
        k.teardown()


def test_no_sandbox_driver_needs_the_host_to_say_unconfined(public_dir: Path) -> None:
    """Without the fs driver a deploy is refused (nothing claimed) unless the host config
    says `unconfined = true`; then the deploy output and `corral ps` say so."""
    d = app_dir(public_dir, "bare")
    base = public_dir / "strict"
    base.mkdir()
    with KernelProcess(base, 'disabled = ["net", "fs", "log", "lb", "cron"]\n') as k:
        err = refused(k, d, "bare", exit_code=2)  # the host config is the input to fix
        assert "no sandbox driver (fs) is enabled" in err and "unconfined = true" in err, err
    base = public_dir / "loose"
    base.mkdir()
    with KernelProcess(base, 'disabled = ["net", "fs", "log", "lb", "cron"]\n'
                             "unconfined = true\n") as k:
        try:
            r = k.cli("up", str(d))
            assert r.returncode == 0, r.stderr
            assert "instances run unconfined" in r.stdout, r.stdout
            assert "UNCONFINED" in k.cli("ps").stdout
            assert json.loads(k.cli("ps", "--json").stdout)[0]["confined"] is False
        finally:
            k.teardown()
