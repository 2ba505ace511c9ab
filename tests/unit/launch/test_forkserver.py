"""The fork server: restarted after kill -9, never outlives its caller, and the instances it
launched outlive it; concurrent launches and launches from a forked caller work."""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from corral.launch import is_alive, launch, signal_instance
from corral.launch._forkserver import SERVER
from corral.protocol._lifecycle import InstanceSpec, LaunchPlan
from corral.testing import wait_for


def plan(argv: list[str], cwd: str = "/", **kw: object) -> LaunchPlan:
    spec = InstanceSpec(id="u.web.0", app="u", process="web", index=0, argv=argv,
                        env={"PATH": "/usr/bin:/bin"}, cwd=cwd)
    return LaunchPlan(instance=spec, **kw)  # type: ignore[arg-type]


def server_pid() -> int:
    pid = SERVER.pid
    assert pid is not None
    return pid


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               if psutil.pid_exists(pid) else True)


def test_server_is_small_and_isolated_from_the_terminal() -> None:
    """One server, its own session, only ctypes-level imports (well under the kernel's size)."""
    launch(plan(["true"]))
    server = psutil.Process(server_pid())
    assert server.ppid() == os.getpid()
    assert os.getsid(server.pid) == server.pid
    assert server.cmdline()[1:3] == ["-I", "-S"]
    assert server.memory_info().rss < 20 * 1024 * 1024
    assert server.num_threads() == 1


def test_kill9_of_server_breaks_nothing() -> None:
    """An instance survives the server's death; the next launch starts a new server."""
    pid, start = launch(plan(["sleep", "30"]))
    first = server_pid()
    kill9(first)
    try:
        assert is_alive(pid, start)
        pid2, start2 = launch(plan(["sleep", "30"]))
        assert server_pid() != first
        assert is_alive(pid2, start2)
        signal_instance(pid2, start2, signal.SIGKILL)
    finally:
        signal_instance(pid, start, signal.SIGKILL)


def test_server_killed_with_an_order_in_flight_is_replaced_and_the_order_resent(
    tmp_path: Path,
) -> None:
    """A stopped server holding an unread order is killed: the launch still succeeds."""
    launch(plan(["true"]))
    first = server_pid()
    os.kill(first, signal.SIGSTOP)
    result: list[tuple[int, float]] = []
    out = tmp_path / "out"
    worker = threading.Thread(target=lambda: result.append(
        launch(plan(["echo", "resent"], stdout=str(out)))))
    worker.start()
    time.sleep(0.3)  # the order now sits in the stopped server's socket
    assert not result
    os.kill(first, signal.SIGKILL)
    worker.join(10)
    assert result, "launch did not return"
    assert server_pid() != first
    wait_for(lambda: out.exists() and out.read_text() == "resent\n")


def test_server_exits_with_its_caller_and_instances_survive(tmp_path: Path) -> None:
    """kill -9 of the calling process: EOF on the socket ends the server; the app runs on."""
    code = ("import sys, time; sys.path[:0] = " + repr(sys.path) + "\n"
            "from corral.launch import launch\n"
            "from corral.launch._forkserver import SERVER\n"
            "from corral.protocol._lifecycle import InstanceSpec, LaunchPlan\n"
            "spec = InstanceSpec(id='u.web.0', app='u', process='web', index=0,\n"
            "    argv=['sleep', '30'], env={'PATH': '/usr/bin:/bin'}, cwd='/')\n"
            "pid, start = launch(LaunchPlan(instance=spec))\n"
            "print(pid, start, SERVER.pid, flush=True)\n"
            "time.sleep(60)\n")
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    pid_s, start_s, server_s = caller.stdout.readline().split()
    pid, start, server = int(pid_s), float(start_s), int(server_s)
    try:
        assert psutil.Process(server).ppid() == caller.pid
        caller.kill()
        caller.wait(5)
        wait_for(lambda: not psutil.pid_exists(server)
                   or psutil.Process(server).status() == psutil.STATUS_ZOMBIE)
        assert is_alive(pid, start)
    finally:
        signal_instance(pid, start, signal.SIGKILL)


def test_concurrent_launches_from_threads(tmp_path: Path) -> None:
    """Eight threads launch at once through one server: eight distinct processes, all outputs."""
    results: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results.append(launch(plan(["echo", str(i)], stdout=str(tmp_path / f"{i}.out"))))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert len({pid for pid, _ in results}) == 8
    for i in range(8):
        wait_for(lambda i=i: (tmp_path / f"{i}.out").read_text() == f"{i}\n")


def test_forked_caller_gets_its_own_server(tmp_path: Path) -> None:
    """A forked copy of the caller does not share (or hold open) its parent's server."""
    launch(plan(["true"]))
    parent_server = server_pid()
    out = tmp_path / "child"
    child = os.fork()
    if child == 0:
        try:
            launch(plan(["echo", "from-fork"], stdout=str(out)))
            os._exit(0 if SERVER.pid not in (None, parent_server) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: out.exists() and out.read_text() == "from-fork\n")
    assert server_pid() == parent_server


def test_oversized_order_is_refused_at_step_plan() -> None:
    """An environment larger than an order may carry is a clear error, not a hang."""
    from corral.errors import LaunchError

    spec = InstanceSpec(id="u.web.0", app="u", process="web", index=0, argv=["true"],
                        env={"BIG": "x" * (2 << 20)}, cwd="/")
    with pytest.raises(LaunchError) as info:
        launch(LaunchPlan(instance=spec))
    assert info.value.step == "plan"


def test_malformed_order_leaves_the_server_serving(tmp_path: Path) -> None:
    """Garbage on the socket, and an order whose fields are wrong, are told back as step
    'forkserver' where possible; the same server then serves the next launch."""
    launch(plan(["true"]))
    first = server_pid()
    SERVER.send(b"\x00not marshal", [])
    err_r, err_w = os.pipe()
    SERVER.send(marshal.dumps({"fds": {"err_w": 0}}), [err_w])
    os.close(err_w)
    told = os.read(err_r, 4000).split(b"\0")
    os.close(err_r)
    assert told[0] == b"forkserver"
    out = tmp_path / "out"
    launch(plan(["echo", "still"], stdout=str(out)))
    assert server_pid() == first
    wait_for(lambda: out.read_text() == "still\n")
