"""The operation tables of CDP/1: what each role may ask the kernel, and what drivers serve.

Requests are dispatched from these explicit tables only: an ``op`` string from the wire is a
key into a dict built at import time, never a name looked up on an object. Each entry names
the pydantic model its ``args`` must validate against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.protocol._lifecycle import AppSpec, InstanceRecord, InstanceSpec


class Args(BaseModel):
    """Base of operation arguments: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class NoArgs(Args):
    """An operation without arguments."""


# ---- kernel operations (served by corrald) -------------------------------------------------


AppNameField = Annotated[str, Field(
    pattern=r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$",
    description="an app name: a DNS label (lowercase letters, digits and '-')")]


class GitSource(Args):
    """What a ``git push`` deployed: the commit and the ref it was pushed to."""

    commit: str = Field(pattern=r"^[0-9a-f]{40}([0-9a-f]{24})?$")
    ref: str = Field(max_length=255, pattern=r"^refs/heads/[A-Za-z0-9._/-]+$")


UploadField = Annotated[str, Field(
    pattern=r"^[0-9a-f]{32}$",
    description="an upload's token: a tar of the source the SSH gateway received")]


class Deploy(Args):
    """``app.deploy``: resolve the manifest in ``directory`` (or in the source uploaded under
    ``upload``: remote peers deploy uploads only) and deploy it."""

    directory: str = Field(default="", description="a directory on the host (local clients)")
    upload: UploadField | None = None
    name: AppNameField | None = Field(
        default=None, description="the app this deploy must be (a push names its app): a "
        "manifest naming another is refused; an app with no [app] name takes it")
    git: GitSource | None = Field(default=None, description="the pushed commit (git push)")
    set: list[str] = Field(default_factory=list)
    offset: int = 0
    env: list[str] = Field(default_factory=list)
    wait_s: float | None = Field(
        default=None, gt=0, description="how long each new instance may take to be ready and "
        "healthy; default: its process's start_timeout, else the host's start_timeout_s")
    reset_overrides: bool = Field(
        default=False, description="forget the --set/--env/--offset of earlier deploys (kept "
        "and applied again otherwise)")


    @model_validator(mode="after")
    def _one_source(self) -> Deploy:
        if bool(self.directory) == bool(self.upload):
            raise ValueError("give either directory or upload")
        if self.upload and not self.name:
            raise ValueError("an upload's deploy names its app (name)")
        return self


class Check(Args):
    """``app.check``: resolve the manifest in ``directory``, every section validated by its
    owner among the running drivers; nothing is claimed nor started."""

    directory: str
    set: list[str] = Field(default_factory=list)
    offset: int = 0
    env: list[str] = Field(default_factory=list)


class Scale(Args):
    """``app.scale``: set the instance count of some of a deployed app's processes."""

    name: AppNameField
    counts: dict[str, Annotated[int, Field(ge=0, le=1000)]] = Field(
        min_length=1, description="process name -> instances (e.g. {\"web\": 3})")
    wait_s: float | None = Field(
        default=None, gt=0, description="as for app.deploy: the time each new instance has")


class Restart(Args):
    """``app.restart``: replace an app's instances (or one process's) with fresh ones."""

    name: AppNameField
    process: str | None = Field(default=None, description="only this process's instances")
    wait_s: float | None = Field(
        default=None, gt=0, description="as for app.deploy: the time each new instance has")


class Rollback(Args):
    """``app.rollback``: roll the app onto an earlier release (no rebuild)."""

    name: AppNameField
    release: int | None = Field(default=None, ge=1, description="default: the last release "
                                "deployed before the live one")
    wait_s: float | None = Field(default=None, gt=0, description="as for app.deploy")


_CONFIG_KEY = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ConfigSet(Args):
    """``app.config.set``: set config vars (secrets with ``secret``); a release, rolled."""

    name: AppNameField
    vars: dict[Annotated[str, Field(pattern=_CONFIG_KEY, max_length=256)], str] = Field(
        min_length=1, max_length=256)
    secret: bool = False
    wait_s: float | None = Field(default=None, gt=0, description="as for app.deploy")


class ConfigUnset(Args):
    """``app.config.unset``: remove config vars; a release, rolled."""

    name: AppNameField
    keys: list[Annotated[str, Field(pattern=_CONFIG_KEY, max_length=256)]] = Field(
        min_length=1, max_length=256)
    wait_s: float | None = Field(default=None, gt=0, description="as for app.deploy")


class RunCommand(Args):
    """``app.run``: a one-off command in the app's live release, sandbox and config."""

    name: AppNameField
    command: list[Annotated[str, Field(max_length=65536)]] = Field(min_length=1,
                                                                   max_length=4096)
    stdio: list[str] = Field(min_length=3, max_length=3, description="paths for fd 0, 1, 2: "
                             "the caller's FIFOs or its pseudo-terminal, owned by the caller")
    tty: bool = Field(default=False, description="stdin is a terminal: make it the "
                      "command's controlling terminal")
    term: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")
    env: dict[Annotated[str, Field(pattern=_CONFIG_KEY)], str] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0)


KeyNameField = Annotated[str, Field(
    pattern=r"^[a-z][a-z0-9_-]{0,31}$",
    description="an SSH key's name: lowercase letters, digits, '_' and '-', 32 at most")]


class KeyAdd(Args):
    """``keys.add``: allow an SSH public key in, scoped to ``apps`` or ``admin``."""

    name: KeyNameField
    key: str = Field(max_length=16384, description="one OpenSSH public key line")
    apps: list[AppNameField] = Field(default_factory=list, max_length=256)
    admin: bool = False

    @model_validator(mode="after")
    def _some_scope(self) -> KeyAdd:
        if self.admin == bool(self.apps):
            raise ValueError("a key is either --admin or scoped to apps (--app), not both "
                             "or neither")
        return self


class KeyName(Args):
    """An operation on one SSH key by name."""

    name: KeyNameField


class DeployBranch(Args):
    """``app.branch``: the branch whose pushes deploy the app (``branch`` sets it)."""

    name: AppNameField
    branch: str | None = Field(default=None, max_length=200,
                               pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class DriverName(Args):
    """An operation on one configured driver by name."""

    name: str


class AppAdopt(Args):
    """``app.adopt``: start here an app of a lost host, from the copies of its releases."""

    name: AppNameField
    from_host: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                           description="the lost host that ran it")
    handover: bool = Field(default=False, description="from_host is alive and hands the app "
                           "over (a drain): its handover record names this host")
    wait_s: float | None = Field(default=None, gt=0, description="as for app.deploy")


class HostName(Args):
    """``hosts.forget``: one host of the ledger by name."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class AppName(Args):
    """An operation on one app by name."""

    name: AppNameField


class Down(Args):
    """``app.down``: stop an app and release what it holds (``purge``: and forget its
    releases, config vars, secrets and build cache)."""

    name: AppNameField
    purge: bool = False


class ClaimItem(Args):
    """One resource in a claim."""

    kind: str = Field(min_length=1, max_length=64)
    key: str = Field(min_length=1, max_length=512)
    value: dict[str, Any] = Field(default_factory=dict)


class LedgerClaim(Args):
    """``ledger.claim``: all or nothing, for ``owner``."""

    owner: str = Field(min_length=1, max_length=128)
    claims: list[ClaimItem] = Field(min_length=1, max_length=1024)


class LedgerRelease(Args):
    """``ledger.release``: the listed keys (``[kind, key]``), or all of ``owner``'s."""

    owner: str = Field(min_length=1, max_length=128)
    keys: list[tuple[str, str]] | None = None


class LedgerList(Args):
    """``ledger.list``: records filtered by owner and/or kind."""

    owner: str | None = None
    kind: str | None = None


class DriverQuery(Args):
    """``driver.query``: forward ``query.<capability>.<name>`` to the driver serving it:
    on ``host`` when given (hosts sharing a ledger: each host's driver answers for what runs
    there, e.g. the logs of a spread app's share); else on this host when the app named in
    ``args`` runs here (or a share of it does), else on the app's home host."""

    capability: str
    query: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    args: dict[str, Any] = Field(default_factory=dict)
    host: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ListenFd(Args):
    """A listening socket the calling driver holds: descriptor ``fd`` of its process ``pid``.

    Only the lb driver may pass one, and only with its own pid (the kernel checks both and
    takes a copy with ``pidfd_getfd``); the instance gets it as fd 3 (systemd socket activation).
    """

    pid: int = Field(gt=0, description="the calling driver's own pid")
    fd: int = Field(ge=0, description="the descriptor number in that process")
    name: str = Field(default="unknown", pattern=r"^[A-Za-z0-9_.-]{1,255}$",
                      description="LISTEN_FDNAMES of the socket")


SocketKeyField = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9_.:@/\[\]-]{1,128}$",
    description="the driver's own name for a kept socket, e.g. \"http:0.0.0.0:80\"")]


class SocketKeep(Args):
    """``socket.keep``: keep a copy of the calling driver's listening TCP socket under
    ``key`` (an earlier one under that key is replaced); handed to the driver's next process.

    Only a driver declaring the ``listen_sockets`` feature, and only with its own pid (the
    kernel checks both and takes its copy with ``pidfd_getfd``, as for ``listen_fd``)."""

    pid: int = Field(gt=0, description="the calling driver's own pid")
    fd: int = Field(ge=0, description="the socket's descriptor number in that process")
    key: SocketKeyField


class SocketKey(Args):
    """``socket.release``: close the kernel's copy kept under ``key`` (its frontend is gone)."""

    key: SocketKeyField


class Spawn(Args):
    """``instance.spawn``: start a process of ``app`` in its sandbox (cron runs, on-demand)."""

    app: str
    process: str
    kind: str = Field(default="instance", pattern=r"^(instance|job)$")
    command: str | None = Field(default=None, description="jobs: the command to run")
    env: dict[str, str] = Field(default_factory=dict)
    label: str | None = Field(default=None, description="jobs: run label used in the id")
    listen_fd: ListenFd | None = Field(
        default=None, description="instances: hand this listening socket to the instance as "
        "fd 3 with LISTEN_FDS=1/LISTEN_PID (socket activation; lb driver only)")


class InstanceSignal(Args):
    """``instance.signal``: send ``signal`` to an instance (its process group if ``group``)."""

    instance_id: str
    signal: int = Field(ge=1, le=64)
    group: bool = True


class InstanceId(Args):
    """An operation on one instance by id."""

    instance_id: str


class InstanceWait(Args):
    """``instance.wait``: wait up to ``timeout_s`` for a spawned job to end; its exit status."""

    instance_id: str
    timeout_s: float = Field(default=30.0, gt=0, le=86400)


class Publish(Args):
    """``event.publish``: the kernel republishes on PUB under ``topic``."""

    topic: str = Field(min_length=1, max_length=256)
    data: dict[str, Any] = Field(default_factory=dict)


# ---- driver operations (served by drivers, called by the kernel) ----------------------------


class AppAttach(Args):
    """``app.attach``: an app was claimed; set up app-wide state (routes, schedules, sinks)."""

    app: AppSpec


class AppDetach(Args):
    """``app.detach``: the app is going away: undo everything the driver did for it."""

    app: str


class InstancePrepare(Args):
    """``instance.prepare``: contribute a PlanFragment to the instance's launch."""

    app: AppSpec
    instance: InstanceSpec


class InstanceStarted(Args):
    """``instance.started``: the instance runs (pid, start time, address known).

    With ``join_within_s`` (a rollout) the instance replaces others only once every driver
    serving this operation has answered: a driver that gates traffic on health (an lb)
    answers when the instance turned healthy or when that time is up, with
    ``{"healthy": false, "health": "<last check result>"}`` in the second case. The kernel
    then stops the instance and fails the deploy. Without it (a restart after a crash, an
    adoption) the answer is not waited on for a decision.
    """

    app: AppSpec
    instance: InstanceRecord
    join_within_s: float | None = Field(
        default=None, gt=0, description="rollout: answer within this time, healthy or not")


class InstanceStopped(Args):
    """``instance.stopped``: the instance is gone: release per-instance state."""

    app: str
    instance_id: str


class SectionProblem(Args):
    """One problem in a manifest section, located by field path (``["lb", "health", "http"]``);
    the kernel turns the path into ``file:line`` and the field as written."""

    path: list[str | int] = Field(description="field path from the manifest's top, e.g. "
                                  '["cron", "nightly", "schedule"]')
    message: str = Field(min_length=1, description='"expected ..., got ..." as a sentence')


class SectionPort(Args):
    """A port a section holds (``lb.frontend``): checked against every other port of the
    manifest, after ``--offset`` moved it."""

    path: list[str | int]
    port: int = Field(ge=1, le=65535)


class ManifestCheck(Args):
    """``manifest.check``: validate the manifest sections this driver owns (its HELLO
    ``sections``), without acting on them. The kernel-owned sections it may cross-check
    against come resolved: ``processes`` and ``ports`` (``--offset`` already added)."""

    app: str = Field(description="[app] name")
    directory: str = Field(description="the app directory (relative paths are relative to it)")
    sections: dict[str, Any] = Field(description="section name -> its data as written (TOML "
                                     "as JSON, --set overrides applied)")
    processes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ports: dict[str, int] = Field(default_factory=dict)
    offset: int = Field(default=0, description="--offset: the owner adds it to the ports its "
                        "sections hold")


class ManifestChecked(Args):
    """The answer to ``manifest.check``: the sections normalized (defaults filled, sizes in
    bytes, durations in seconds) or the problems found; plus what the kernel does for the
    sections without knowing their shape: the resources claimed in the deploy's ledger
    transaction, the processes started on demand (no instance until the driver asks), and
    the ports they hold."""

    sections: dict[str, Any] = Field(default_factory=dict)
    claims: list[ClaimItem] = Field(default_factory=list)
    on_demand: list[str] = Field(default_factory=list, description="process names")
    ports: list[SectionPort] = Field(default_factory=list)
    problems: list[SectionProblem] = Field(default_factory=list)


class StateSync(Args):
    """``state.sync``: after every (re)connect: re-apply for these, collect leftovers of others."""

    apps: list[AppSpec]
    instances: list[InstanceRecord]
    launching: list[str] = Field(
        default_factory=list, description="ids of instances being launched: treat as live")


@dataclass(frozen=True)
class Operation:
    """One entry of an operation table."""

    name: str
    args: type[Args]
    doc: str


def _table(*ops: Operation) -> dict[str, Operation]:
    return {o.name: o for o in ops}


_CLIENT_OPS = _table(
    Operation("app.deploy", Deploy, "claim, launch and wait for an app"),
    Operation("app.check", Check, "the resolved manifest ({manifest}) or its problems "
              "({problems}), every section checked by its owner"),
    Operation("app.down", Down, "stop an app and release all it holds"),
    Operation("app.scale", Scale, "set instance counts; rolls like a redeploy"),
    Operation("app.ps", NoArgs, "apps and instances with their state"),
    Operation("app.get", AppName, "one app's spec and instances"),
    Operation("ledger.list", LedgerList, "ledger records"),
    Operation("ledger.claim", LedgerClaim, "claim resources, all or nothing"),
    Operation("ledger.release", LedgerRelease, "release resources"),
    Operation("app.restart", Restart, "replace the instances with fresh ones, rolled"),
    Operation("app.releases", AppName, "the app's releases and the live one"),
    Operation("app.rollback", Rollback, "roll the app onto an earlier release"),
    Operation("app.config", AppName, "the app's config vars (secrets masked)"),
    Operation("app.config.set", ConfigSet, "set config vars; a release, rolled"),
    Operation("app.config.unset", ConfigUnset, "remove config vars; a release, rolled"),
    Operation("app.run", RunCommand, "a one-off command in the app's release; its exit"),
    Operation("app.branch", DeployBranch, "the app's deploy branch for git push; sets it"),
    Operation("keys.add", KeyAdd, "allow an SSH key in (the git push and remote CLI user)"),
    Operation("keys.list", NoArgs, "the SSH keys allowed in and their scope"),
    Operation("keys.remove", KeyName, "remove an SSH key"),
    Operation("keys.whoami", NoArgs, "the calling key and its scope (remote peers)"),
    Operation("hosts.list", NoArgs, "the ledger's hosts: state, address, apps, instances, "
              "free capacity"),
    Operation("hosts.forget", HostName, "release everything a lost host holds in the "
              "ledger (its apps' names, ports, records); refused while it is alive"),
    Operation("hosts.drain", HostName, "move every app of a host to the other hosts (each "
              "started there before it stops here); asked of any host"),
    Operation("app.adopt", AppAdopt, "start an app of a lost host here, from the copies of "
              "its releases (what the cluster's leader asks of a live host)"),
    Operation("drivers.list", NoArgs, "drivers and their state"),
    Operation("driver.restart", DriverName, "start a driver again (also a failed one)"),
    Operation("driver.query", DriverQuery, "forward a query to a driver"),
    Operation("kernel.status", NoArgs, "pid, uptime, version"),
)

_DRIVER_OPS = _table(
    Operation("ledger.claim", LedgerClaim, "claim resources, all or nothing"),
    Operation("ledger.release", LedgerRelease, "release resources"),
    Operation("ledger.list", LedgerList, "ledger records"),
    Operation("app.get", AppName, "one app's spec and instances"),
    Operation("instance.spawn", Spawn, "start a process of an app in its sandbox"),
    Operation("instance.signal", InstanceSignal, "signal an instance"),
    Operation("instance.stop", InstanceId, "stop an instance and release it"),
    Operation("instance.wait", InstanceWait, "wait for a spawned job; its exit status"),
    Operation("event.publish", Publish, "publish an event on the bus"),
    Operation("driver.query", DriverQuery, "forward a query to a driver (e.g. log polls lb)"),
    Operation("kernel.status", NoArgs, "pid, uptime, version, ledger revision, bus figures"),
    Operation("socket.keep", SocketKeep, "keep a copy of one of the driver's listening TCP "
              "sockets for its next process (listen_sockets drivers)"),
    Operation("socket.list", NoArgs, "the sockets kept for the calling driver: key, host, "
              "port, the kernel's fd and the socket's inode"),
    Operation("socket.release", SocketKey, "close the kernel's copy kept under a key"),
)

_REMOTE_OPS = _table(*(_CLIENT_OPS[name] for name in (
    "app.deploy", "app.down", "app.scale", "app.ps", "app.get", "app.restart", "app.releases",
    "app.rollback", "app.config", "app.config.set", "app.config.unset", "app.run",
    "app.branch", "keys.add", "keys.list", "keys.remove", "keys.whoami", "ledger.list",
    "drivers.list", "driver.restart", "driver.query", "kernel.status", "hosts.list",
    "hosts.forget", "hosts.drain")))
"""What a remote peer (an SSH key, through the gateway) may ask at all; each request is then
checked against the key's scope (``corral.remote.Access``)."""

KERNEL_OPS: dict[str, dict[str, Operation]] = {
    "client": _CLIENT_OPS, "driver": _DRIVER_OPS, "remote": _REMOTE_OPS}
"""Operations the kernel serves, per peer role. Anything else is FORBIDDEN or UNKNOWN."""

LIFECYCLE_OPS: dict[str, Operation] = _table(
    Operation("app.attach", AppAttach, "set up app-wide state"),
    Operation("app.detach", AppDetach, "undo app-wide state"),
    Operation("instance.prepare", InstancePrepare, "contribute to the launch plan"),
    Operation("instance.started", InstanceStarted, "an instance runs"),
    Operation("instance.stopping", InstanceStopped, "an instance is about to be stopped: "
              "drain it (answer when drained)"),
    Operation("instance.stopped", InstanceStopped, "an instance is gone"),
    Operation("state.sync", StateSync, "re-apply desired state after (re)connect"),
    Operation("manifest.check", ManifestCheck, "validate the manifest sections the driver "
              "owns (HELLO sections); answer ManifestChecked"),
)
"""Operations the kernel may call on a driver. A driver declares the ones it serves."""

QUERY_OP = re.compile(r"^query\.([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)$")
"""Capability-specific queries: ``query.<capability>.<name>``, args a free JSON object."""


@dataclass(frozen=True)
class Capability:
    """What a driver of one capability must and may serve, and what the kernel may rely on.

    ``launch``: the driver enforces or captures something on every process (its network, its
    sandbox, its output). While a driver of such a capability is enabled, no instance, job or
    one-off starts unless that driver is connected and contributed to its launch plan
    (``instance.prepare`` is therefore required): a driver that is down makes launches wait,
    then fail, never run without it.
    ``confinement``: the capability is the app's sandbox. A host with no such driver enabled
    runs apps unconfined, which the host config must say explicitly (``unconfined = true``).
    """

    name: str
    required: frozenset[str]
    doc: str
    optional: frozenset[str] = field(default_factory=lambda: frozenset(LIFECYCLE_OPS))
    launch: bool = False
    confinement: bool = False


KERNEL_SECTIONS: tuple[str, ...] = ("app", "processes", "ports", "paths", "build", "release",
                                    "placement")
"""The manifest sections the kernel owns; every other one belongs to the driver declaring it."""

FEATURES: dict[str, str] = {
    "instance_addresses": "gives every instance an address of its own, so a replacement "
    "starts beside the instance it replaces (rolling deploys); WELCOME config carries the "
    "host's address pools as pool4/pool6",
    "app_users": "runs instances under the host's dynamic app uids; WELCOME config carries "
    "them as uid_range",
    "listen_sockets": "may hand one of its own listening sockets to instance.spawn "
    "(listen_fd: socket activation) and have the kernel keep its listening TCP sockets "
    "across its restarts (socket.keep/list/release; its next process inherits them, named "
    "in CORRAL_KEPT_FDS); no other driver may",
    "output": "captures instance output and serves query.<capability>.read "
    "({app, instance, limit, json} -> {lines})",
}
"""Optional behaviours a driver declares in HELLO ``features`` (Nomad's Capabilities): the
kernel relies on the declaration, never on which driver or capability it talks to."""

KEPT_FDS_ENV = "CORRAL_KEPT_FDS"
"""The variable naming the sockets a driver's process inherits from the kernel (kept by
``socket.keep`` for its previous process): a JSON object, key -> descriptor number."""


_PREPARES = frozenset({"state.sync", "instance.prepare"})

CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability("net", _PREPARES, "network namespaces, addresses, nftables", launch=True),
        Capability("fs", _PREPARES, "mount view, users, cgroups, system-call filter",
                   launch=True, confinement=True),
        Capability("log", _PREPARES, "output capture, sinks, tracebacks", launch=True),
        Capability("lb", frozenset({"state.sync"}), "names, frontends, balancing"),
        Capability("cron", frozenset({"state.sync"}), "scheduled jobs"),
    )
}


def check_driver_ops(capability: str | None, ops: list[str],
                     features: list[str] | None = None,
                     sections: list[str] | None = None) -> str | None:
    """Why a driver's HELLO is unacceptable, or None. Checked once, at HELLO time."""
    if sections and "manifest.check" not in ops:
        return f"a driver owning sections {sorted(sections)} must serve manifest.check"
    reserved = sorted(set(sections or ()) & set(KERNEL_SECTIONS))
    if reserved:
        return f"sections {reserved} belong to the kernel"
    unknown = sorted(set(features or ()) - set(FEATURES))
    if unknown:
        return f"unknown features {unknown}; known: {', '.join(sorted(FEATURES))}"
    if capability is not None and "output" in (features or ()) and (
            f"query.{capability}.read" not in ops):
        return f"feature 'output' needs the operation query.{capability}.read"
    if capability is None:
        return "a driver must name its capability"
    cap = CAPABILITIES.get(capability)
    if cap is None:
        return f"unknown capability {capability!r}; known: {', '.join(sorted(CAPABILITIES))}"
    missing = sorted(cap.required - set(ops))
    if missing:
        return f"capability {capability!r} requires operations {missing}"
    for name in ops:
        if name in cap.optional:
            continue
        m = QUERY_OP.match(name)
        if m is None:
            return f"unknown operation {name!r} (not a lifecycle operation nor query.<cap>.<name>)"
        if m.group(1) != capability:
            return f"query {name!r} belongs to capability {m.group(1)!r}, not {capability!r}"
    return None
