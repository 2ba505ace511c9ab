"""What the launch path can enforce for the calling user, and the dev-loop plan that follows.

As root everything is enforced. Without root (``corral dev`` on a laptop), the launcher uses an
unprivileged user namespace, where the kernel allows one, to give the app the same mount view
(read-only system, granted paths, private /tmp, fresh /proc in its own pid namespace) and the
same seccomp filter; what it cannot enforce is returned as plain sentences, printed once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from corral.launch import linux
from corral.protocol._lifecycle import BindMount, InstanceSpec, LaunchPlan

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt")


@dataclass(frozen=True)
class Enforcement:
    """What the calling process can enforce on the apps it launches."""

    root: bool
    user_namespaces: bool
    cgroups_writable: bool
    seccomp: bool


def _probe_user_namespace() -> bool:
    """Fork a child that tries unshare(CLONE_NEWUSER | CLONE_NEWNS): the only honest test."""
    pid = os.fork()
    if pid == 0:
        try:
            linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _cgroups_writable() -> bool:
    candidates = ["/sys/fs/cgroup", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, _, path = line.strip().split(":", 2)
                if line.startswith("0::"):
                    candidates.append("/sys/fs/cgroup" + path)  # a delegated v2 subtree
    except OSError:
        pass
    return any(os.access(p, os.W_OK) for p in candidates if os.path.isdir(p))


def capabilities() -> Enforcement:
    """Probe what can be enforced here (root? user namespaces? cgroups? seccomp?)."""
    root = os.geteuid() == 0
    try:
        from corral.launch._seccomp import compiled_filter

        compiled_filter("default")
        seccomp = True
    except Exception:
        seccomp = False
    return Enforcement(
        root=root,
        user_namespaces=root or _probe_user_namespace(),
        cgroups_writable=_cgroups_writable(),
        seccomp=seccomp,
    )


def unprivileged_plan(
    instance: InstanceSpec,
    app_directory: str,
    grants: list[BindMount],
    *,
    enforcement: Enforcement | None = None,
    limits: bool = False,
) -> tuple[LaunchPlan, list[str]]:
    """The dev-loop plan for ``instance`` and the sentences saying what is not enforced.

    With user namespaces the launcher builds the view from ``mounts`` (system read-only, the
    app directory read-only, ``grants`` with their modes) inside a namespace of its own.
    """
    found = enforcement or capabilities()
    unenforced = [
        "The app runs as your own user, not as a dedicated unprivileged user.",
        "Network isolation (own address, egress list, interfaces) is not enforced.",
    ]
    if limits and not found.cgroups_writable:
        unenforced.append(
            "The [limits] (processes, memory, cpu) are not enforced: "
            "the cgroups are not writable by you."
        )
    elif limits:
        unenforced.append("The [limits] (processes, memory, cpu) are not enforced by `corral dev`.")
    if not found.seccomp:
        unenforced.append("The seccomp filter is not applied: libseccomp is not installed.")
    if not found.user_namespaces:
        unenforced.append(
            "The file system is not confined: this kernel does not allow "
            "unprivileged user namespaces; the app sees what you see."
        )
        plan = LaunchPlan(instance=instance, seccomp="default" if found.seccomp else None)
        return plan, unenforced
    mounts = [BindMount(source=d, target=d, mode="ro") for d in SYSTEM_DIRS if os.path.isdir(d)]
    mounts.append(BindMount(source=app_directory, target=app_directory, mode="ro"))
    mounts.extend(grants)
    plan = LaunchPlan(
        instance=instance,
        mounts=mounts,
        pid_namespace=True,
        seccomp="default" if found.seccomp else None,
    )
    return plan, unenforced
