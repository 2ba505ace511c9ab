"""The child side of the launch path, and the fork server that runs it.

Everything between ``fork`` and ``execve`` lives here: the *middle* process (new session, pid
namespace, forks the grandchild, exits) and the *grandchild* (cgroups, namespaces, root,
privileges, seccomp, exec). See ``_spawn`` for the process shape and the error protocol.

These functions run in the **fork server**, not in the caller: a small single-threaded
interpreter started once (``python -I -S``, see ``_forkserver``) that imports only this module,
``linux`` (ctypes) and the standard library's C-level modules. Forking it costs well under a
millisecond where forking the loaded kernel (pydantic, zmq, ~35 MB, IO threads) costs 5-7 ms,
twice per launch; and no fork ever copies a process whose other threads may hold locks.

The caller sends one *order* per SOCK_SEQPACKET message: a ``marshal``-ed dict (paths, argv
and environment as bytes, so no encoding is assumed) plus the descriptors it opened, passed
with SCM_RIGHTS. The server never writes to the socket: the caller's own pipes (passed with
the order) carry the pid and any failure, exactly as if the caller had forked. When the socket
reaches EOF (the caller exited, or closed it) the server exits; instances it started are not
its children (the middle exits at once) and do not notice.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import marshal
import os
import signal
import termios
from typing import Any, NoReturn

from corral.launch import linux

MAX_ORDER = 1 << 20  # bytes of one marshalled order (argv + env + mounts)
MAX_FDS = 16  # descriptors passed with one order
SD_LISTEN_FDS_START = 3  # systemd socket activation: passed sockets are fds 3, 4, ...
DESCRIPTORS = ("stdin", "stdout", "stderr", "netns", "init", "err_w", "pid_w", "go_r")
# Device nodes a launcher-built root gets (bound from the host: mknod is not possible in a
# user namespace, and binding keeps one code path for both modes).
DEVICES = (b"null", b"zero", b"full", b"random", b"urandom", b"tty")


class Order:
    """One launch as the children execute it: the order's fields and its open descriptors."""

    def __init__(self, data: dict[str, Any], fds: list[int]) -> None:
        self.argv: list[bytes] = list(data["argv"])
        self.env: dict[bytes, bytes] = dict(data["env"])
        self.candidates: list[bytes] = list(data["candidates"])
        self.cwd: bytes = data["cwd"]
        self.init_argv: list[bytes] = list(data["init_argv"])
        self.cgroup_procs: list[bytes] = list(data["cgroup_procs"])
        self.root: bytes | None = data["root"]
        self.mounts: list[tuple[bytes, bytes, bool]] = [tuple(m) for m in data["mounts"]]
        self.pid_namespace: bool = data["pid_namespace"]
        self.userns: bool = data["userns"]
        self.unshare_flags: int = data["unshare_flags"]
        self.uid: int | None = data["uid"]
        self.gid: int | None = data["gid"]
        self.host_uid: int = data["host_uid"]
        self.host_gid: int = data["host_gid"]
        self.drop_caps: bool = data["drop_caps"]
        self.last_cap: int = data["last_cap"]
        self.no_new_privs: bool = data["no_new_privs"]
        code: bytes | None = data["seccomp"]
        # built before the fork: the grandchild only hands the pointer to prctl
        self.seccomp = linux.SeccompProgram(code) if code else None
        slots: dict[str, int] = data["fds"]
        self.fds = fds
        fd = {name: fds[slots[name]] if name in slots else -1 for name in DESCRIPTORS}
        self.stdin, self.stdout, self.stderr = fd["stdin"], fd["stdout"], fd["stderr"]
        self.netns, self.init = fd["netns"], fd["init"]
        self.err_w, self.pid_w, self.go_r = fd["err_w"], fd["pid_w"], fd["go_r"]
        self.listen = [fds[slots[f"listen{i}"]] for i in range(data.get("listen_fds", 0))]
        self.tty: bool = data.get("tty", False)


def tell(fd: int, step: str, err: BaseException) -> None:
    """Write ``step NUL errno NUL what`` on the error pipe (the caller raises LaunchError)."""
    code = err.errno if isinstance(err, OSError) and err.errno else errno.EINVAL
    what = getattr(err, "filename", None) or (err.strerror if isinstance(err, OSError) else err)
    if isinstance(what, bytes):
        what = os.fsdecode(what)
    try:
        os.write(fd, f"{step}\0{code}\0{what}".encode(errors="replace")[:4000])
    except OSError:
        pass  # the caller is gone: nobody to tell


def _report(fd: int, step: str, err: BaseException) -> NoReturn:
    """Child only: tell the caller which step failed, and exit."""
    try:
        tell(fd, step, err)
    finally:
        os._exit(127)


def _write_file(path: bytes | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def middle(order: Order, close: int = -1) -> NoReturn:
    """Child only: new session, pid/user namespace, fork the grandchild, send its pid, exit."""
    step = "setsid"
    try:
        if close >= 0:
            os.close(close)  # the server's socket: only the server reads orders
        os.setsid()
        ns = 0
        if order.userns:
            ns |= linux.CLONE_NEWUSER
        if order.pid_namespace:
            ns |= linux.CLONE_NEWPID
        if ns:
            step = "unshare"
            linux.unshare(ns)
        if order.userns:
            # map only our own ids: we keep our uid inside, and hold capabilities in the new
            # namespace until execve (a non-zero uid loses them there)
            step = "userns"
            _write_file("/proc/self/setgroups", b"deny")
            _write_file("/proc/self/uid_map", f"{order.host_uid} {order.host_uid} 1".encode())
            _write_file("/proc/self/gid_map", f"{order.host_gid} {order.host_gid} 1".encode())
        step = "fork"
        pid = os.fork()
        if pid == 0:
            os.close(order.pid_w)
            _grandchild(order)
        os.write(order.pid_w, pid.to_bytes(8, "little"))
    except BaseException as err:
        _report(order.err_w, step, err)
    os._exit(0)


def _close_all_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def _build_root(order: Order) -> bytes:
    """Child only: build a root from ``order.mounts`` on a private tmpfs; return its path.

    The tmpfs first becomes the root with the host's old root under /oldroot, so that every
    bind source is reachable whatever the tmpfs covers (bubblewrap's technique).
    """
    base = b"/tmp"
    linux.mount("tmpfs", base, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    os.mkdir(base + b"/newroot", 0o755)
    os.mkdir(base + b"/oldroot", 0o755)
    linux.pivot_root(base, base + b"/oldroot")
    os.chdir("/")
    os.makedirs(b"/newroot/dev", exist_ok=True)
    linux.mount("tmpfs", b"/newroot/dev", "tmpfs", linux.MS_NOSUID, "mode=0755")
    for dev in DEVICES:
        if os.path.exists(b"/oldroot/dev/" + dev):
            os.close(os.open(b"/newroot/dev/" + dev, os.O_WRONLY | os.O_CREAT, 0o666))
            linux.mount(b"/oldroot/dev/" + dev, b"/newroot/dev/" + dev, None, linux.MS_BIND)
    os.makedirs(b"/newroot/tmp", exist_ok=True)
    linux.mount("tmpfs", b"/newroot/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    os.makedirs(b"/newroot/proc", exist_ok=True)
    # binds last, shallowest first: a grant under /tmp lands on top of the private /tmp
    for source_path, target_path, readonly in sorted(
        order.mounts, key=lambda m: m[1].count(b"/")
    ):
        source = b"/oldroot" + source_path
        target = b"/newroot" + target_path
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        linux.bind(source, target, readonly=readonly)
    return b"/newroot"


def _nearest_device(path: bytes) -> int:
    """The device of ``path``'s nearest existing ancestor (where creating it would write)."""
    existing = os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    return os.stat(existing).st_dev


def _graft(root: bytes, mounts: list[tuple[bytes, bytes, bool]]) -> None:
    """Child only: bind ``mounts`` into a prepared ``root``, in our own mount namespace.

    A missing mount point is created on the root's own tmpfs (its read-only flag lifted on
    our copy of the mount only, and restored after) or on its private /tmp; never on a bound
    host directory, which would write to the host (EROFS instead).
    """
    root_dev = os.stat(root).st_dev
    tmp_dev = os.stat(root + b"/tmp").st_dev if os.path.isdir(root + b"/tmp") else root_dev
    opened = False
    for source, target, readonly in sorted(mounts, key=lambda m: m[1].count(b"/")):
        dest = root + target
        is_dir = os.path.isdir(source)
        if not os.path.lexists(dest):
            device = _nearest_device(dest)
            if device not in (root_dev, tmp_dev):
                raise OSError(errno.EROFS, f"no mount point for {os.fsdecode(target)!r} "
                                           "inside a bound host path")
            if device == root_dev and not opened:
                linux.mount(None, root, None,
                            linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NODEV)
                opened = True
            if is_dir:
                os.makedirs(dest, 0o755)
            else:
                os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
                os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        linux.bind(source, dest, readonly=readonly)
    if opened:
        linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                    | linux.MS_NOSUID | linux.MS_NODEV)


def _place_listen_fds(order: Order) -> tuple[int, ...]:
    """Child only: put the passed sockets on fds 3, 4, ... (inheritable) and set LISTEN_FDS
    and LISTEN_PID; returns the descriptors placed.

    LISTEN_PID must be the pid the *program* sees. Without a pid namespace that is ours (the
    program is exec'd in this process). With one, we are pid 1 there and exec tini, whose
    first and only fork runs the program: pid allocation in a fresh namespace is sequential,
    and nothing else can enter it before, so the program is pid 2 (checked by the tests).
    """
    n = len(order.listen)
    if not n:
        return ()
    top = SD_LISTEN_FDS_START + n

    def lift(fd: int) -> int:
        # a descriptor we still need that sits where a socket must go moves above them
        if SD_LISTEN_FDS_START <= fd < top:
            return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)
        return fd

    order.err_w, order.go_r, order.init = lift(order.err_w), lift(order.go_r), lift(order.init)
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in order.listen]
    for i, fd in enumerate(sources):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
    pid = 2 if order.init >= 0 else os.getpid()
    order.env[b"LISTEN_FDS"] = str(n).encode()
    order.env[b"LISTEN_PID"] = str(pid).encode()
    return tuple(range(SD_LISTEN_FDS_START, top))


def _grandchild(order: Order) -> NoReturn:
    """Child only: enter cgroups and namespaces, pivot, drop privileges, seccomp, execve."""
    step = "signals"
    try:
        # ignored signals survive execve: undo what Python set up (SIGPIPE, SIGXFSZ ignored)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if order.tty:
            # a session of our own (we are not the middle's session leader), so that we may
            # take the terminal; it is also a process group of our own, as below
            step = "setsid"
            os.setsid()
        else:
            step = "setpgid"
            os.setpgid(0, 0)  # own process group: killpg(pid) reaches the app's group
        step = "cgroup"
        for procs in order.cgroup_procs:
            _write_file(procs, b"0")  # "0": the writing process itself, any pid namespace
        if order.netns >= 0:
            step = "netns"
            linux.setns(order.netns, linux.CLONE_NEWNET)
        if order.unshare_flags:
            step = "unshare"
            linux.unshare(order.unshare_flags)
            step = "mount-private"
            # nothing we mount from here on propagates back to the host, and vice versa
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        step = "stdio"
        os.dup2(order.stdin, 0)
        os.dup2(order.stdout, 1)
        os.dup2(order.stderr, 2)
        if order.tty:
            # fd 0 becomes our session's controlling terminal, with our process group in the
            # foreground. Argument 0: never steal a terminal that is another session's (that
            # fails with EPERM). Behind tini, tini's child moves the program into a group of
            # its own and makes that the foreground group (tcsetpgrp), so ^C reaches the
            # program, not tini, and a shell gets job control.
            step = "tty"
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        root = order.root
        if root is None and order.mounts:
            step = "mounts"
            root = _build_root(order)
        elif root is not None and order.mounts:
            step = "mounts"
            _graft(root, order.mounts)
        if order.pid_namespace:
            # a fresh /proc that shows only this pid namespace; mounted before the old root
            # is detached, since the kernel only allows it while a full /proc is visible
            step = "proc"
            linux.mount(
                "proc",
                (root or b"") + b"/proc",
                "proc",
                linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
            )
        if root is not None:
            step = "pivot_root"
            os.chdir(root)
            try:
                linux.pivot_root(".", ".")
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # the root was not a mount point: make it one and retry
                linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
                os.chdir(root)
                linux.pivot_root(".", ".")
            # the old root is stacked on "."; detach it so no path leads back to the host
            linux.umount2(".", linux.MNT_DETACH)
            os.chdir("/")
        step = "cwd"
        os.chdir(order.cwd)
        if order.drop_caps:
            step = "capabilities"
            linux.clear_capabilities(order.last_cap)
        if order.uid is not None and order.gid is not None and not order.userns:
            step = "setgroups"
            os.setgroups([])
            step = "setgid"
            os.setresgid(order.gid, order.gid, order.gid)
            step = "setuid"
            os.setresuid(order.uid, order.uid, order.uid)
        if order.drop_caps:
            step = "capabilities"
            linux.clear_capability_sets()
        if order.no_new_privs:
            step = "no_new_privs"
            linux.set_no_new_privs()
        step = "listen_fds"
        keep = _place_listen_fds(order)
        step = "close_fds"
        _close_all_but((order.err_w, order.go_r, order.init, *keep))
        step = "sync"
        # the caller has read our start time; anything but its "g" (EOF: it gave up or died)
        # means nobody will track this process, so it must not run
        if os.read(order.go_r, 1) != b"g":
            os._exit(126)
        os.close(order.go_r)
        step = "exec"
        if order.init >= 0:
            # tini reports a failing exec only on stderr: check the program here first
            found = [c for c in order.candidates if os.path.isfile(c)]
            if not found:
                raise FileNotFoundError(errno.ENOENT, f"{os.fsdecode(order.argv[0])}: not found")
            if not any(os.access(c, os.X_OK) for c in found):
                raise PermissionError(errno.EACCES, f"{os.fsdecode(found[0])}: not executable")
        if order.seccomp is not None:
            step = "seccomp"
            linux.load_seccomp(order.seccomp)
            step = "exec"
        if order.init >= 0:
            os.execve(order.init, order.init_argv, order.env)  # noqa: S606 (no shell, by design)
        saved: OSError | None = None
        for candidate in order.candidates:
            try:
                os.execve(candidate, order.argv, order.env)  # noqa: S606
            except OSError as err:
                # like execvp: a later directory may hold it; keep a non-ENOENT error
                if saved is None or err.errno not in (errno.ENOENT, errno.ENOTDIR):
                    saved = err
        raise saved or FileNotFoundError(errno.ENOENT, os.fsdecode(order.argv[0]))
    except BaseException as err:
        _report(order.err_w, step, err)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i : i + 4], "little", signed=True)
                       for i in range(0, usable, 4))
    return fds


def _execute(raw: bytes, fds: list[int], sock_fd: int) -> None:
    """Server only: fork the middle process for one order and collect it."""
    err_w = -1
    try:
        # orders come only from the process that started us, over a socketpair it alone holds
        data = marshal.loads(raw)  # noqa: S302
        err_w = fds[data["fds"]["err_w"]]
        order = Order(data, fds)
        pid = os.fork()
        if pid == 0:
            try:
                middle(order, close=sock_fd)
            finally:
                os._exit(127)
        while True:
            try:
                os.waitpid(pid, 0)  # the middle exits right after its fork
                break
            except InterruptedError:
                continue
    except Exception as err:
        if err_w >= 0:
            tell(err_w, "forkserver", err)
    finally:
        for fd in fds:
            os.close(fd)


def serve(sock_fd: int) -> None:
    """The fork server's loop: execute one order per message until EOF on ``sock_fd``."""
    os.chdir("/")  # pin no directory of the caller's (it may live on a mount to be removed)
    sock = _socket.socket(fileno=sock_fd)
    ancillary_size = _socket.CMSG_SPACE(MAX_FDS * 4)
    while True:
        try:
            # CLOEXEC: the pipes' write ends must vanish at the grandchild's execve
            raw, ancillary, flags, _ = sock.recvmsg(MAX_ORDER, ancillary_size,
                                                    _socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        fds = _received_fds(ancillary)
        if not raw and not fds:
            return  # EOF: the caller is gone; what we launched runs on without us
        if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            continue  # a mangled order: the caller sees EOF on its pipes and says so
        _execute(raw, fds, sock_fd)


BOOTSTRAP = """
import sys
launch_dir = sys.argv[1]
# register the two packages without running their __init__ (which import pydantic, psutil):
# only corral.launch._child and corral.launch.linux are loaded, straight from launch_dir
for name, path in (("corral", launch_dir.rpartition("/")[0]), ("corral.launch", launch_dir)):
    module = type(sys)(name)
    module.__path__ = [path]
    sys.modules[name] = module
from corral.launch import _child
_child.serve(int(sys.argv[2]))
"""
