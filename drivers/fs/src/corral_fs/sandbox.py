"""The fs driver's work, without the bus: per-instance roots, cgroups and the plan fragment.

``Sandbox`` is synchronous and usable on its own (tests, the CLI); ``FsDriver`` wraps it in
the CDP/1 lifecycle operations. Nothing a running app needs lives in the driver process: the
roots are mounts and the cgroups are kernel objects, so apps survive a driver restart, and
``sync`` re-creates or collects them from the kernel's list of live instances.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corral.protocol import AppSpec, InstanceSpec, PlanFragment
from corral_fs._cgroups import CgroupTree, Limits, detect
from corral_fs._root import Grant, RootBuilder, RootSpec

DEFAULT_UID_RANGE = (61000, 61999)
DEFAULT_RUNTIME_DIR = Path("/run/corral")


def cgroup_base(runtime_dir: Path) -> str:
    """The cgroup base of the kernel whose runtime dir is ``runtime_dir``: ``corral`` for the
    host's kernel (/run/corral), ``corral-<hash>`` for any other (tests, side-by-side
    kernels), so that one kernel's garbage collection never touches another's instances."""
    resolved = Path(os.path.abspath(runtime_dir))
    if resolved == DEFAULT_RUNTIME_DIR:
        return "corral"
    return "corral-" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]


def grants(app: AppSpec) -> list[Grant]:
    """The manifest's [paths] as grants; relative paths are relative to the app directory."""
    found: list[Grant] = []
    for name, entry in (app.manifest.get("paths") or {}).items():
        spec: dict[str, Any] = {"path": entry} if isinstance(entry, str) else dict(entry)
        path = spec.get("path")
        if not path:
            raise ValueError(f"paths.{name}: no path")
        full = os.path.normpath(os.path.join(app.directory, path))
        found.append(Grant(full, spec.get("mode", "ro"), bool(spec.get("create", False))))
    return found


def instance_grants(app: AppSpec, instance: InstanceSpec) -> list[Grant]:
    """The app's grants plus, read-only, the resolved manifest the kernel hands the app
    (``CORRAL_MANIFEST``): part of the app's contract, so it must be readable inside."""
    found = grants(app)
    manifest = instance.env.get("CORRAL_MANIFEST")
    if manifest and os.path.isabs(manifest) and os.path.isfile(manifest):
        found.append(Grant(os.path.normpath(manifest), "ro"))
    return found


def tmp_size(limits: Limits) -> str:
    """Size of the private /tmp and /dev/shm: the memory limit (tmpfs pages are charged to the
    writer's cgroup anyway), else 128 MiB."""
    return str(limits.memory) if limits.memory else "128m"


class Sandbox:
    """Prepares and tears down instance sandboxes on this host. Thread-safe: the driver runs
    its operations in threads, and a release removing the (empty) bases must not race a
    prepare creating the first group or root under them."""

    def __init__(self, runtime_dir: Path, cgroups: CgroupTree | None = None) -> None:
        self.roots = RootBuilder(runtime_dir)
        self.cgroups = cgroups if cgroups is not None else detect(cgroup_base(runtime_dir))
        self._lock = threading.RLock()

    def prepare(self, app: AppSpec, instance: InstanceSpec, uid: int, gid: int) -> PlanFragment:
        """Build the root and the cgroup of ``instance``; undo both on failure."""
        with self._lock:
            return self._prepare(app, instance, uid, gid)

    def _prepare(self, app: AppSpec, instance: InstanceSpec, uid: int, gid: int
                 ) -> PlanFragment:
        limits = Limits.from_manifest(app.manifest)
        spec = RootSpec(app.directory, instance_grants(app, instance), owner=(uid, gid),
                        tmp_size=tmp_size(limits))
        procs = self.cgroups.create(instance.id, limits)
        try:
            root = self.roots.build(instance.id, spec)
        except BaseException:
            self.cgroups.remove(instance.id)
            raise
        return PlanFragment(
            root=str(root),
            cgroup_procs=procs,
            uid=uid,
            gid=gid,
            pid_namespace=True,
            seccomp="default",
        )

    def restore(self, app: AppSpec, instance: InstanceSpec, uid: int, gid: int) -> None:
        """Re-create the host side of a live instance (its cgroup if gone, its root if
        incomplete); the running app keeps its own copy of the mounts meanwhile."""
        limits = Limits.from_manifest(app.manifest)
        with self._lock:
            if not self.cgroups.exists(instance.id):
                self.cgroups.create(instance.id, limits)
            if not self.roots.is_complete(instance.id):
                spec = RootSpec(app.directory, instance_grants(app, instance), (uid, gid),
                                tmp_size(limits))
                self.roots.build(instance.id, spec)

    def release(self, instance_id: str) -> None:
        """Kill what remains in the instance's cgroup, remove it, unmount and remove the root."""
        with self._lock:
            self.cgroups.remove(instance_id)
            self.roots.remove(instance_id)
            self.roots.release_base()
            self.cgroups.release_base()

    def known(self) -> set[str]:
        """Instance ids that have a root or a cgroup on this host."""
        return self.roots.names() | self.cgroups.names()

    def is_complete(self, instance_id: str) -> bool:
        """True if both the root and the cgroup of ``instance_id`` are in place."""
        return self.roots.is_complete(instance_id) and self.cgroups.exists(instance_id)

    def collect(self, live: Iterable[str]) -> list[str]:
        """Release every instance not in ``live``; return the ids released."""
        with self._lock:
            dead = sorted(self.known() - set(live))
            for instance_id in dead:
                self.release(instance_id)
            return dead
