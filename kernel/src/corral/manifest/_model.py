"""The kernel's part of ``corral.toml``: [app], [processes], [ports], [paths], [build], [release],
[placement].

Every other section belongs to the driver that acts on it (its schema lives in that driver's
distribution, see ``corral.sdk.sections``); the kernel passes such sections through as data.
The value types (names, ports, durations) are the shared ones of ``corral.sdk.sections``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from corral.sdk.sections import (
    Name,
    Port,
    PositiveDuration,
    SectionModel,
    Text,
    count,
    fail,
    json_schema,
    render,
)

__all__ = [
    "AppSection",
    "BuildSection",
    "Manifest",
    "PathGrant",
    "PlacementSection",
    "Process",
    "ReleaseSection",
    "render",
]

_LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")


def _app_name(value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        fail(
            "an app name like a DNS label: 1-63 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-'",
            value,
        )
    return value


AppName = Annotated[
    str, BeforeValidator(_app_name), json_schema(type="string", pattern=_LABEL.pattern)
]
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _host_label(value: object) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        fail("a host name or label like a DNS label: 1-63 lowercase letters, digits and '-', "
             "not starting or ending with '-'", value)
    return value


HostLabel = Annotated[
    str, BeforeValidator(_host_label), json_schema(type="string", pattern=_HOST.pattern)
]
# 0 is allowed: a process that is declared but not running (Heroku's formation of 0)
Instances = Annotated[int, BeforeValidator(count(0)), json_schema(type="integer", minimum=0)]

_Section = SectionModel


class AppSection(_Section):
    """``[app]``: who the app is."""

    name: AppName = Field(description="unique on the host; claimed in the ledger")


class Process(_Section):
    """One ``[processes]`` entry (or a Procfile line): a command run as N instances."""

    command: Text = Field(description="run through /bin/sh -c, with $PORT etc. in its environment")
    instances: Instances = 1
    port: Name | None = Field(default=None, description="name of a [ports] entry ($PORT)")
    ready: Literal["auto", "port", "notify", "started"] = Field(
        default="auto",
        description="when an instance counts as ready: its port answers ('port'), it sends "
        "READY=1 on NOTIFY_SOCKET ('notify'), it is still running after 0.3 s ('started'); "
        "'auto' is 'port' for a process with a port, else 'started'",
    )
    start_timeout: PositiveDuration | None = Field(
        default=None,
        description="how long a new instance may take to be ready and, behind an lb, healthy, "
        "before a rollout gives up on it (and keeps the running release); default: the host's "
        "start_timeout_s (60 s)",
    )
    stop_grace: PositiveDuration | None = Field(
        default=None,
        description="how long an instance has between SIGTERM and SIGKILL when it is stopped; "
        "default: the host's stop_grace_s (30 s, as Heroku gives a dyno)",
    )


class PathGrant(_Section):
    """One ``[paths]`` entry: a host path the app may see, read-only or read-write."""

    path: Text = Field(description="absolute, or relative to the app directory")
    mode: Literal["ro", "rw"] = "ro"
    create: bool = Field(default=False, description="create the directory if it is missing")


class BuildSection(_Section):
    """``[build]``: how a release's dependencies are installed, once per release."""

    command: Text | None = Field(
        default=None,
        description="run through /bin/sh -c in the new release's directory instead of what the "
        "files present call for (uv.lock or pyproject.toml: uv sync; requirements.txt: a venv; "
        "package.json: npm ci)",
    )
    timeout: PositiveDuration | None = Field(
        default=None,
        description="how long the build may take; a build that takes longer is stopped and "
        "makes no release; default: the host's [build] timeout_s (15 minutes)",
    )


class ReleaseSection(_Section):
    """``[release]``: the command run once per release, before new instances take traffic."""

    command: Text | None = Field(
        default=None,
        description="run through /bin/sh -c once per release, after the build, with the new "
        "release's config, before any new instance takes traffic (database migrations); a "
        "non-zero exit aborts the deploy. Or the Procfile's `release:` line, not both",
    )
    timeout: PositiveDuration = Field(
        default=10 * 60.0,
        description="how long the release command may take; longer aborts the deploy "
        "(default 10 minutes)",
    )


class PlacementSection(_Section):
    """``[placement]``: which hosts of a cluster may run the app (docs/etcd.md). Empty: any.
    Checked where the app is deployed, and where a lost host's apps are re-placed; with
    ``spread``, on how many hosts at once (``corral.deploy._spread``)."""

    hosts: list[HostLabel] = Field(
        default_factory=list, description="only these hosts (by [host] name); empty: any")
    labels: list[HostLabel] = Field(
        default_factory=list, description="only hosts with every one of these [host] labels")
    avoid: list[HostLabel] = Field(
        default_factory=list, description="never hosts with any of these [host] labels")
    spread: int | None = Field(
        default=None, ge=1, le=64, description="on how many hosts (of those allowed) the "
        "app runs at once: its instances dealt round-robin over them, the lb of every host "
        "balancing over all; unset: every allowed host (with a cluster key); 1: one host")

    def allows(self, host: str, labels: list[str] | set[str]) -> bool:
        """Whether host ``host`` with ``labels`` may run the app."""
        have = set(labels)
        return ((not self.hosts or host in self.hosts) and have.issuperset(self.labels)
                and not have.intersection(self.avoid))

    def describe(self) -> str:
        """The constraints in words ("hosts h1, h2; labels ssd; avoiding gpu")."""
        parts = [f"hosts {', '.join(self.hosts)}" if self.hosts else "",
                 f"spread over {self.spread}" if self.spread else "",
                 f"labels {', '.join(self.labels)}" if self.labels else "",
                 f"avoiding {', '.join(self.avoid)}" if self.avoid else ""]
        return "; ".join(p for p in parts if p) or "any host"


class Manifest(_Section):
    """The kernel's sections of a ``corral.toml`` (plus Procfile), after overrides."""

    app: AppSection
    processes: dict[Name, Process] = Field(default_factory=dict)
    ports: dict[Name, Port] = Field(default_factory=dict)
    paths: dict[Name, PathGrant] = Field(default_factory=dict)
    build: BuildSection = Field(default_factory=BuildSection)
    release: ReleaseSection = Field(default_factory=ReleaseSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
