"""One-off commands: a client's FIFOs or pseudo-terminal as fds 0-2, a controlling terminal
behind tini, refusals of anything else a client could name, and an environment kept secret."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import require
from corral.cli._terminal import attach_stdio
from corral.errors import LaunchError
from corral.launch import become_subreaper, launch, reap
from corral.protocol._lifecycle import InstanceSpec, LaunchPlan

pytestmark = pytest.mark.root

NOBODY = 65534
PYTHON = "/usr/bin/python3"
SANDBOX = {"uid": NOBODY, "gid": NOBODY, "pid_namespace": True, "seccomp": "default"}


@pytest.fixture(autouse=True)
def _adopt_launched() -> None:
    """Launched processes are re-parented to us, so that their exit codes can be read."""
    become_subreaper()


@pytest.fixture
def tini() -> None:
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")


def _plan(argv: list[str], **kw: object) -> LaunchPlan:
    spec = InstanceSpec(id="u.run.1", app="u", process="run", index=1, argv=argv,
                        env={"PATH": "/usr/bin:/bin"}, cwd="/")
    return LaunchPlan(instance=spec, **kw)  # type: ignore[arg-type]


def _exit_code(pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (code := reap(pid)) is None:
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.01)
    return code


def _fifos(base: Path) -> list[str]:
    paths = [str(base / name) for name in ("in", "out", "err")]
    for path in paths:
        os.mkfifo(path, 0o600)
    return paths


def _read_all(fd: int, into: list[bytes]) -> None:
    while chunk := os.read(fd, 65536):
        into.append(chunk)


def _read_pty(master: int, until: bytes | None = None, timeout: float = 20.0) -> bytes:
    """Read the master until ``until`` appears, or until EIO (every slave closed)."""
    out = b""
    deadline = time.monotonic() + timeout
    while until is None or until not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {out!r}"
        if not select.select([master], [], [], left)[0]:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process and everything it started have closed the pty
            break
        if not chunk:
            break
        out += chunk
    return out


@pytest.fixture
def pty() -> Iterator[tuple[int, int, str]]:
    """A pseudo-terminal (master, slave, slave path) 33 rows by 101 columns."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    yield master, slave, os.ttyname(slave)
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass  # the test closed it


def test_fifo_stdio_is_binary_safe_both_ways_and_the_exit_code_comes_back(
        tmp_path: Path, tini: None) -> None:
    """A sandboxed command (nobody, pid namespace, seccomp) reads 300 kB of arbitrary bytes
    from the stdin FIFO to EOF, writes them to the stdout FIFO and reversed to the stderr
    FIFO, and exits 7: every byte arrives, and 7 is its exit code."""
    paths = _fifos(tmp_path)
    into = os.open(paths[0], os.O_RDWR | os.O_CLOEXEC)
    out = os.open(paths[1], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    err = os.open(paths[2], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    script = ("import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d); "
              "sys.stderr.buffer.write(d[::-1]); sys.exit(7)")
    data = bytes(range(256)) * 100 + os.urandom(300_000)
    pid, _ = launch(_plan([PYTHON, "-c", script], stdio=paths, stdio_owner=os.geteuid(),
                          **SANDBOX))
    os.set_blocking(out, True)  # the process holds the write ends now: EOF means it closed them
    os.set_blocking(err, True)
    got_out: list[bytes] = []
    got_err: list[bytes] = []
    readers = [threading.Thread(target=_read_all, args=(fd, got)) for fd, got in
               ((out, got_out), (err, got_err))]
    for reader in readers:
        reader.start()
    view = memoryview(data)
    while view:
        view = view[os.write(into, view[:65536]):]
    os.close(into)  # the only writer: the process reads EOF
    for reader in readers:
        reader.join(30)
    os.close(out)
    os.close(err)
    assert _exit_code(pid) == 7
    assert b"".join(got_out) == data
    assert b"".join(got_err) == data[::-1]


def test_attach_stdio_fifos_feed_a_sandboxed_command(tmp_path: Path, tini: None) -> None:
    """The client's attach_stdio (FIFO mode) and the launcher agree: the command reads the
    caller's stdin and its stdout/stderr reach the caller's."""
    (tmp_path / "stdin").write_bytes(b"\x00abc\xff\n")
    with open(tmp_path / "stdin", "rb") as stdin, open(tmp_path / "stdout", "wb") as stdout, \
            open(tmp_path / "stderr", "wb") as stderr:
        with attach_stdio(stdin.fileno(), stdout.fileno(), stderr.fileno(),
                          directory=str(tmp_path)) as (paths, tty):
            assert not tty
            pid, _ = launch(_plan(["sh", "-c", "od -An -tx1; echo oops >&2; exit 4"],
                                  stdio=paths, stdio_owner=os.geteuid(), **SANDBOX))
            assert _exit_code(pid) == 4
    assert (tmp_path / "stdout").read_text().split() == ["00", "61", "62", "63", "ff", "0a"]
    assert (tmp_path / "stderr").read_bytes() == b"oops\n"


def test_tty_is_the_controlling_terminal_and_has_the_window_size(
        pty: tuple[int, int, str], tini: None) -> None:
    """tty=True behind tini, as nobody under the default seccomp profile: the pts is the
    shell's terminal (tty names it, /proc's tty_nr is its device), stty reads the caller's
    window size, and the shell is pid 2 (tini is 1)."""
    master, slave, path = pty
    script = ("tty; stty size; echo $$; read -r line < /proc/self/stat; set -- $line; echo $7;"
              " exit 5")
    pid, _ = launch(_plan(["sh", "-c", script], stdio=[path] * 3, stdio_owner=os.geteuid(),
                          tty=True, **SANDBOX))
    os.close(slave)
    lines = _read_pty(master).decode().split()
    rdev = os.stat(path).st_rdev
    tty_nr = (os.major(rdev) << 8) | (os.minor(rdev) & 0xFF) | ((os.minor(rdev) >> 8) << 20)
    assert lines == [path, "33", "101", "2", str(tty_nr)]
    assert _exit_code(pid) == 5


TERMINAL_CALLS = """
import errno, fcntl, os, termios, tty
tty.setraw(0)  # TCSETS
os.tcsetpgrp(0, os.getpgrp())  # TIOCSPGRP
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"x")
    sti = "allowed"
except OSError as err:
    sti = errno.errorcode[err.errno]
os.write(1, f"sti={sti} pgrp={os.tcgetpgrp(0) == os.getpgrp()}\\n".encode())
"""


def test_the_filter_allows_terminal_control_but_not_tiocsti(
        pty: tuple[int, int, str], tini: None) -> None:
    """Under the default profile the program may set its terminal's modes and foreground
    group, but pushing input into it (TIOCSTI) fails with EPERM (escape item 13)."""
    master, slave, path = pty
    pid, _ = launch(_plan([PYTHON, "-c", TERMINAL_CALLS], stdio=[path] * 3,
                          stdio_owner=os.geteuid(), tty=True, **SANDBOX))
    os.close(slave)
    assert _read_pty(master).split() == [b"sti=EPERM", b"pgrp=True"]
    assert _exit_code(pid) == 0


@pytest.mark.parametrize("pid_namespace", [True, False])
def test_interactive_shell_has_job_control_and_ctrl_c_reaches_the_foreground(
        pty: tuple[int, int, str], tini: None, pid_namespace: bool) -> None:
    """bash -i on the pts (behind tini or not) runs with job control (no 'no job control'
    warning, monitor mode on), ^C interrupts the foreground `sleep` but not the shell, and
    `exit 3` is the exit code."""
    master, slave, path = pty
    pid, _ = launch(_plan(["bash", "--norc", "--noprofile", "-i"], stdio=[path] * 3,
                          stdio_owner=os.geteuid(), tty=True, uid=NOBODY, gid=NOBODY,
                          pid_namespace=pid_namespace, seccomp="default"))
    os.close(slave)
    os.write(master, b"echo hi; case $- in *m*) echo monitor-on;; esac\n")
    seen = _read_pty(master, b"monitor-on\r\n")
    os.write(master, b"sleep 30\n")
    deadline = time.monotonic() + 10
    while not any(p.name() == "sleep" for p in psutil.Process(pid).children(recursive=True)):
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.02)
    os.write(master, b"\x03")
    os.write(master, b"echo rc=$?\n")
    seen += _read_pty(master, b"rc=130\r\n")
    os.write(master, b"exit 3\n")
    seen += _read_pty(master)
    text = seen.decode(errors="replace")
    assert "hi\r\n" in text
    assert "no job control" not in text
    assert "cannot set terminal process group" not in text
    assert _exit_code(pid) == 3


def _owned_by_nobody_fifo(base: Path) -> str:
    path = base / "theirs"
    os.mkfifo(path, 0o666)
    os.chown(path, NOBODY, NOBODY)
    return str(path)


def _our_fifo_for_nobody(base: Path) -> str:
    path = base / "ours"
    os.mkfifo(path, 0o666)
    return str(path)


def _regular_file(base: Path) -> str:
    path = base / "file"
    path.write_text("")
    return str(path)


def _symlink_to_fifo(base: Path) -> str:
    os.mkfifo(base / "target", 0o600)
    (base / "link").symlink_to(base / "target")
    return str(base / "link")


def _their_terminal(base: Path) -> str:
    master, slave = os.openpty()
    os.fchown(slave, NOBODY, -1)
    path = os.ttyname(slave)
    os.close(slave)
    _keep.append(master)  # the pts lives as long as its master
    return path


_keep: list[int] = []


@pytest.mark.parametrize(("make", "owner", "reason"), [
    (_our_fifo_for_nobody, NOBODY, "belongs to uid 0"),
    (_owned_by_nobody_fifo, 0, "belongs to uid 65534"),
    (_regular_file, 0, "neither a FIFO nor a terminal"),
    (_symlink_to_fifo, 0, "a symbolic link"),
    (lambda base: "/dev/null", 0, "neither a FIFO nor a terminal"),
    (_their_terminal, 0, "belongs to uid 65534"),
    (lambda base: "relative/path", 0, "not an absolute path"),
], ids=["owner-mismatch", "their-fifo", "regular-file", "symlink", "other-device",
        "their-terminal", "relative"])
def test_anything_but_the_clients_fifo_or_terminal_is_refused(
        tmp_path: Path, make: object, owner: int, reason: str) -> None:
    """stdio naming something that is not a FIFO or a pts of stdio_owner (another uid's FIFO
    or terminal, a regular file, a symlink, /dev/null, a relative path) is refused at step
    'stdio' before anything starts, and the launcher keeps no descriptor of it."""
    good = _fifos(tmp_path)[:2]
    ours = [os.open(good[0], os.O_RDWR), os.open(good[1], os.O_RDONLY | os.O_NONBLOCK)]
    marker = tmp_path / "started"
    bad = make(tmp_path)  # type: ignore[operator]
    if owner != 0:
        for path in good:
            os.chown(path, owner, -1)
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(LaunchError) as info:
            launch(_plan(["touch", str(marker)], stdio=[*good, bad], stdio_owner=owner))
        assert info.value.step == "stdio"
        assert reason in str(info.value)
        assert len(os.listdir("/proc/self/fd")) == before
        time.sleep(0.2)
        assert not marker.exists()
    finally:
        for fd in [*ours, *_keep]:
            os.close(fd)
        _keep.clear()


def test_a_fifo_nobody_reads_is_refused_not_waited_for(tmp_path: Path) -> None:
    """A stdout FIFO without a reader fails at once at step 'stdio' (ENXIO)."""
    paths = _fifos(tmp_path)
    into = os.open(paths[0], os.O_RDWR)
    try:
        with pytest.raises(LaunchError) as info:
            launch(_plan(["true"], stdio=paths, stdio_owner=0))
        assert (info.value.step, info.value.details["errno_name"]) == ("stdio", "ENXIO")
        assert "nobody has the FIFO open for reading" in str(info.value)
    finally:
        os.close(into)


def test_tty_needs_a_terminal_and_stdio_needs_an_owner(tmp_path: Path) -> None:
    """tty=True over FIFOs, tty without stdio, and stdio without stdio_owner are refused at
    step 'stdio'."""
    paths = _fifos(tmp_path)
    ends = [os.open(paths[0], os.O_RDWR)] + [os.open(p, os.O_RDONLY | os.O_NONBLOCK)
                                             for p in paths[1:]]
    try:
        for kw in ({"stdio": paths, "stdio_owner": 0, "tty": True}, {"tty": True},
                   {"stdio": paths}):
            with pytest.raises(LaunchError) as info:
                launch(_plan(["true"], **kw))
            assert info.value.step == "stdio", kw
    finally:
        for fd in ends:
            os.close(fd)


def test_a_terminal_that_is_another_sessions_is_not_stolen(
        pty: tuple[int, int, str]) -> None:
    """A pts that already controls another session is refused at step 'tty' (EPERM):
    TIOCSCTTY is called without the steal flag."""
    _, _, path = pty
    holder = subprocess.Popen(  # a session leader that takes the pts as its terminal
        [sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "tty_nr = open('/proc/self/stat').read().rsplit(')', 1)[1].split()[4]; "
         "print(tty_nr != '0', flush=True); time.sleep(30)", path],
        start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"True\n"
        with pytest.raises(LaunchError) as info:
            launch(_plan(["true"], stdio=[path] * 3, stdio_owner=0, tty=True))
        assert (info.value.step, info.value.details["errno_name"]) == ("tty", "EPERM")
    finally:
        holder.kill()
        holder.wait()


def test_secret_env_reaches_the_process_and_nothing_that_shows_the_plan(tmp_path: Path) -> None:
    """secret_env is merged over instance.env in the process's environment, and appears in
    neither model_dump(), model_dump_json(), repr() nor str() of the plan."""
    out = tmp_path / "out"
    plan = _plan(["sh", "-c", 'printf "%s %s" "$TOKEN" "$PLAIN"'], stdout=str(out),
                 secret_env={"TOKEN": "s3cr3t-value", "PLAIN": "over"})
    plan.instance.env["PLAIN"] = "public"
    pid, _ = launch(plan)
    assert _exit_code(pid) == 0
    assert out.read_text() == "s3cr3t-value over"
    for shown in (str(plan.model_dump()), str(plan.model_dump(mode="json")),
                  plan.model_dump_json(), repr(plan), str(plan)):
        assert "s3cr3t" not in shown
    assert "secret_env" not in plan.model_dump()
    assert '"secret_env"' not in plan.model_dump_json()
    assert plan.secret_env == {"TOKEN": "s3cr3t-value", "PLAIN": "over"}
    # a plan that travels as JSON arrives without its secrets: they must be added where it lands
    assert LaunchPlan.model_validate_json(plan.model_dump_json()).secret_env == {}
