"""Escape attempts, run by the system python3 inside a sandboxed instance; prints JSON.

Each entry is "ok" when the attempt succeeded, else the errno name it failed with.
Environment: DATA (rw grant), RO (ro grant), APP (app dir), SECRET (a host file outside every
grant), NEIGHBOUR (host pid of another app's process), CGROUP (a host cgroup file of ours).
"""

import ctypes
import errno
import fcntl
import json
import os
import subprocess
import termios

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
E = os.environ
R: dict[str, object] = {}


def attempt(name, fn):
    try:
        fn()
        R[name] = "ok"
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))


def raw(fn, *args):
    def call():
        if fn(*args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return call


def sysc(nr, *args):
    return raw(libc.syscall, nr, *args)


def write(path):
    return lambda: open(path, "w").write("x")


# 1. write, rename, hard-link outside granted paths, via .., a symlink, /proc/self/root
open(E["DATA"] + "/mine", "w").write("x")
attempt("write_root", write("/escape"))
attempt("write_etc", write("/etc/escape"))
attempt("write_usr", write("/usr/escape"))
attempt("write_dotdot", write(E["DATA"] + "/../escape"))
attempt("write_proc_root", write("/proc/self/root/etc/escape"))
attempt("rename_out", lambda: os.rename(E["DATA"] + "/mine", "/etc/mine"))
attempt("link_out", lambda: os.link(E["DATA"] + "/mine", E["APP"] + "/mine"))
attempt("symlink_read", lambda: open(E["DATA"] + "/to-secret").read())
attempt("read_secret", lambda: open(E["SECRET"]).read())
attempt("read_secret_proc_root", lambda: open("/proc/self/root" + E["SECRET"]).read())
# 2. a read-only grant
attempt("write_ro_grant", write(E["RO"] + "/escape"))
attempt("write_app_dir", write(E["APP"] + "/escape"))
# 3. host secrets and other processes
attempt("read_shadow", lambda: open("/etc/shadow").read())
R["proc1_cmdline"] = open("/proc/1/cmdline").read().split("\0")[0]
attempt("proc1_root_secret", lambda: open("/proc/1/root" + E["SECRET"]).read())
nb = E["NEIGHBOUR"]
attempt("neighbour_mem", lambda: open(f"/proc/{nb}/mem", "rb").read(1))
attempt("neighbour_environ", lambda: open(f"/proc/{nb}/environ", "rb").read())
# 4. ptrace / process_vm_readv / signals
PTRACE_ATTACH = 16
attempt("ptrace_attach", raw(libc.ptrace, PTRACE_ATTACH, 1, None, None))
iov = (ctypes.c_char * 8)()


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


local = IOVec(ctypes.addressof(iov), 8)
attempt("process_vm_readv", sysc(310, 1, ctypes.byref(local), 1, ctypes.byref(local), 1, 0))
attempt("kill_neighbour", lambda: os.kill(int(nb), 0))
# 10. setuid binaries gain nothing
su = subprocess.run(["/usr/bin/su", "-c", "id -u", "root"], capture_output=True,
                    stdin=subprocess.DEVNULL, text=True)
R["su"] = su.stdout.strip() or f"rc={su.returncode}"
mnt = subprocess.run(["/usr/bin/mount", "-t", "tmpfs", "x", "/tmp"], capture_output=True)
R["mount_binary_rc"] = mnt.returncode
# 11. mount, umount, pivot_root, chroot, user namespace, propagation
attempt("mount", raw(libc.mount, b"x", b"/tmp", b"tmpfs", 0, None))
attempt("umount", raw(libc.umount2, b"/proc", 2))
attempt("pivot_root", sysc(155, b"/tmp", b"/tmp"))
attempt("chroot", raw(libc.chroot, b"/tmp"))
attempt("unshare_user", raw(libc.unshare, 0x10000000))
attempt("clone_newuser", sysc(56, 0x10000000 | 17, 0, 0, 0, 0))
attempt("propagation", raw(libc.mount, None, b"/", None, (1 << 20) | 16384, None))
attempt("setns", raw(libc.setns, 0, 0))
# 12. keyrings, bpf, perf, userfaultfd, handles
attempt("keyctl", sysc(250, 0, -3, 0))
attempt("add_key", sysc(248, b"user", b"k", b"v", 1, -3))
attempt("bpf", sysc(321, 0, 0, 0))
attempt("perf_event_open", sysc(298, 0, 0, -1, -1, 0))
attempt("userfaultfd", sysc(323, 0))
attempt("open_by_handle_at", sysc(304, -100, 0, 0))
# 13. TIOCSTI on an inherited descriptor
attempt("tiocsti", lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x"))
# 14. the cgroup filesystem
attempt("cgroup_pids_max", write(E["CGROUP"]))
attempt("cgroup_release_agent", write("/sys/fs/cgroup/pids/release_agent"))
attempt("cgroup_dir", lambda: os.listdir("/sys/fs/cgroup"))
# 16. descriptors: every fd that fstat accepts
open_fds = []
for fd in range(4096):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
R["fds"] = open_fds
R["uid"] = [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()]
R["status"] = {k: v.strip() for k, v in (line.split(":", 1) for line in
               open("/proc/self/status").read().splitlines())
               if k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs",
                        "Seccomp")}
print(json.dumps(R))
