"""Per-instance cgroups with the manifest's [limits], behind one interface, two backends.

``CgroupTree`` is the contract; ``CgroupV2`` drives the unified hierarchy (most hosts) and
``CgroupV1`` the per-controller hierarchies (older hosts, and hybrid ones whose v2 mount has
no controllers). ``detect()`` picks the one the host actually offers for pids, memory, cpu.
Every instance gets ``<base>/<instance-id>``; the launcher writes the new process into the
returned ``cgroup.procs`` files before it execs, so every descendant is accounted. The base is
one per kernel (``sandbox.cgroup_base``): the driver collects every group under it that the
kernel does not list as live, so two kernels on one host must never share a base. The base
itself is removed with its last group, leaving the hierarchy as it was.
"""

from __future__ import annotations

import abc
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.sdk import linux
from corral.units import parse_size

CONTROLLERS = ("pids", "memory", "cpu")
_CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """Resource limits of one instance: None means unlimited."""

    processes: int | None = None
    memory: int | None = None  # bytes
    cpu: float | None = None  # CPUs (1.5 = one and a half cores)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Limits:
        """Read the resolved manifest's [limits] table (memory as bytes, or a size such as
        "512MiB" or "100MB" in corral's one notation, ``corral.units``: MB is 10^6 bytes)."""
        raw = manifest.get("limits") or {}
        memory = raw.get("memory")
        return cls(
            processes=int(raw["processes"]) if raw.get("processes") is not None else None,
            memory=parse_size(memory) if memory is not None else None,
            cpu=float(raw["cpu"]) if raw.get("cpu") is not None else None,
        )


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except FileNotFoundError:
        return []


class CgroupTree(abc.ABC):
    """One host's cgroup hierarchy for corral instances."""

    version: int

    @abc.abstractmethod
    def create(self, name: str, limits: Limits) -> list[str]:
        """Create (or update) group ``name`` with ``limits``; return its cgroup.procs files."""

    @abc.abstractmethod
    def directories(self, name: str) -> list[Path]:
        """The group's directories (one per hierarchy)."""

    @abc.abstractmethod
    def names(self) -> set[str]:
        """Every group that exists under the base."""

    def exists(self, name: str) -> bool:
        """True if the group exists in every hierarchy."""
        return all(d.is_dir() for d in self.directories(name))

    def pids(self, name: str) -> set[int]:
        """Pids in the group (any hierarchy)."""
        found: set[int] = set()
        for d in self.directories(name):
            found.update(_pids(d / "cgroup.procs"))
        return found

    def kill(self, name: str, timeout: float = 5.0) -> None:
        """SIGKILL every process of the group until it is empty (the pids cap bounds a race
        with fork); raises TimeoutError if it does not empty."""
        deadline = time.monotonic() + timeout
        while pids := self.pids(name):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cgroup {name!r} still holds pids {sorted(pids)}")
            time.sleep(0.01)

    @abc.abstractmethod
    def bases(self) -> list[Path]:
        """The base directories (one per hierarchy) that hold the groups."""

    def release_base(self) -> None:
        """Remove the base directories once they hold no group (idempotent)."""
        for base in self.bases():
            try:
                base.rmdir()
            except OSError as err:
                # ENOTEMPTY/EBUSY: a group remains (or was just created); ENOENT: done already
                if err.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT):
                    raise

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Kill what remains and remove the group's directories (idempotent)."""
        self.kill(name, timeout)
        deadline = time.monotonic() + timeout
        for d in self.directories(name):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    # EBUSY: killed tasks are still leaving the group
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


class CgroupV2(CgroupTree):
    """The unified hierarchy: one directory per group, controllers enabled down the path."""

    version = 2

    def __init__(self, mount: Path, base: str = "corral") -> None:
        self.mount = mount
        self.base = mount / base

    def _enable(self, parent: Path) -> None:
        wanted = " ".join(f"+{c}" for c in CONTROLLERS)
        _write(parent / "cgroup.subtree_control", wanted)

    def directories(self, name: str) -> list[Path]:
        return [self.base / name]

    def bases(self) -> list[Path]:
        return [self.base]

    def names(self) -> set[str]:
        if not self.base.is_dir():
            return set()
        return {p.name for p in self.base.iterdir() if p.is_dir()}

    def create(self, name: str, limits: Limits) -> list[str]:
        self._enable(self.mount)
        self.base.mkdir(exist_ok=True)
        self._enable(self.base)
        group = self.base / name
        group.mkdir(exist_ok=True)
        try:
            _write(group / "pids.max", str(limits.processes) if limits.processes else "max")
            _write(group / "memory.max", str(limits.memory) if limits.memory else "max")
            if limits.memory and (group / "memory.swap.max").exists():
                _write(group / "memory.swap.max", "0")  # the limit is the limit, not + swap
            quota = int(limits.cpu * _CPU_PERIOD_US) if limits.cpu else None
            _write(group / "cpu.max", f"{quota or 'max'} {_CPU_PERIOD_US}")
        except BaseException:
            self.remove(name)
            raise
        return [str(group / "cgroup.procs")]

    def kill(self, name: str, timeout: float = 5.0) -> None:
        kill_file = self.base / name / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")  # atomic against fork, Linux >= 5.14
        super().kill(name, timeout)


class CgroupV1(CgroupTree):
    """Per-controller hierarchies: the group exists once under each of pids, memory, cpu."""

    version = 1

    def __init__(self, mounts: dict[str, Path], base: str = "corral") -> None:
        self.mounts = mounts
        self.base = base

    def directories(self, name: str) -> list[Path]:
        return [self.mounts[c] / self.base / name for c in CONTROLLERS]

    def bases(self) -> list[Path]:
        return [self.mounts[c] / self.base for c in CONTROLLERS]

    def names(self) -> set[str]:
        found: set[str] = set()
        for c in CONTROLLERS:
            base = self.mounts[c] / self.base
            if base.is_dir():
                found.update(p.name for p in base.iterdir() if p.is_dir())
        return found

    def create(self, name: str, limits: Limits) -> list[str]:
        dirs = self.directories(name)
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            pids, memory, cpu = dirs
            _write(pids / "pids.max", str(limits.processes) if limits.processes else "max")
            _write(memory / "memory.limit_in_bytes", str(limits.memory or -1))
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, str(limits.memory or -1))
            _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            quota = int(limits.cpu * _CPU_PERIOD_US) if limits.cpu else -1
            _write(cpu / "cpu.cfs_quota_us", str(quota))
        except BaseException:
            self.remove(name)
            raise
        return [str(d / "cgroup.procs") for d in dirs]


def _cgroup_mounts(mountinfo: str) -> tuple[Path | None, dict[str, Path]]:
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        target = Path(fields[4].replace("\\040", " "))
        if extra[0] == "cgroup2" and unified is None:
            unified = target
        elif extra[0] == "cgroup":
            for opt in extra[2].split(","):
                if opt in CONTROLLERS and opt not in v1:
                    v1[opt] = target
    return unified, v1


# a mount's own options as mountinfo shows them -> the mount(2) flags that keep them on remount
_MOUNT_FLAGS = {"ro": linux.MS_RDONLY, "nosuid": linux.MS_NOSUID, "nodev": linux.MS_NODEV,
                "noexec": linux.MS_NOEXEC, "noatime": linux.MS_NOATIME,
                "nodiratime": linux.MS_NODIRATIME, "relatime": linux.MS_RELATIME,
                "strictatime": linux.MS_STRICTATIME}
FAVOR = "favordynmods"


@dataclass(frozen=True)
class Remount:
    """A remount of the cgroup2 hierarchy with ``favordynmods`` added to what it has."""

    target: Path
    flags: int  # MS_REMOUNT and the mount's own flags, kept as they are
    data: str  # the hierarchy's options as they are, plus favordynmods


def favor_remount(mountinfo: str) -> Remount | str:
    """The remount that turns ``favordynmods`` on, or why none is needed or possible.

    Remounting cgroup2 replaces its options (nsdelegate, memory_recursiveprot...) with the
    ones given, so the remount repeats every option the mount has and adds one; the mount's
    own flags (nosuid, nodev, noexec, atime) are repeated likewise."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 6 or len(extra) < 3 or extra[0] != "cgroup2":
            continue
        target = Path(fields[4].replace("\\040", " "))
        options = [o for o in extra[2].split(",") if o not in ("rw", "ro")]
        if FAVOR in options:
            return f"already set on {target}"
        flags = linux.MS_REMOUNT
        for opt in fields[5].split(","):
            flags |= _MOUNT_FLAGS.get(opt, 0)
        return Remount(target, flags, ",".join([*options, FAVOR]))
    return "no cgroup2 hierarchy is mounted"


def favor_dynamic_changes() -> str:
    """Make moving a process into a cgroup cheap, host-wide (Linux 6.0+, ``favordynmods``).

    Every launch writes the new process into its cgroups' ``cgroup.procs``; by default the
    first such write waits for an RCU grace period (8-15 ms measured here, on the path of
    every deploy, restart and build), because the kernel keeps fork and exit cheap instead.
    ``favordynmods`` on the cgroup2 hierarchy turns that around for the whole host (the lock
    is one for all hierarchies, v1 included): migrations take ~0.3 ms, fork and exit pay a
    memory barrier. The kernel cannot turn it off again until the next boot. Returns what was
    done, for the log; raises OSError if the remount was refused."""
    with open("/proc/self/mountinfo") as f:
        found = favor_remount(f.read())
    if isinstance(found, str):
        return found
    linux.mount(None, str(found.target), None, found.flags, found.data)
    return f"set on {found.target}"


def detect(base: str = "corral") -> CgroupTree:
    """The backend this host offers for pids, memory and cpu; raises RuntimeError if none."""
    with open("/proc/self/mountinfo") as f:
        unified, v1 = _cgroup_mounts(f.read())
    if unified is not None:
        try:
            available = set((unified / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        if set(CONTROLLERS) <= available:
            return CgroupV2(unified, base)
    if set(CONTROLLERS) <= set(v1):
        return CgroupV1(v1, base)
    raise RuntimeError(
        "no cgroup hierarchy offers pids, memory and cpu (cgroup v2 controllers "
        f"{'unavailable' if unified else 'not mounted'}; v1 has {sorted(v1) or 'none'})"
    )
