"""The client's end of a one-off command's stdio (``corral run``): a pseudo-terminal or FIFOs.

The kernel launches the command (``LaunchPlan.stdio``, ``stdio_owner``, ``tty``) with fds 0,
1 and 2 opened from paths this module creates; the kernel runs as root, so it accepts only a
FIFO or a /dev/pts slave owned by the client's uid. This side owns those files, relays bytes
between them and the caller's own stdin/stdout/stderr, and removes them afterwards.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import struct
import tempfile
import termios
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

CHUNK = 65536
WAIT_MS = 50  # how often a closing stdin checks whether the process has read everything
_WINSIZE = struct.Struct("HHHH")  # struct winsize: rows, columns, x pixels, y pixels


@contextmanager
def attach_stdio(stdin: int = 0, stdout: int = 1, stderr: int = 2,
                 directory: str | None = None) -> Iterator[tuple[list[str], bool]]:
    """Yield ``(paths, tty)`` for ``LaunchPlan.stdio``/``tty``, relaying them to our own fds.

    Contract:

    * **Terminal** (``stdin`` and ``stdout`` are both terminals): a new pseudo-terminal whose
      slave (``/dev/pts/N``, owned by our euid) is all three paths, ``tty`` is True. Our
      terminal is put in raw mode (keys such as ^C and ^Z travel as bytes, and the sandbox's
      terminal turns them into signals for its foreground process) and restored on exit,
      however the block exits. The window size is copied to the pseudo-terminal at once and,
      when called from the main thread, again on every SIGWINCH. The process's stdout and
      stderr arrive merged on our ``stdout``, as with ``ssh -t``.
    * **Otherwise**: a private directory (mode 0700, under ``directory`` or $TMPDIR) with
      three FIFOs ``in``, ``out``, ``err`` (0600), yielded in that order with ``tty`` False.
      Our ends are open before the yield, so the launcher's opens (O_NONBLOCK, as
      ``corral.launch`` does them) find a reader on ``out`` and ``err``. ``stdin`` is copied
      to ``in`` byte for byte; at its EOF our end of ``in`` is closed once the process has
      read what was sent, so it sees EOF and a short input is not lost before the process
      opens the FIFO (an empty input may close it before: a blocking open of ``in`` would
      then wait forever, an O_NONBLOCK one reads EOF). ``out`` and ``err`` are copied to
      ``stdout`` and ``stderr``, binary safe.

    The relay runs in a thread until the process's output ends (both FIFOs closed by every
    writer) or the block exits; leave the block once the kernel reports that the process has
    exited: what remains in the FIFOs or the pseudo-terminal is then copied out, and the FIFOs'
    directory is removed. The paths must be opened by a launcher that sees the same file
    system (the same /tmp and /dev/pts) as this process.
    """
    if os.isatty(stdin) and os.isatty(stdout):
        with _terminal(stdin, stdout) as paths:
            yield paths, True
    else:
        with _fifos(stdin, stdout, stderr, directory) as paths:
            yield paths, False


@contextmanager
def _terminal(stdin: int, stdout: int) -> Iterator[list[str]]:
    """The pseudo-terminal mode of ``attach_stdio``."""
    master, slave = os.openpty()  # both close-on-exec
    relay: _Relay | None = None
    saved_mode: list[Any] | None = None
    saved_winch: Any = None
    main_thread = threading.current_thread() is threading.main_thread()
    try:
        if os.fstat(slave).st_uid != os.geteuid():
            os.fchown(slave, os.geteuid(), -1)  # the launcher accepts only our own files
        os.set_blocking(master, False)
        _copy_window_size(stdout, master)
        if main_thread:  # signal handlers can only be set there

            def on_winch(signum: int, frame: FrameType | None) -> None:
                _copy_window_size(stdout, master)

            saved_winch = signal.signal(signal.SIGWINCH, on_winch)
        saved_mode = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSADRAIN)
        relay = _Relay([_Route(stdin, master, into_process=True), _Route(master, stdout)])
        relay.start()
        # our slave stays open until the end: with no slave open the master reports EIO,
        # which would read as "the process ended" before the launcher has opened it
        yield [os.ttyname(slave)] * 3
    finally:
        os.close(slave)  # now the master reports EIO once the process's copies are closed
        try:
            if relay is not None:
                relay.finish()
        finally:
            if saved_mode is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved_mode)
            if main_thread:
                signal.signal(signal.SIGWINCH, saved_winch or signal.SIG_DFL)
            os.close(master)
    if relay is not None:
        relay.raise_error()


@contextmanager
def _fifos(stdin: int, stdout: int, stderr: int, directory: str | None) -> Iterator[list[str]]:
    """The FIFO mode of ``attach_stdio``."""
    base = tempfile.mkdtemp(prefix="corral-run-", dir=directory)  # mode 0700
    ends: list[int] = []
    relay: _Relay | None = None
    try:
        paths = [os.path.join(base, name) for name in ("in", "out", "err")]
        for path in paths:
            os.mkfifo(path, 0o600)
        # in: O_RDWR, so opening never waits for a reader and the pipe lives from now on;
        # out, err: read ends, which the launcher's O_NONBLOCK write opens need
        for path, mode in zip(paths, (os.O_RDWR, os.O_RDONLY, os.O_RDONLY), strict=True):
            ends.append(os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC))
        into, out, err = ends
        relay = _Relay([_Route(stdin, into, into_process=True, close_at_eof=True),
                        _Route(out, stdout), _Route(err, stderr)])
        relay.start()
        yield paths
    finally:
        try:
            if relay is not None:
                relay.finish()
                if relay.routes[0].dst_closed:
                    ends.pop(0)  # the relay closed it at stdin's EOF
        finally:
            for fd in ends:
                os.close(fd)
            shutil.rmtree(base, ignore_errors=True)
    if relay is not None:
        relay.raise_error()


def _copy_window_size(source: int, target: int) -> None:
    """Give the terminal at ``target`` the window size of the terminal at ``source``."""
    try:
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)
    except OSError:
        pass  # no size to copy: the process sees 0x0, as over a pipe


class _Route:
    """One direction of the relay: bytes read from ``src`` are written to ``dst``.

    ``into_process``: ``src`` is the caller's (read only when poll says so, never made
    non-blocking: its file description may be shared with a shell) and ``dst`` is ours and
    non-blocking, buffered, so a process that does not read its stdin never stalls the copy of
    its output. ``close_at_eof``: at ``src``'s EOF, close ``dst`` once the process has read
    all that was sent. Other routes carry the process's output: ``src`` is non-blocking and
    ``dst`` (the caller's) is written in full.
    """

    def __init__(self, src: int, dst: int, *, into_process: bool = False,
                 close_at_eof: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.into_process = into_process
        self.close_at_eof = close_at_eof
        self.pending = bytearray()
        self.src_open = True
        self.dst_broken = False  # writes failed: what follows is read and dropped
        self.dst_closed = False

    def read(self) -> bool:
        """Read once from ``src``; False at its end (EOF, EIO of a hung-up terminal)."""
        try:
            data = os.read(self.src, CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            data = b""  # EIO: every slave of the terminal closed; EBADF: no stdin at all
        if not data:
            self.src_open = False
            return False
        if self.dst_broken:
            return True
        if self.into_process:
            self.pending += data
        else:
            try:
                _write_all(self.dst, data)
            except OSError:
                self.dst_broken = True  # the caller's stdout went away: keep draining
        return True

    def flush(self) -> None:
        """Write what ``dst`` takes of ``pending`` without blocking."""
        try:
            written = os.write(self.dst, self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.pending.clear()
            self.dst_broken = True
            return
        del self.pending[:written]

    def maybe_close(self) -> None:
        """At ``src``'s EOF, close ``dst`` once the process has read everything sent."""
        if not self.close_at_eof or self.src_open or self.dst_closed or self.pending:
            return
        # our end is O_RDWR: FIONREAD says how much the process has not read yet. Closing
        # while bytes remain, before the process opened the FIFO, would discard them.
        unread = fcntl.ioctl(self.dst, termios.FIONREAD, bytes(4))
        if int.from_bytes(unread, "little") == 0:
            os.close(self.dst)
            self.dst_closed = True


class _Relay(threading.Thread):
    """A poll loop over the routes, until the process's output ends or ``finish``."""

    def __init__(self, routes: list[_Route]) -> None:
        super().__init__(name="corral-stdio", daemon=True)
        self.routes = routes
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._error: BaseException | None = None

    def finish(self) -> None:
        """Stop the loop, copy out what the process left, and wait for it."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        self.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def raise_error(self) -> None:
        """Raise what stopped the relay thread, if anything did."""
        if self._error is not None:
            raise self._error

    def run(self) -> None:
        try:
            self._loop()
            self._drain()
        except BaseException as err:  # reported to the caller by raise_error
            self._error = err

    def _loop(self) -> None:
        outputs = [r for r in self.routes if not r.into_process]
        while not self._stopping.is_set() and any(r.src_open for r in outputs):
            wanted: dict[int, int] = {self._wake_r: select.POLLIN}
            waiting = False
            for route in self.routes:
                if route.into_process:
                    route.maybe_close()
                    waiting = waiting or (route.close_at_eof and not route.src_open
                                          and not route.dst_closed)
                    if route.dst_closed or route.dst_broken:
                        continue
                    if route.pending:
                        wanted[route.dst] = wanted.get(route.dst, 0) | select.POLLOUT
                        continue
                if route.src_open:
                    wanted[route.src] = wanted.get(route.src, 0) | select.POLLIN
            poller = select.poll()
            for fd, mask in wanted.items():
                poller.register(fd, mask)
            ready = dict(poller.poll(WAIT_MS if waiting else None))
            for route in self.routes:
                if route.into_process and route.pending and route.dst in ready:
                    route.flush()
                elif route.src_open and ready.get(route.src, 0) and (
                        not route.into_process or not route.pending):
                    route.read()

    def _drain(self) -> None:
        """Copy out what the process's output holds now, without waiting for more."""
        for route in self.routes:
            if route.into_process:
                continue
            poller = select.poll()
            poller.register(route.src, select.POLLIN)
            while route.src_open and route.read() and poller.poll(0):
                pass


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, waiting while it is full even if non-blocking."""
    view = memoryview(data)
    poller: select.poll | None = None
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            poller.poll()


__all__ = ["attach_stdio"]
