"""The launch path, caller side: prepare in the caller, fork twice in the fork server, execve.

Process shape (why): the fork server (``_child``, a small interpreter started once) forks a
*middle* process, which calls setsid (new session, no controlling terminal), optionally
unshares a pid (and, without root, a user) namespace, forks the *grandchild* and exits at
once; the server reaps the middle. The grandchild is therefore neither the caller's child nor
the server's: it is re-parented to the nearest subreaper (the kernel, if it called
``become_subreaper()``) or to the host's init, and it survives the death of either. In a new
pid namespace the grandchild is pid 1 there; it execs ``tini`` (Debian's tini-static), which
reaps zombies and forwards signals to the app's process group, as pid 1 must.

The caller does everything that can be done before a fork: it resolves the plan, compiles the
seccomp filter, opens stdin/stdout/stderr, the network namespace and tini, and creates three
pipes; it passes those descriptors to the server with the order (SCM_RIGHTS), so files are
opened with the caller's credentials and errors such as a FIFO without reader are the caller's.
The middle writes the grandchild's pid on the *pid* pipe; the caller reads the start time
(psutil create_time) while the grandchild waits on the *go* pipe, then lets it exec.
Failures before ``execve`` travel back over the CLOEXEC *err* pipe as ``step NUL errno NUL
message`` (the technique of CPython's subprocess); the caller raises ``LaunchError(step=...)``.
The pipe reaches EOF when the grandchild execs (or dies), so a successful return means the new
program is running.

A one-off command (``plan.stdio``) gets a client's FIFOs or pseudo-terminal as fds 0-2. The
caller is root and the paths come from a less privileged client, so each is checked on the
descriptor, never by name: it must be a FIFO or a pts slave owned by ``plan.stdio_owner``
(not a regular file, a symlink, another device or another user's terminal). With ``plan.tty``
the grandchild starts its own session and takes fd 0 as its controlling terminal; under tini
the program's process group is made the foreground group by tini itself (see ``_child``).

If the server died before it handled the order (nothing on either pipe), it is restarted and
the order sent once more: a ``kill -9`` of the server costs the next launch one interpreter
start, never a failure.
"""

from __future__ import annotations

import errno
import marshal
import os
import stat
from typing import Any

import psutil

from corral.errors import LaunchError
from corral.launch import linux
from corral.launch._forkserver import SERVER, ServerGone
from corral.launch._seccomp import compiled_filter
from corral.protocol._lifecycle import LaunchPlan

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
INIT_CANDIDATES = ("/usr/bin/tini-static", "/usr/bin/tini", "/sbin/tini")


class _Prepared:
    """An order for the fork server and the descriptors the caller opened for it."""

    def __init__(self, order: dict[str, Any]) -> None:
        self.order = order
        self.fds: list[int] = []
        order["fds"] = {}

    def add_fd(self, name: str, fd: int) -> None:
        """Pass ``fd`` as the order's descriptor ``name``."""
        self.order["fds"][name] = len(self.fds)
        self.fds.append(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


INHERIT = {"inherit:stdout": 1, "inherit:stderr": 2}
"""Plan output values that pass the caller's own descriptor instead of opening a path."""


def _open_output(path: str | None, step: str) -> int:
    """Open stdout/stderr: a FIFO write-only (refusing to block on a missing reader), a file
    for appending, /dev/null when unset."""
    if path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if path in INHERIT:  # the caller's own stdout/stderr (the dev loop's terminal or pipe)
        return os.dup(INHERIT[path])
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        is_fifo = False
    except OSError as err:
        raise _error(step, err, path) from err
    try:
        if is_fifo:
            # O_NONBLOCK: with no reader the open fails (ENXIO) instead of hanging the caller
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.set_blocking(fd, True)
            return fd
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as err:
        raise _error(step, err, path) from err


PTS_MAJORS = range(136, 144)
"""Device majors of pseudo-terminal slaves (UNIX98_PTY_SLAVE_MAJOR, 8 majors)."""


def _stdio_kind(st: os.stat_result) -> str | None:
    """'fifo', 'pts' or None (anything else) for a stat result."""
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTS_MAJORS:
        return "pts"
    return None


def _refuse(path: str, why: str) -> LaunchError:
    return LaunchError(f"{path!r} {why}", step="stdio")


def _open_stdio(path: str, number: int, owner: int) -> tuple[int, bool]:
    """Open a client's stdio path for fd ``number``; return (descriptor, is a terminal).

    The path is first opened O_PATH|O_NOFOLLOW, which follows no final symlink and runs no
    device's open routine (opening some devices as root has effects, e.g. a watchdog), and
    its type and owner are checked on that descriptor; only then is the same inode opened for
    I/O through /proc/self/fd, and checked again on the descriptor that is passed on.
    """
    if not os.path.isabs(path):
        raise _refuse(path, "is not an absolute path")
    try:
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise _error("stdio", err, path) from err
    try:
        before = os.fstat(handle)
        kind = _check_stdio(path, before, owner)
        if kind == "pts":
            # O_NOCTTY: the caller (a session leader, maybe) must never adopt the terminal
            flags = os.O_RDWR | os.O_NOCTTY
        else:
            # O_NONBLOCK: a write end without a reader fails (ENXIO) instead of hanging
            flags = (os.O_RDONLY if number == 0 else os.O_WRONLY) | os.O_NONBLOCK
        try:
            fd = os.open(f"/proc/self/fd/{handle}", flags | os.O_CLOEXEC)
        except OSError as err:
            if err.errno == errno.ENXIO and kind == "fifo":
                raise _error("stdio", err, f"{path}: nobody has the FIFO open for reading"
                             ) from err
            raise _error("stdio", err, path) from err
    finally:
        os.close(handle)
    try:
        after = os.fstat(fd)
        _check_stdio(path, after, owner)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise _refuse(path, "changed while it was being opened")
        if kind == "fifo":
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, kind == "pts"


def _check_stdio(path: str, st: os.stat_result, owner: int) -> str:
    """The kind of a client's stdio file; LaunchError unless a FIFO or pts of ``owner``."""
    kind = _stdio_kind(st)
    if kind is None:
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "neither a FIFO nor a terminal"
        raise _refuse(path, f"is {what} (stdio takes a FIFO or a /dev/pts slave)")
    if st.st_uid != owner:
        raise _refuse(path, f"belongs to uid {st.st_uid}, not to the client (uid {owner})")
    return kind


def _add_client_stdio(prep: _Prepared, plan: LaunchPlan) -> None:
    """Open ``plan.stdio`` as the order's stdin, stdout and stderr (see ``_open_stdio``)."""
    paths = plan.stdio or []
    if len(paths) != 3:
        raise LaunchError(f"stdio takes exactly 3 paths (fd 0, 1, 2), not {len(paths)}",
                          step="stdio")
    if plan.stdio_owner is None:
        raise LaunchError("stdio without stdio_owner: whose files they must be is unknown",
                          step="stdio")
    terminal = False
    for number, (name, path) in enumerate(zip(("stdin", "stdout", "stderr"), paths,
                                              strict=True)):
        fd, is_pts = _open_stdio(path, number, plan.stdio_owner)
        prep.add_fd(name, fd)
        terminal = terminal or (number == 0 and is_pts)
    if plan.tty and not terminal:
        raise _refuse(paths[0], "is not a terminal, and the plan asks for one (tty)")


def _error(step: str, err: OSError, what: str | None = None) -> LaunchError:
    code = err.errno or 0
    name = errno.errorcode.get(code, str(code))
    where = f" ({what})" if what else ""
    exc = LaunchError(f"{os.strerror(code)} [{name}]{where}", step=step)
    exc.details["errno"] = code
    exc.details["errno_name"] = name
    return exc


def _candidates(argv0: str, env: dict[str, str]) -> list[str]:
    if "/" in argv0:
        return [argv0]
    dirs = env.get("PATH", DEFAULT_PATH).split(":")
    return [os.path.join(d or ".", argv0) for d in dirs]


def _find_init() -> str:
    for path in INIT_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise LaunchError(
        "no init for the pid namespace: install Debian's 'tini' (/usr/bin/tini-static)",
        step="init",
    )


def _prepare(plan: LaunchPlan) -> _Prepared:
    """Resolve ``plan`` into an order and open its descriptors; raises LaunchError."""
    inst = plan.instance
    if not inst.argv:
        raise LaunchError(f"instance {inst.id!r} has an empty argv", step="plan")
    if plan.uid is not None and plan.gid is None:
        raise LaunchError("plan sets uid without gid", step="plan")
    if plan.tty and plan.stdio is None:
        raise LaunchError("tty without stdio: no terminal to attach", step="stdio")
    env = {**inst.env, **plan.secret_env}
    enc = os.fsencode
    root_user = os.geteuid() == 0
    wants_ns = bool(plan.root or plan.mounts or plan.pid_namespace)
    userns = wants_ns and not root_user
    drop_caps = (root_user and plan.uid is not None) or userns
    flags = 0
    if wants_ns:
        flags |= linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
        if plan.cgroup_procs:
            flags |= linux.CLONE_NEWCGROUP  # the app sees its own cgroup as "/"
    # -g: forward signals to the app's whole process group; tini exits with its status
    init_argv = ["tini", "-g", "--", *inst.argv] if plan.pid_namespace else []
    prep = _Prepared({
        "argv": [enc(a) for a in inst.argv],
        "env": {enc(k): enc(v) for k, v in env.items()},
        "candidates": [enc(c) for c in _candidates(inst.argv[0], env)],
        "cwd": enc(inst.cwd),
        "init_argv": [enc(a) for a in init_argv],
        "cgroup_procs": [enc(p) for p in plan.cgroup_procs],
        "root": enc(plan.root) if plan.root else None,
        "mounts": [(enc(m.source), enc(m.target), m.mode == "ro") for m in plan.mounts],
        "pid_namespace": plan.pid_namespace,
        "userns": userns,
        "unshare_flags": flags,
        "uid": plan.uid,
        "gid": plan.gid,
        "host_uid": os.geteuid(),
        "host_gid": os.getegid(),
        "drop_caps": drop_caps,
        "last_cap": linux.last_capability() if drop_caps else 40,
        "no_new_privs": plan.no_new_privs,
        "seccomp": compiled_filter(plan.seccomp) if plan.seccomp else None,
        "listen_fds": len(plan.listen_fds),
        "tty": plan.tty,
    })
    try:
        for i, fd in enumerate(plan.listen_fds):
            try:  # our own copy: the order's descriptors are closed after each launch
                prep.add_fd(f"listen{i}", os.dup(fd))
            except OSError as err:
                raise _error("listen_fds", err, f"descriptor {fd}") from err
        if plan.pid_namespace:
            prep.add_fd("init", os.open(_find_init(), os.O_PATH | os.O_CLOEXEC))
        if plan.stdio is not None:
            _add_client_stdio(prep, plan)
        else:
            prep.add_fd("stdin", os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            stdout = _open_output(plan.stdout, "stdout")
            prep.add_fd("stdout", stdout)
            if plan.stderr == plan.stdout and plan.stdout is not None:
                prep.add_fd("stderr", os.dup(stdout))
            else:
                prep.add_fd("stderr", _open_output(plan.stderr, "stderr"))
        if plan.netns:
            try:
                prep.add_fd("netns", os.open(plan.netns, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as err:
                raise _error("netns", err, plan.netns) from err
    except BaseException:
        prep.close()
        raise
    return prep


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def launch(plan: LaunchPlan) -> tuple[int, float]:
    """Start ``plan`` sandboxed; return (pid, psutil create_time) once the program is exec'd.

    Raises ``LaunchError`` whose ``step`` names what failed (``details['errno']`` the errno).
    The process is not a child of the caller (see the module docstring). Thread-safe.
    """
    prep = _prepare(plan)
    try:
        try:
            return _run(prep)
        except ServerGone:
            # the server died before it took the order: nothing was started, send it again
            try:
                return _run(prep)
            except ServerGone:
                raise LaunchError("the fork server died twice while launching; see the "
                                  "caller's stderr for its last words", step="forkserver"
                                  ) from None
    finally:
        prep.close()


def _run(prep: _Prepared) -> tuple[int, float]:
    """One attempt: send the order with fresh pipes, follow the pipes to exec or failure."""
    pipes: list[int] = []
    try:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pipes = [err_r, err_w, pid_r, pid_w, go_r, go_w]
        order = dict(prep.order, fds={**prep.order["fds"], "err_w": len(prep.fds),
                                      "pid_w": len(prep.fds) + 1, "go_r": len(prep.fds) + 2})
        server = SERVER.send(marshal.dumps(order), [*prep.fds, err_w, pid_w, go_r])
        for fd in (err_w, pid_w, go_r):  # the server holds its own copies now
            os.close(fd)
            pipes.remove(fd)
        raw = _read_all(pid_r)
        pid = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        start: float | None = None
        if pid:
            try:
                start = psutil.Process(pid).create_time()
            except psutil.Error:
                start = None  # it died before exec: the error pipe says why
            try:
                os.write(go_w, b"g")
            except BrokenPipeError:
                pass
        os.close(go_w)  # without a pid: a grandchild that exists reads EOF and exits
        pipes.remove(go_w)
        report = _read_all(err_r)
        if report:
            if pid:
                _reap_quietly(pid)
            step, code, message = [*report.decode(errors="replace").split("\0", 2), "", ""][:3]
            err = OSError(int(code) if code.isdigit() else 0, message)
            raise _error(step or "unknown", err, message or None)
        if not pid and SERVER.died(server, timeout=2.0):
            raise ServerGone()
        if not pid or start is None:
            raise LaunchError("the launched process vanished before exec", step="fork")
        return pid, start
    finally:
        for fd in pipes:
            os.close(fd)


def _reap_quietly(pid: int) -> None:
    """Collect a failed grandchild if we are its subreaper; otherwise init does it."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
