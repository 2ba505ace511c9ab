"""Sinks: small callables that deliver chunks of records, and the specs that build them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from corral.units import parse_duration, parse_size
from corral_log.sinks._base import Sink, SinkRejected, SinkUnavailable
from corral_log.sinks._file import FileSink, RotatingFile
from corral_log.sinks._journald import JOURNAL_SOCKET, JournaldSink, journald_present
from corral_log.sinks._loki import LokiSink, loki_payload
from corral_log.sinks._syslog import SyslogSink, format_5424

__all__ = [
    "JOURNAL_SOCKET",
    "FileSink",
    "FileSinkSpec",
    "HttpSinkSpec",
    "JournaldSink",
    "JournaldSinkSpec",
    "LokiSink",
    "RotatingFile",
    "Sink",
    "SinkRejected",
    "SinkSpec",
    "SinkUnavailable",
    "SyslogSink",
    "SyslogSinkSpec",
    "build_sink",
    "format_5424",
    "journald_present",
    "loki_payload",
    "parse_sinks",
]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="unique per app; default '<type>-<n>'")
    spool: str | int = Field(default="64MiB", description="disk spool bound while it is down")


class FileSinkSpec(_Spec):
    """``{type="file", path, rotate="100MiB", rotate_every="1d", keep=5, compress=true}``."""

    type: Literal["file"]
    path: str
    rotate: str | int | None = "100MiB"
    rotate_every: str | int | float | None = None
    keep: int = Field(default=5, ge=0)
    compress: bool = True
    format: Literal["text", "json"] = "text"


class SyslogSinkSpec(_Spec):
    """``{type="syslog", address="udp://127.0.0.1:514" | "tcp://h:p" | "unix:///dev/log"}``."""

    type: Literal["syslog"]
    address: str = "unix:///dev/log"
    facility: str = "user"
    format: Literal["rfc5424", "rfc3164"] = "rfc5424"
    hostname: str | None = None


class JournaldSinkSpec(_Spec):
    """``{type="journald"}``; skipped with a notice when the host has no journal socket."""

    type: Literal["journald"]
    socket: str = JOURNAL_SOCKET


class HttpSinkSpec(_Spec):
    """``{type="http", url="http://loki:3100/loki/api/v1/push", labels={}, batch="1MiB"}``."""

    type: Literal["http"]
    url: str
    format: Literal["loki"] = "loki"
    labels: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    batch: str | int | dict[str, Any] = "1MiB"
    linger: str | float = "200ms"

    def batch_bytes(self) -> int:
        """Bytes per push (``batch`` as a size, or the manifest's ``{lines, bytes, interval}``)."""
        if isinstance(self.batch, dict):
            return parse_size(self.batch.get("bytes", 1 << 20))
        return parse_size(self.batch)

    def linger_s(self) -> float:
        """How long a trickle may wait to fill a push."""
        if isinstance(self.batch, dict) and "interval" in self.batch:
            return min(parse_duration(self.batch["interval"]), 5.0)
        return parse_duration(self.linger)


SinkSpec = Annotated[
    FileSinkSpec | SyslogSinkSpec | JournaldSinkSpec | HttpSinkSpec, Field(discriminator="type")
]
_SPECS: TypeAdapter[list[SinkSpec]] = TypeAdapter(list[SinkSpec])


def parse_sinks(raw: Any) -> list[SinkSpec]:
    """Validate ``manifest['logs']['sinks']`` and give every sink a unique name."""
    specs = _SPECS.validate_python(raw or [])
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name is None:
            spec.name = f"{spec.type}-{i + 1}"
        if spec.name in seen:
            raise ValueError(f"logs.sinks[{i}]: duplicate sink name {spec.name!r}")
        seen.add(spec.name)
        parse_size(spec.spool)
        if isinstance(spec, FileSinkSpec):
            if spec.rotate is not None:
                parse_size(spec.rotate)
            if spec.rotate_every is not None:
                parse_duration(spec.rotate_every)
    return specs


def build_sink(spec: SinkSpec, *, app_dir: Path | None = None) -> Sink:
    """The sink a validated spec describes (file paths are relative to the app directory)."""
    name = spec.name or spec.type
    if isinstance(spec, FileSinkSpec):
        path = Path(spec.path)
        if not path.is_absolute() and app_dir is not None:
            path = app_dir / path
        rf = RotatingFile(
            path,
            max_bytes=None if spec.rotate is None else parse_size(spec.rotate),
            max_age_s=None if spec.rotate_every is None else parse_duration(spec.rotate_every),
            keep=spec.keep,
            compress=spec.compress,
        )
        return FileSink(name, rf, format=spec.format)
    if isinstance(spec, SyslogSinkSpec):
        return SyslogSink(
            name, spec.address, facility=spec.facility, hostname=spec.hostname, format=spec.format
        )
    if isinstance(spec, JournaldSinkSpec):
        return JournaldSink(name, socket_path=spec.socket)
    return LokiSink(name, spec.url, labels=spec.labels, headers=spec.headers)
