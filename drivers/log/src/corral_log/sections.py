"""The manifest's ``[logs]`` section: its schema (sinks), owned by the log driver. Cheap to
import: ``corral check`` loads it without starting the driver."""

from __future__ import annotations

import os
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field

from corral.protocol import ManifestCheck
from corral.sdk.sections import (
    Name,
    NonNegative,
    Positive,
    PositiveDuration,
    PositiveSize,
    Report,
    Section,
    SectionModel,
    Text,
    fail,
    json_schema,
)

_Section = SectionModel

_SYSLOG_SCHEMES = ("udp", "tcp", "unix")


def _syslog_address(value: object) -> str:
    expected = 'a syslog address "udp://host:port", "tcp://host:port" or "unix:///path"'
    if not isinstance(value, str):
        fail(expected, value)
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        fail(expected, value, "the port must be 1..65535")
    if parts.scheme not in _SYSLOG_SCHEMES or parts.query or parts.fragment:
        fail(expected, value)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            fail(expected, value, "unix:// takes an absolute path")
    elif not parts.hostname or parts.path not in {"", "/"} or port == 0:
        fail(expected, value)
    return value


def _http_url(value: object) -> str:
    expected = 'an http:// or https:// URL, e.g. "http://loki:3100/loki/api/v1/push"'
    if not isinstance(value, str) or any(c.isspace() for c in value):
        fail(expected, value)
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        fail(expected, value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        fail(expected, value)
    return value


SyslogAddress = Annotated[str, BeforeValidator(_syslog_address), json_schema(type="string")]
HttpUrl = Annotated[str, BeforeValidator(_http_url), json_schema(type="string", format="uri")]


class _SinkCommon(_Section):
    """Keys every sink takes."""

    name: Name | None = Field(default=None, description="unique per app; default '<type>-<n>'")
    spool: PositiveSize = Field(
        default=64 * 1024 * 1024, description="disk spool bound while the sink is down"
    )


class FileSink(_SinkCommon):
    """A log file on the host, rotated by size and/or age."""

    type: Literal["file"]
    path: Text
    rotate: PositiveSize | None = Field(
        default=None, description="rotate when this size is reached"
    )
    keep: NonNegative = Field(default=5, description="rotated files kept")
    compress: bool = False
    rotate_every: PositiveDuration | None = None
    format: Literal["text", "json"] = Field(default="text", description="one line per record")


SyslogFacility = Literal[
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
]  # fmt: skip


class SyslogSink(_SinkCommon):
    """A syslog receiver over UDP, TCP or a unix socket."""

    type: Literal["syslog"]
    address: SyslogAddress
    facility: SyslogFacility = "user"
    format: Literal["rfc5424", "rfc3164"] = "rfc5424"
    hostname: Text | None = Field(default=None, description="HOSTNAME field; default the host's")


class JournaldSink(_SinkCommon):
    """The local systemd journal."""

    type: Literal["journald"]
    socket: Text = Field(default="/run/systemd/journal/socket", description="native protocol")


class HttpBatch(_Section):
    """How an HTTP sink groups lines: a push when any bound is reached."""

    lines: Positive = 1000
    bytes: PositiveSize = 1024 * 1024
    interval: PositiveDuration = 1.0


class HttpSink(_SinkCommon):
    """An HTTP log receiver (Grafana Loki's push API)."""

    type: Literal["http"]
    url: HttpUrl
    format: Literal["loki"] = "loki"
    headers: dict[str, str] = Field(default_factory=dict)
    batch: HttpBatch = Field(default_factory=HttpBatch)
    labels: dict[str, str] = Field(default_factory=dict, description="extra Loki stream labels")
    linger: PositiveDuration = Field(default=0.2, description="wait this long to fill a batch")


Sink = Annotated[FileSink | SyslogSink | JournaldSink | HttpSink, Field(discriminator="type")]


class Logs(_Section):
    """``[logs]``: where the app's output goes besides `corral logs`."""

    sinks: list[Sink] = Field(default_factory=list)


def check(logs: Logs, context: ManifestCheck, report: Report) -> Logs:
    """File sinks' paths are relative to the app directory: make them absolute."""
    for sink in logs.sinks:
        if isinstance(sink, FileSink):
            sink.path = os.path.normpath(os.path.join(context.directory, sink.path))
    return logs


LOGS = Section("logs", Logs, check, doc="where the app's output goes besides `corral logs`")
