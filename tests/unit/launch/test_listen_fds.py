"""Socket activation on the launch path: passed sockets land on fd 3.. with LISTEN_FDS and a
LISTEN_PID equal to the program's own pid (also behind tini, in a pid namespace)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from conftest import require
from corral.launch import is_alive, launch
from corral.protocol._lifecycle import InstanceSpec, LaunchPlan

# Reports what it inherited, then serves one connection on fd 3 without binding anything.
PROBE = """
import json, os, socket, sys
fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))[:-1]
out = {"pid": os.getpid(), "LISTEN_FDS": os.environ.get("LISTEN_FDS"),
       "LISTEN_PID": os.environ.get("LISTEN_PID"), "fds": fds}
print(json.dumps(out), flush=True)
s = socket.socket(fileno=3)
c, _ = s.accept()
c.sendall(b"hello from fd 3\\n")
c.close()
"""


def _plan(tmp: Path, listen: list[int], **kw: object) -> LaunchPlan:
    spec = InstanceSpec(id="u.web.0", app="u", process="web", index=0,
                        argv=["/usr/bin/python3", "-c", PROBE],
                        env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp))
    return LaunchPlan(instance=spec, stdout=str(tmp / "out"), stderr=str(tmp / "err"),
                      listen_fds=listen, **kw)  # type: ignore[arg-type]


def _report(tmp: Path, pid: int, start: float) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = (tmp / "out").read_text() if (tmp / "out").exists() else ""
        if text.strip():
            return json.loads(text.splitlines()[0])  # type: ignore[no-any-return]
        assert is_alive(pid, start), (tmp / "err").read_text()
        time.sleep(0.02)
    raise AssertionError("no report from the probe")


@pytest.mark.parametrize("pid_namespace", [False, True])
def test_listening_socket_is_fd3_with_listen_pid_of_the_program(tmp_path: Path,
                                                                pid_namespace: bool) -> None:
    """The caller's listening socket is the program's fd 3 (only 0-3 open), LISTEN_FDS=1,
    LISTEN_PID its own pid; a client connecting to the caller's address is served by it."""
    if pid_namespace:
        require(os.geteuid() == 0 or os.path.exists("/proc/self/ns/user"), "namespaces")
        require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    # a descriptor number that the child must move out of the way (it may sit on 3 itself)
    pid, start = launch(_plan(tmp_path, [srv.fileno()], pid_namespace=pid_namespace))
    rep = _report(tmp_path, pid, start)
    assert rep["LISTEN_FDS"] == "1"
    assert rep["LISTEN_PID"] == str(rep["pid"]), rep
    assert rep["fds"] == [0, 1, 2, 3], rep
    if pid_namespace:
        assert rep["pid"] == 2, rep  # tini is 1
    else:
        assert rep["pid"] == pid
    with socket.create_connection(srv.getsockname(), timeout=5) as c:
        assert c.makefile().readline() == "hello from fd 3\n"
    srv.close()


def test_without_listen_fds_nothing_is_set(tmp_path: Path) -> None:
    """No socket: no LISTEN_* variables, descriptors 0-2 only (the probe then fails on fd 3)."""
    pid, start = launch(_plan(tmp_path, []))
    rep = _report(tmp_path, pid, start)
    assert rep["LISTEN_FDS"] is None and rep["LISTEN_PID"] is None
    assert rep["fds"] == [0, 1, 2]


def test_many_descriptors_keep_their_order(tmp_path: Path) -> None:
    """Three sockets land on 3, 4, 5 in the plan's order (LISTEN_FDS=3)."""
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        socks.append(s)
    script = ("import os, socket, json\n"
              "print(json.dumps([os.environ['LISTEN_FDS'], "
              "[socket.socket(fileno=f).getsockname()[1] for f in (3, 4, 5)]]), flush=True)\n")
    spec = InstanceSpec(id="u.web.0", app="u", process="web", index=0,
                        argv=["/usr/bin/python3", "-c", script], env={}, cwd=str(tmp_path))
    plan = LaunchPlan(instance=spec, stdout=str(tmp_path / "out"), stderr=str(tmp_path / "err"),
                      listen_fds=[s.fileno() for s in reversed(socks)])
    pid, start = launch(plan)
    assert pid > 0 and start > 0
    deadline = time.monotonic() + 10
    while not (tmp_path / "out").read_text().strip():
        assert time.monotonic() < deadline, (tmp_path / "err").read_text()
        time.sleep(0.02)
    count, ports = json.loads((tmp_path / "out").read_text())
    assert count == "3"
    assert ports == [s.getsockname()[1] for s in reversed(socks)]
    for s in socks:
        s.close()
