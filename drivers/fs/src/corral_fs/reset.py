"""``python -m corral_fs.reset``: the fs driver's part of ``corral host reset``.

Finds, from the runtime dir alone (no ledger): the instance roots under ``<runtime>/roots``
(tmpfs and bind mounts) with the private ``roots`` mount itself, and the cgroups under the
kernel's base (``corral`` for /run/corral, ``corral-<hash of the runtime dir>`` otherwise:
``sandbox.cgroup_base``). Removing an instance kills what is left in its cgroup first, then
unmounts its root (deepest first, never deleting through a mount) and removes both; the bases
go with their last group, leaving the hierarchy as it was.
"""

from __future__ import annotations

from corral.sdk import ResetReport, ResetRequest, serve_reset
from corral_fs._cgroups import CgroupTree, detect
from corral_fs._root import RootBuilder, _is_under, mount_points
from corral_fs.sandbox import cgroup_base


def reset(request: ResetRequest, report: ResetReport) -> None:
    """Find (and with ``request.apply`` remove) every root and cgroup of the runtime dir."""
    roots = RootBuilder(request.runtime_dir)
    cgroups: CgroupTree | None
    try:
        cgroups = detect(cgroup_base(request.runtime_dir))
    except RuntimeError:
        cgroups = None  # no usable hierarchy: corral cannot have created groups in it either
    points = mount_points()
    names = set(roots.names())
    if cgroups is not None:
        names |= cgroups.names()
    for instance_id in sorted(names):
        parts = []
        if cgroups is not None and instance_id in cgroups.names():
            held = len(cgroups.pids(instance_id))
            dirs = ", ".join(str(d) for d in cgroups.directories(instance_id))
            parts.append(f"cgroup {dirs}" + (f" ({held} processes)" if held else ""))
        root = str(roots.path(instance_id))
        mounted = sum(1 for p in points if _is_under(p, root))
        if instance_id in roots.names():
            parts.append(f"root {root}" + (f" ({mounted} mounts)" if mounted else ""))

        def remove(instance_id: str = instance_id) -> None:
            if cgroups is not None:
                cgroups.remove(instance_id)
            roots.remove(instance_id)

        report.item(f"instance {instance_id}: {'; '.join(parts)}", remove, apply=request.apply)
    if str(roots.base) in points:
        report.item(f"mount {roots.base}", roots.release_base, apply=request.apply)
    if cgroups is not None:
        for base in cgroups.bases():
            if base.is_dir():
                report.item(f"cgroup {base}", base.rmdir, apply=request.apply)


if __name__ == "__main__":
    serve_reset(reset)
