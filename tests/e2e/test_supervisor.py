"""Driver supervision: handshake, kill -9 recovery within 1 s, flapping, broken packages."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.testing import KernelProcess, running_kernel, wait_for

ECHO = Path(__file__).parent / "drivers" / "echo_driver.py"


def host_toml(mode: str = "") -> str:
    lines = ["[drivers.echo]", f'exec = ["{sys.executable}", "{ECHO}"]', 'capability = "cron"',
             f'env = {{ ECHO_MODE = "{mode}" }}', "[drivers.echo.config]", 'greeting = "hi"']
    return "\n".join(lines) + "\n"



def driver(k: KernelProcess, name: str = "echo") -> dict[str, Any]:
    return next(d for d in k.call("drivers.list")["drivers"] if d["name"] == name)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[KernelProcess]:
    with running_kernel(tmp_path, host_toml(), drivers=("echo",)) as k:
        yield k


def test_driver_handshake_and_query(kernel: KernelProcess) -> None:
    """A driver started by the supervisor says HELLO, gets WELCOME and state.sync, serves."""
    d = driver(kernel)
    assert d["capability"] == "cron" and set(d["ops"]) == {"state.sync", "query.cron.echo"}
    res = kernel.call("driver.query", {"capability": "cron", "query": "echo", "args": {"x": 1}})
    assert res["echo"] == {"x": 1} and res["pid"] == d["pid"]
    synced = wait_for(lambda: kernel.call("driver.query", {"capability": "cron", "query": "echo",
                                                         "args": {}})["synced"])
    assert synced == {"apps": 0, "instances": 0}  # state.sync came right after WELCOME


def test_query_not_served_is_refused(kernel: KernelProcess) -> None:
    """A query the driver did not declare is refused by the kernel, not forwarded."""
    r = kernel.cli("query", "cron", "nope")
    assert r.returncode == 1 and "does not serve query.cron.nope" in r.stderr


def test_kill9_driver_is_back_within_one_second(kernel: KernelProcess) -> None:
    """SIGKILL of a driver: a new process is connected and running within 1 s."""
    old = driver(kernel)["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    d = wait_for(lambda: (x := driver(kernel))["pid"] != old and x["state"] == "running" and x,
                 timeout=5, step=0.01)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"driver back after {elapsed:.2f}s"
    assert d["restarts"] == 1
    res = kernel.call("driver.query", {"capability": "cron", "query": "echo", "args": {}})
    assert res["pid"] == d["pid"]


def test_flapping_driver_is_marked_failed(tmp_path: Path) -> None:
    """A driver that keeps dying is restarted restart_limit times, then left failed."""
    toml = "restart_limit = 3\nrestart_window_s = 30\n" + host_toml("crash")
    with KernelProcess(tmp_path, toml) as k:
        d = wait_for(lambda: (x := driver(k))["state"] == "failed" and x, timeout=15)
        assert "exited 4 times" in d["reason"] and "exit 3" in d["reason"]
        assert k.call("kernel.status")["protocol"] == "CDP/1"  # the kernel is fine


def test_hello_breaking_the_capability_contract_is_refused(tmp_path: Path) -> None:
    """A driver declaring another capability's query is refused with the precise reason."""
    with KernelProcess(tmp_path, host_toml("badops")) as k:
        d = wait_for(lambda: (x := driver(k))["reason"].startswith("HELLO refused") and x)
        assert "query.net.stats" in d["reason"] and "belongs to capability 'net'" in d["reason"]


def test_broken_driver_package_is_disabled_not_fatal(tmp_path: Path) -> None:
    """An installed entry point that cannot load disables that driver; the kernel runs."""
    site = tmp_path / "site"
    dist = site / "corral_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: corral-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[corral.drivers]\nbroken = corral_broken:DRIVER\n")
    (site / "corral_broken.py").write_text("raise ImportError('missing libfoo')\n")
    toml = (f'[drivers.broken]\n[drivers.echo]\nexec = ["{sys.executable}", "{ECHO}"]\n'
            'capability = "cron"\n')
    env = {"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
    with KernelProcess(_mk(tmp_path / "k"), toml, extra_env=env) as k:
        b = driver(k, "broken")
        assert b["state"] == "disabled"
        assert "ImportError: missing libfoo" in b["reason"]
        wait_for(lambda: driver(k)["state"] == "running")
        r = k.cli("drivers")
        assert r.returncode == 0 and "missing libfoo" in r.stdout


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_drivers_outlive_a_kernel_crash_and_are_adopted(tmp_path: Path) -> None:
    """kill -9 of corrald leaves the driver running; the next kernel adopts it (same pid)."""
    k = KernelProcess(tmp_path, host_toml())
    k.start(stop_drivers=True)
    try:
        pid = wait_for(lambda: (x := driver(k))["state"] == "running" and x["pid"])
        k.kill9()
        time.sleep(0.3)
        os.kill(pid, 0)  # still alive
        k.start(stop_drivers=True)
        d = wait_for(lambda: (x := driver(k))["state"] == "running" and x, timeout=10)
        assert d["pid"] == pid and d["restarts"] == 0
    finally:
        k.teardown()
