"""Instance roots: the file system an app sees, built from bind mounts on the host.

A root is a tmpfs at ``<runtime>/roots/<instance-id>`` (a mount point, as pivot_root needs)
holding, by allow-list: the host system read-only (/usr, /etc and the /bin, /lib*, /sbin
links or binds), a minimal /dev (device nodes bound from the host), a private /tmp and
/dev/shm (tmpfs), an empty /proc (the launcher mounts a fresh one for the pid namespace), the
app directory read-only at its own path, and the manifest's [paths] with their modes. Every
bind is nosuid and nodev; the tmpfs root itself is made read-only last. Anything not listed
(/home, /root, /var, /srv, /run, the corral home and runtime dir, other apps) does not
exist inside.

The mounts live in the host's mount namespace under a private bind of ``<runtime>/roots``
so that they never propagate elsewhere; the launcher copies the tree into the instance's own
mount namespace and pivots into it, so nothing of a running app depends on the fs driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.sdk import linux

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}  # fmt: skip


@dataclass(frozen=True)
class Grant:
    """A host path made visible at the same path inside the root."""

    path: str
    mode: str  # "ro" | "rw"
    create: bool = False


@dataclass
class RootSpec:
    """What one instance root contains besides the fixed system part."""

    app_directory: str
    grants: list[Grant] = field(default_factory=list)
    owner: tuple[int, int] | None = None  # uid, gid that created paths belong to
    tmp_size: str = "128m"
    system_dirs: tuple[str, ...] = SYSTEM_DIRS


def mount_points(mountinfo_path: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of the calling process's namespace, in mount order (octal escapes undone)."""
    points: list[str] = []
    with open(mountinfo_path, "rb") as f:
        for line in f:
            raw = line.split()[4]
            points.append(os.fsdecode(_unescape(raw)))
    return points


def _unescape(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def _is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


class RootBuilder:
    """Builds and removes instance roots under ``<runtime>/roots``."""

    def __init__(self, runtime_dir: Path) -> None:
        self.base = runtime_dir / "roots"

    def path(self, instance_id: str) -> Path:
        """Where the root of ``instance_id`` lives."""
        return self.base / instance_id

    def ensure_base(self) -> None:
        """Create ``roots`` (0700 chain) as a private mount, so our mounts never propagate."""
        for parent in reversed([self.base, *self.base.parents]):
            if not parent.exists():
                parent.mkdir(mode=0o700)
        if str(self.base) not in mount_points():
            linux.mount(str(self.base), str(self.base), None, linux.MS_BIND)
        linux.mount(None, str(self.base), None, linux.MS_PRIVATE)

    def release_base(self) -> None:
        """Unmount the private ``roots`` mount once no root remains (exact teardown)."""
        if self.base.exists() and not any(self.base.iterdir()):
            if str(self.base) in mount_points():
                linux.umount2(str(self.base), linux.MNT_DETACH)
            self.base.rmdir()

    def names(self) -> set[str]:
        """Instance ids that have a root directory."""
        if not self.base.is_dir():
            return set()
        return {p.name for p in self.base.iterdir() if p.is_dir()}

    def is_complete(self, instance_id: str) -> bool:
        """True if the root is mounted (its tmpfs and system binds are in place)."""
        root = str(self.path(instance_id))
        points = set(mount_points())
        return root in points and root + "/usr" in points

    def build(self, instance_id: str, spec: RootSpec) -> Path:
        """Build the root of ``instance_id``; on failure undo what was done and re-raise."""
        self.ensure_base()
        root = self.path(instance_id)
        if root.exists():
            self.remove(instance_id)  # a leftover: rebuild from scratch
        root.mkdir(mode=0o755)
        try:
            self._populate(root, spec)
        except BaseException:
            self.remove(instance_id)
            raise
        return root

    def _populate(self, root: Path, spec: RootSpec) -> None:
        r = str(root)
        linux.mount("tmpfs", r, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
        for host in spec.system_dirs:
            if os.path.islink(host):
                os.symlink(os.readlink(host), r + host)  # merged /usr: /bin -> usr/bin
            elif os.path.isdir(host):
                os.makedirs(r + host)
                linux.bind(host, r + host, readonly=True)
        # /dev: a tmpfs with the harmless device nodes bound in, nothing else
        os.mkdir(r + "/dev", 0o755)
        linux.mount("tmpfs", r + "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755")
        for dev in DEVICES:
            if os.path.exists("/dev/" + dev):
                os.close(os.open(r + "/dev/" + dev, os.O_WRONLY | os.O_CREAT, 0o666))
                linux.mount("/dev/" + dev, r + "/dev/" + dev, None, linux.MS_BIND)
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{r}/dev/{name}")
        os.mkdir(r + "/dev/shm")
        tmpfs_opts = f"mode=1777,size={spec.tmp_size}"
        linux.mount(
            "tmpfs",
            r + "/dev/shm",
            "tmpfs",
            linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
            tmpfs_opts,
        )
        os.mkdir(r + "/tmp")
        linux.mount("tmpfs", r + "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, tmpfs_opts)
        os.mkdir(r + "/proc", 0o555)
        # the app directory read-only, then the grants, shallowest first so that a grant
        # inside the app directory lands on top of it
        grants = [Grant(spec.app_directory, "ro"), *spec.grants]
        for grant in sorted(grants, key=lambda g: g.path.rstrip("/").count("/")):
            self._grant(r, grant, spec.owner)
        # nothing may be created at the top level: "/" itself becomes read-only
        linux.set_mount_attributes(r, readonly=True, recursive=False)

    def _grant(self, r: str, grant: Grant, owner: tuple[int, int] | None) -> None:
        host = os.path.realpath(grant.path)
        if not os.path.exists(host):
            if not grant.create:
                raise FileNotFoundError(
                    2,
                    f"granted path {grant.path!r} does not exist (set create = true to create it)",
                )
            os.makedirs(host, mode=0o750)
            if owner is not None:
                os.chown(host, *owner)
        target = r + grant.path.rstrip("/")
        if os.path.isdir(host):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        linux.bind(host, target, readonly=grant.mode != "rw")

    def remove(self, instance_id: str) -> None:
        """Unmount everything under the root (deepest first, MNT_DETACH) and remove it."""
        root = str(self.path(instance_id))
        for point in sorted(
            (p for p in mount_points() if _is_under(p, root)),
            key=lambda p: p.count("/"),
            reverse=True,
        ):
            try:
                linux.umount2(point, linux.MNT_DETACH)
            except OSError as err:
                if err.errno not in (22, 2):  # EINVAL/ENOENT: already gone with its parent
                    raise
        left = [p for p in mount_points() if _is_under(p, root)]
        if left:
            # never rm -r through a bind of a host path
            raise OSError(16, f"mounts remain under {root}: {left}")
        if os.path.lexists(root):
            _remove_tree(root)


def _remove_tree(path: str) -> None:
    """rm -r that never crosses into a mount (all are detached before) nor follows links."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)
