"""The launch API: identity, not-a-child, stdio, descriptors, and errors named by step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from corral.errors import LaunchError
from corral.launch import is_alive, launch, signal_instance
from corral.protocol._lifecycle import InstanceSpec, LaunchPlan


def plan(argv: list[str], tmp: Path | None = None, **kw: object) -> LaunchPlan:
    spec = InstanceSpec(id="u.web.0", app="u", process="web", index=0, argv=argv,
                        env={"PATH": "/usr/bin:/bin", "MARK": "corral"}, cwd=str(tmp or "/"))
    return LaunchPlan(instance=spec, **kw)  # type: ignore[arg-type]


def wait_gone(pid: int, start: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while is_alive(pid, start):
        assert time.monotonic() < deadline, "still alive"
        time.sleep(0.01)


def _we_are_subreaper() -> bool:
    import ctypes

    flag = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(37, ctypes.byref(flag), 0, 0, 0)  # GET_SUBREAPER
    return bool(flag.value)


def test_launch_returns_identity_and_process_is_not_our_child(tmp_path: Path) -> None:
    """(pid, create_time) identifies the process; it is in its own session, not our child."""
    pid, start = launch(plan(["sleep", "30"], tmp_path))
    try:
        proc = psutil.Process(pid)
        assert proc.create_time() == start
        # Not forked by us: its parent is the fork server's middle process, gone at once, so
        # it is re-parented to the nearest subreaper (us only if a test made us one) or init.
        if _we_are_subreaper():
            assert proc.ppid() == os.getpid()
        else:
            assert pid not in {c.pid for c in psutil.Process().children()}
        assert os.getsid(pid) != os.getsid(0)
        assert os.getpgid(pid) == pid
        assert is_alive(pid, start)
        assert not is_alive(pid, start + 1.0)
    finally:
        assert signal_instance(pid, start, signal.SIGKILL)
    wait_gone(pid, start)
    assert not signal_instance(pid, start, signal.SIGTERM)


def test_stdio_env_cwd_and_only_three_descriptors(tmp_path: Path) -> None:
    """stdout/stderr append to the plan's file, stdin is /dev/null, fds are exactly 0,1,2."""
    out = tmp_path / "out.log"
    out.write_text("before\n")
    script = ("import os,sys; print(os.getcwd(), os.environ['MARK'], sys.stdin.read()=='');"
              "print(sorted(int(f) for f in os.listdir('/proc/self/fd'))[:-1]);"
              "print('err', file=sys.stderr)")
    pid, start = launch(plan(["/usr/bin/python3", "-u", "-c", script], tmp_path,
                             stdout=str(out), stderr=str(out)))
    wait_gone(pid, start)
    lines = out.read_text().splitlines()
    assert lines[0] == "before"
    assert lines[1] == f"{tmp_path} corral True"
    assert lines[2] == "[0, 1, 2]"
    assert lines[3] == "err"


def test_missing_executable_is_step_exec_enoent(tmp_path: Path) -> None:
    """A program not on PATH fails at step 'exec' with ENOENT, reported by the child."""
    with pytest.raises(LaunchError) as info:
        launch(plan(["corral-no-such-program"], tmp_path))
    assert info.value.step == "exec"
    assert info.value.details["errno_name"] == "ENOENT"


def test_not_executable_is_step_exec_eacces(tmp_path: Path) -> None:
    """A file without the x bit fails at step 'exec' with EACCES."""
    target = tmp_path / "prog"
    target.write_text("#!/bin/sh\n")
    with pytest.raises(LaunchError) as info:
        launch(plan([str(target)], tmp_path))
    assert (info.value.step, info.value.details["errno_name"]) == ("exec", "EACCES")


def test_missing_cwd_is_step_cwd(tmp_path: Path) -> None:
    """A working directory that does not exist fails at step 'cwd'."""
    with pytest.raises(LaunchError) as info:
        launch(plan(["true"], tmp_path / "nope"))
    assert (info.value.step, info.value.details["errno_name"]) == ("cwd", "ENOENT")


def test_fifo_without_reader_is_step_stdout(tmp_path: Path) -> None:
    """A stdout FIFO nobody reads fails at once (ENXIO) instead of hanging the caller."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LaunchError) as info:
        launch(plan(["true"], tmp_path, stdout=str(fifo)))
    assert (info.value.step, info.value.details["errno_name"]) == ("stdout", "ENXIO")


def test_fifo_with_reader_carries_output(tmp_path: Path) -> None:
    """A FIFO with a reader becomes the app's stdout."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pid, start = launch(plan(["echo", "through"], tmp_path, stdout=str(fifo)))
        wait_gone(pid, start)
        assert os.read(reader, 100) == b"through\n"
    finally:
        os.close(reader)


def test_unknown_seccomp_profile_is_refused_before_fork(tmp_path: Path) -> None:
    """An unknown seccomp profile name is a LaunchError at step 'seccomp'."""
    with pytest.raises(LaunchError) as info:
        launch(plan(["true"], tmp_path, seccomp="nope"))
    assert info.value.step == "seccomp"


def test_seccomp_default_denies_unshare(tmp_path: Path) -> None:
    """Under the default profile unshare() fails with EPERM, even for a user namespace."""
    out = tmp_path / "out"
    script = ("import ctypes,os; l=ctypes.CDLL(None,use_errno=True);"
              "print(l.unshare(0x10000000), ctypes.get_errno())")
    pid, start = launch(plan(["/usr/bin/python3", "-u", "-c", script], tmp_path,
                             seccomp="default", stdout=str(out)))
    wait_gone(pid, start)
    assert out.read_text().split() == ["-1", "1"]
