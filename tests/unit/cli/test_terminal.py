"""The client's end of `corral run`'s stdio: FIFOs relayed to our fds, or a pseudo-terminal
relayed to our terminal in raw mode; everything restored and removed afterwards."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from corral.cli._terminal import attach_stdio

# copies stdin to stdout, writes its reverse to stderr; opens the FIFOs late, as the launcher
# does (O_NONBLOCK, then blocking: an `in` whose writer has already gone is an empty input)
COPY = """
import os, sys, time
time.sleep(float(sys.argv[4]))
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
os.set_blocking(fd, True)
data = open(fd, 'rb').read()
with open(sys.argv[2], 'wb') as out, open(sys.argv[3], 'wb') as err:
    out.write(data)
    err.write(data[::-1])
"""


def _run_copy(tmp_path: Path, data: bytes, delay: float) -> tuple[bytes, bytes]:
    (tmp_path / "stdin").write_bytes(data)
    with open(tmp_path / "stdin", "rb") as stdin, open(tmp_path / "stdout", "wb") as stdout, \
            open(tmp_path / "stderr", "wb") as stderr:
        with attach_stdio(stdin.fileno(), stdout.fileno(), stderr.fileno(),
                          directory=str(tmp_path)) as (paths, tty):
            assert not tty
            base = Path(paths[0]).parent
            assert [Path(p).name for p in paths] == ["in", "out", "err"]
            assert stat.S_IMODE(base.stat().st_mode) == 0o700
            for path in paths:
                info = os.stat(path)
                assert stat.S_ISFIFO(info.st_mode) and info.st_uid == os.geteuid()
                assert stat.S_IMODE(info.st_mode) == 0o600
            subprocess.run([sys.executable, "-c", COPY, *paths, str(delay)], check=True,
                           timeout=30)
        assert not base.exists()
    return (tmp_path / "stdout").read_bytes(), (tmp_path / "stderr").read_bytes()


def test_fifos_relay_binary_data_both_ways(tmp_path: Path) -> None:
    """500 kB of arbitrary bytes go from our stdin through `in` to the process and back through
    `out` and `err` to our stdout and stderr; the FIFOs are ours (0600, in a 0700 directory),
    and their directory is gone after the block."""
    data = bytes(range(256)) * 64 + os.urandom(500_000)
    out, err = _run_copy(tmp_path, data, delay=0)
    assert out == data
    assert err == data[::-1]


def test_short_input_is_not_lost_before_the_process_opens_the_fifo(tmp_path: Path) -> None:
    """Our stdin reaches EOF long before the process opens `in`: what was sent still arrives,
    followed by EOF (our end is closed only once the process has read it)."""
    out, _ = _run_copy(tmp_path, b"\x00short\xff", delay=0.5)
    assert out == b"\x00short\xff"


def test_empty_input_is_eof(tmp_path: Path) -> None:
    """An empty stdin is an immediate EOF for the process, which opens `in` later."""
    out, err = _run_copy(tmp_path, b"", delay=0.2)
    assert (out, err) == (b"", b"")


def test_output_written_just_before_the_block_ends_is_not_lost(tmp_path: Path) -> None:
    """Output still in the FIFOs when the block exits is copied out before they go."""
    with open(tmp_path / "stdout", "wb") as stdout, open(os.devnull, "rb") as stdin:
        with attach_stdio(stdin.fileno(), stdout.fileno(), stdout.fileno(),
                          directory=str(tmp_path)) as (paths, _):
            fd = os.open(paths[1], os.O_WRONLY)
            os.write(fd, b"last words\n")  # the writer stays open: no EOF before the exit
        os.close(fd)
    assert (tmp_path / "stdout").read_bytes() == b"last words\n"


def _winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {out!r}"
        if select.select([fd], [], [], left)[0]:
            out += os.read(fd, 4096)
    return out


# on the inner terminal: print its size, echo a line upper-cased, print its size again
SHOUT = """
import fcntl, struct, sys, termios
def size():
    rows, cols = struct.unpack('HHHH', fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))[:2]
    print(f'size={rows}x{cols}', flush=True)
size()
print(sys.stdin.readline().strip().upper(), flush=True)
size()
"""


def test_terminal_mode_is_raw_relayed_sized_and_restored() -> None:
    """With a terminal as stdin and stdout, the paths are one new pts (tty True) with our
    window size, kept in sync on SIGWINCH; our terminal is raw during the block and as before
    afterwards; bytes go both ways."""
    outer_master, outer = os.openpty()  # stands for the caller's terminal
    try:
        fcntl.ioctl(outer_master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        before = termios.tcgetattr(outer)
        with attach_stdio(outer, outer, outer) as (paths, tty):
            assert tty
            assert paths == [paths[0]] * 3 and paths[0].startswith("/dev/pts/")
            assert os.stat(paths[0]).st_uid == os.geteuid()
            assert not termios.tcgetattr(outer)[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            with open(paths[0], "r+b", buffering=0) as inner:
                proc = subprocess.Popen([sys.executable, "-c", SHOUT], stdin=inner,
                                        stdout=inner, stderr=inner)
            seen = _read_until(outer_master, b"size=40x120")
            fcntl.ioctl(outer_master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 130, 0, 0))
            os.kill(os.getpid(), signal.SIGWINCH)
            os.write(outer_master, b"hello\r")
            seen += _read_until(outer_master, b"size=50x130")
            assert proc.wait(20) == 0
        assert b"HELLO" in seen
        assert termios.tcgetattr(outer) == before
        assert _winsize(outer) == (50, 130)
    finally:
        os.close(outer)
        os.close(outer_master)
