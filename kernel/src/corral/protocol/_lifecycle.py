"""The lifecycle contract between the kernel and capability drivers.

These models describe an app and its instances as the kernel hands them to drivers, and the
``LaunchPlan`` that the kernel's launch path executes. Drivers contribute to a plan with a
``PlanFragment`` in reply to ``instance.prepare``; the kernel merges the fragments (each field
may be set by at most one driver, except ``env`` which is merged key by key and
``cgroup_procs`` which is concatenated) and launches.

No behaviour lives here: this module is the contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, defer_build=True)


class AppSpec(_Model):
    """An app as deployed: its name, directory and resolved manifest (plain JSON)."""

    name: str
    directory: str = Field(description="absolute path of the app directory (holds corral.toml)")
    manifest: dict[str, Any] = Field(description="the resolved manifest, as `corral check --json`")
    uid: int | None = Field(default=None, description="uid the app runs as (None: kernel's own)")
    gid: int | None = Field(default=None, description="gid the app runs as (None: kernel's own)")
    generation: int = Field(default=1, description="deploy counter, +1 per `corral up` of the app")


class InstanceSpec(_Model):
    """One instance of one process type of an app (or one cron run, ``kind='job'``)."""

    id: str = Field(description="'<app>.<process>.<index>' for instances, '<app>.cron.<job>.<run>'")
    app: str
    process: str
    index: int
    kind: Literal["instance", "job"] = "instance"
    argv: list[str]
    env: dict[str, str]
    cwd: str
    port: int | None = Field(default=None, description="the port this instance must bind ($PORT)")


class InstanceRecord(_Model):
    """A running instance as the ledger knows it: spec plus pid and process start time."""

    spec: InstanceSpec
    pid: int
    start_time: float = Field(description="psutil create_time(); (pid, start_time) is identity")
    state: Literal["starting", "ready", "stopping", "exited"] = "starting"
    address: str = Field(default="127.0.0.1", description="address the instance's port is on")


class BindMount(_Model):
    """A path made visible inside the instance's mount namespace."""

    source: str
    target: str
    mode: Literal["ro", "rw"] = "ro"


class PlanFragment(_Model):
    """What one driver contributes to an instance's launch. Unset fields contribute nothing."""

    env: dict[str, str] = Field(default_factory=dict)
    root: str | None = Field(
        default=None, description="prepared root directory to pivot_root into (fs driver)"
    )
    mounts: list[BindMount] = Field(default_factory=list)
    netns: str | None = Field(default=None, description="path of a network namespace to join (net)")
    address: str | None = Field(default=None, description="the instance's own address (net)")
    cgroup_procs: list[str] = Field(
        default_factory=list, description="cgroup.procs files the child writes its pid into (fs)"
    )
    stdout: str | None = Field(
        default=None,
        description="path opened O_WRONLY for stdout (log); 'inherit:stdout' passes the caller's",
    )
    stderr: str | None = Field(default=None, description="path opened O_WRONLY for stderr (log)")
    pid_namespace: bool | None = None
    seccomp: str | None = Field(default=None, description="seccomp profile name, e.g. 'default'")
    uid: int | None = None
    gid: int | None = None


class LaunchPlan(_Model):
    """Everything the kernel's launch path needs to start one sandboxed process."""

    instance: InstanceSpec
    uid: int | None = None
    gid: int | None = None
    root: str | None = None
    mounts: list[BindMount] = Field(default_factory=list)
    netns: str | None = None
    address: str | None = None
    cgroup_procs: list[str] = Field(default_factory=list)
    stdout: str | None = None
    stderr: str | None = None
    pid_namespace: bool = False
    seccomp: str | None = None
    no_new_privs: bool = True
    listen_fds: list[int] = Field(
        default_factory=list,
        description="descriptors open in the launching process, passed to the program as fd 3, "
        "4, ... with LISTEN_FDS and LISTEN_PID set (systemd socket activation); the caller "
        "keeps its own copies",
    )
    stdio: list[str] | None = Field(
        default=None, min_length=3, max_length=3,
        description="host paths opened for fd 0, 1, 2 instead of /dev/null and stdout/stderr "
        "(a one-off command: `corral run`); each a FIFO or a pseudo-terminal slave "
        "(/dev/pts/N) owned by stdio_owner, anything else is refused",
    )
    stdio_owner: int | None = Field(
        default=None,
        description="uid of the client that supplied stdio: every path must belong to it",
    )
    tty: bool = Field(
        default=False,
        description="stdio[0] is a terminal that becomes the process's controlling terminal "
        "(its session's, with the program's process group in the foreground)",
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict, exclude=True, repr=False,
        description="environment merged over instance.env at launch; never dumped, "
        "serialised or shown (a plan sent elsewhere arrives without it)",
    )
