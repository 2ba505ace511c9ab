"""The shape of ``corral.toml``: pydantic models, strict, with ``extra="forbid"`` everywhere.

Atomic values (names, ports, sizes, durations, addresses) are annotated types whose validator
raises a ``corral`` error carrying the full "expected ..., got ..." sentence; the loader adds
file, line and field. Cross-field rules (a process naming an unknown port, two equal ports)
live in the loader, which knows where each value was written.
"""

from __future__ import annotations

import ipaddress
import math
import re
import zoneinfo
from functools import cache
from typing import Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from corral.units import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnitError,
    parse_duration,
    parse_size,
)

# --- rendering and failing ---------------------------------------------------------------------


def render(value: object) -> str:
    """Show a TOML value the way it was written, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return '"' + shown.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"  # TOML dates and times


def fail(expected: str, value: object, hint: str | None = None) -> NoReturn:
    """Raise the validation error "expected <expected>, got <value> (<hint>)"."""
    message = f"expected {expected}, got {render(value)}" + (f" ({hint})" if hint else "")
    raise PydanticCustomError("corral", "{message}", {"message": message})


def _schema(**schema: Any) -> WithJsonSchema:
    return WithJsonSchema(schema)


# --- names -------------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_POLICY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
NAME_EXPECTED = "a name of lowercase letters, digits, '-' and '_', starting with a letter"


def _app_name(value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        fail(
            "an app name like a DNS label: 1-63 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-'",
            value,
        )
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        fail(NAME_EXPECTED, value)
    return value


def is_hostname(value: str) -> bool:
    """Whether ``value`` is a DNS name (labels of letters, digits and '-', dot-separated)."""
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not is_hostname(value):
        fail('a DNS name such as "shop.example.test"', value)
    return value


def _non_empty(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        fail("a non-empty string", value)
    return value


AppName = Annotated[str, BeforeValidator(_app_name), _schema(type="string", pattern=_LABEL.pattern)]
Name = Annotated[str, BeforeValidator(_name), _schema(type="string", pattern=_NAME.pattern)]
Hostname = Annotated[str, BeforeValidator(_hostname), _schema(type="string", format="hostname")]
Text = Annotated[str, BeforeValidator(_non_empty), _schema(type="string", minLength=1)]

# --- numbers -----------------------------------------------------------------------------------


def _port(value: object, info: ValidationInfo) -> int:
    """A port; ``[ports]`` entries and ``lb.frontend`` have had ``--offset`` added already."""
    offset = int((info.context or {}).get("offset", 0))
    if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 65535:
        if offset:
            raise PydanticCustomError(
                "corral",
                "{message}",
                {
                    "message": f"expected a port 1..65535, got {value - offset} + --offset "
                    f"{offset} = {value}"
                },
            )
        fail("an integer 1..65535", value)
    if not isinstance(value, int) or isinstance(value, bool):
        fail("an integer 1..65535", value)
    return value


def _count(minimum: int, maximum: int | None = None) -> Any:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}..{maximum}"

    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            fail(expected, value)
        if maximum is not None and value > maximum:
            fail(expected, value)
        return value

    return check


def _positive_number(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type, operator]
        fail("a number > 0, such as 1.5", value)
    return float(value)  # type: ignore[arg-type]


def _size(positive: bool) -> Any:
    def check(value: object) -> int:
        try:
            size = parse_size(value)
        except UnitError as exc:
            fail(exc.expected, value, exc.hint)
        if positive and size == 0:
            fail(f"{SIZE_EXPECTED}, larger than 0", value)
        return size

    return check


def _duration(positive: bool) -> Any:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except UnitError as exc:
            fail(exc.expected, value, exc.hint)
        if positive and seconds == 0:
            fail(f"{DURATION_EXPECTED}, longer than 0", value)
        return seconds

    return check


_SIZE_SCHEMA = _schema(
    anyOf=[{"type": "integer", "minimum": 0}, {"type": "string", "examples": ["512MiB", "100MB"]}]
)
_DURATION_SCHEMA = _schema(
    anyOf=[{"type": "number", "minimum": 0}, {"type": "string", "examples": ["500ms", "1h30m"]}]
)

Port = Annotated[int, BeforeValidator(_port), _schema(type="integer", minimum=1, maximum=65535)]
Instances = Annotated[int, BeforeValidator(_count(1)), _schema(type="integer", minimum=1)]
Positive = Annotated[int, BeforeValidator(_count(1)), _schema(type="integer", minimum=1)]
NonNegative = Annotated[int, BeforeValidator(_count(0)), _schema(type="integer", minimum=0)]
Cpu = Annotated[
    float, BeforeValidator(_positive_number), _schema(type="number", exclusiveMinimum=0)
]
Size = Annotated[int, BeforeValidator(_size(False)), _SIZE_SCHEMA]
PositiveSize = Annotated[int, BeforeValidator(_size(True)), _SIZE_SCHEMA]
Duration = Annotated[float, BeforeValidator(_duration(False)), _DURATION_SCHEMA]
PositiveDuration = Annotated[float, BeforeValidator(_duration(True)), _DURATION_SCHEMA]

# --- addresses ---------------------------------------------------------------------------------

EGRESS_EXPECTED = (
    '"CIDR[:port]", "host:port" or "[IPv6 CIDR]:port", e.g. "10.0.0.0/8", '
    '"10.0.0.5/32:5432", "api.example.com:443", "[2001:db8::/32]:443"'
)


def _egress_port(text: str, value: object) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        fail(EGRESS_EXPECTED, value, "the port must be 1..65535")
    return int(text)


def _network(text: str, value: object) -> str | None:
    """Return the normalised network for an address or CIDR, or None if ``text`` is no IP."""
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    fail(EGRESS_EXPECTED, value, f"{text} has host bits set; did you mean {network}?")


class EgressRule(BaseModel):
    """One parsed ``network.egress`` entry: a network or a host name, and maybe a port."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rule: str = Field(description="the rule as written")
    network: str | None = Field(default=None, description="normalised CIDR, for address rules")
    host: str | None = Field(default=None, description="lower-case DNS name, for host rules")
    port: int | None = Field(default=None, description="None: every port")


def _egress(value: object) -> EgressRule:
    if isinstance(value, EgressRule):
        return value
    if isinstance(value, dict) and isinstance(value.get("rule"), str):
        value = value["rule"]  # the resolved JSON form, read back
    if not isinstance(value, str) or not value or value != value.strip():
        fail(EGRESS_EXPECTED, value)
    host: str | None = None
    network: str | None = None
    port: int | None = None
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            fail(EGRESS_EXPECTED, value)
        network = _network(inside, value)
        if network is None or ":" not in network:
            fail(EGRESS_EXPECTED, value, "brackets hold an IPv6 address or CIDR")
        if rest:
            port = _egress_port(rest[1:], value)
    elif value.count(":") > 1:  # a bare IPv6 address or CIDR, all ports
        network = _network(value, value)
        if network is None:
            fail(EGRESS_EXPECTED, value)
    else:
        address, colon, port_text = value.partition(":")
        if colon:
            port = _egress_port(port_text, value)
        network = _network(address, value)
        if network is None:
            if not is_hostname(address) or address.replace(".", "").isdigit():
                fail(EGRESS_EXPECTED, value)
            if port is None:
                fail(EGRESS_EXPECTED, value, 'a host name needs a port: "host:port"')
            host = address.rstrip(".").lower()
    return EgressRule(rule=value, network=network, host=host, port=port)


def _interface(value: object) -> str:
    if not isinstance(value, str) or not _INTERFACE.fullmatch(value) or value in {".", ".."}:
        fail("a network interface name (1-15 characters, no '/' or spaces)", value)
    return value


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


def _url_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        fail('an HTTP path starting with "/", e.g. "/healthz"', value)
    return value


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _timezone(value: object) -> str:
    expected = 'an IANA timezone name such as "UTC", "Europe/Paris" or "America/New_York"'
    if not isinstance(value, str) or value == "localtime" or value.startswith(("posix/", "right/")):
        fail(expected, value)
    if value not in _zones():
        fail(expected, value)
    return value


def _jitter(value: object) -> bool | float:
    if isinstance(value, bool):
        return value
    try:
        return parse_duration(value)
    except UnitError:
        fail(f"true, false or {DURATION_EXPECTED}", value)


Egress = Annotated[
    EgressRule,
    BeforeValidator(_egress),
    _schema(type="string", examples=["10.0.0.5/32:5432", "api.example.com:443"]),
]
Interface = Annotated[str, BeforeValidator(_interface), _schema(type="string", maxLength=15)]
SyslogAddress = Annotated[str, BeforeValidator(_syslog_address), _schema(type="string")]
HttpUrl = Annotated[str, BeforeValidator(_http_url), _schema(type="string", format="uri")]
UrlPath = Annotated[str, BeforeValidator(_url_path), _schema(type="string", pattern="^/")]
Timezone = Annotated[str, BeforeValidator(_timezone), _schema(type="string", default="UTC")]
Jitter = Annotated[
    bool | float,
    BeforeValidator(_jitter),
    _schema(anyOf=[{"type": "boolean"}, {"type": "number"}, {"type": "string"}]),
]

# --- models ------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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


class PathGrant(_Section):
    """One ``[paths]`` entry: a host path the app may see, read-only or read-write."""

    path: Text = Field(description="absolute, or relative to the app directory")
    mode: Literal["ro", "rw"] = "ro"
    create: bool = Field(default=False, description="create the directory if it is missing")


class Network(_Section):
    """``[network]``: where the app may connect to; everything else is refused."""

    interfaces: list[Interface] = Field(default_factory=list)
    egress: list[Egress] = Field(default_factory=list)


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


class Limits(_Section):
    """``[limits]``: cgroup limits; unset means the host default."""

    processes: Positive | None = None
    memory: PositiveSize | None = None
    cpu: Cpu | None = None


class ExecPolicy(_Section):
    """A balancing policy implemented by an external program (any language)."""

    exec: list[Text] = Field(min_length=1)


def _policy_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "named"
    if isinstance(value, dict | ExecPolicy):
        return "exec"
    return None


def _policy_name(value: object) -> str:
    if not isinstance(value, str) or not _POLICY.fullmatch(value):
        fail('a policy name such as "p2c", "round-robin" or "least-conn"', value)
    return value


Policy = Annotated[
    Annotated[str, BeforeValidator(_policy_name), Tag("named")]
    | Annotated[ExecPolicy, Tag("exec")],
    Discriminator(
        _policy_kind,
        custom_error_type="corral",
        custom_error_message='expected a policy name such as "p2c", or { exec = ["prog", ...] }',
    ),
]


class Health(_Section):
    """``lb.health``: how the balancer decides an instance may receive traffic."""

    http: UrlPath | None = None
    tcp: bool = False
    interval: PositiveDuration = 2.0
    timeout: PositiveDuration = 1.0
    rise: Positive = 2
    fall: Positive = 3


class Balancer(_Section):
    """``[lb]``: the app behind a registered name and a claimed frontend port."""

    name: Hostname | None = None
    frontend: Port
    process: Name | None = Field(
        default=None,
        description="process whose instances are the backends (default: the one with a port)",
    )
    policy: Policy = "p2c"
    health: Health | None = None
    activation: Literal["always", "on-demand"] = "always"
    idle: PositiveDuration | None = Field(
        default=None, description="on-demand: stop the instances after this long without traffic"
    )
    plane: Literal["nft", "proxy"] | None = Field(default=None, description="default: host config")
    mode: Literal["tcp", "http"] = "tcp"
    socket_activation: bool = Field(
        default=False,
        description="on-demand: the lb hands its listening socket to the instance as fd 3 "
        "(LISTEN_FDS=1, LISTEN_PID); the app accepts on it instead of binding its port",
    )


AlertEvent = Literal["failure", "timeout", "missed", "no-success"]


def _default_alert_events() -> list[AlertEvent]:
    return ["failure", "timeout"]


class Alert(_Section):
    """``cron.NAME.alert``: on the listed events, run ``command`` (events are always published)."""

    command: Text | None = None
    on: list[AlertEvent] = Field(default_factory=_default_alert_events)
    no_success_within: PositiveDuration | None = None


class CronJob(_Section):
    """``[cron.NAME]``: a scheduled command, run in the app's sandbox."""

    schedule: Text = Field(description="five cron fields or @hourly/@daily/...; checked by cron")
    timezone: Timezone = "UTC"
    command: Text
    overlap: Literal["forbid", "queue", "replace", "allow"] = "forbid"
    missed: Literal["skip", "once", "all"] = "once"
    backfill: Annotated[
        int, BeforeValidator(_count(1, 100)), _schema(type="integer", minimum=1, maximum=100)
    ] = Field(default=3, description="missed = all: at most this many catch-up runs")
    timeout: PositiveDuration | None = None
    kill_grace: PositiveDuration = Field(
        default=10.0, description="after timeout: SIGTERM, then SIGKILL after this long"
    )
    jitter: Jitter = False
    alert: Alert | None = None


class Manifest(_Section):
    """A whole ``corral.toml`` (plus Procfile), after overrides."""

    app: AppSection
    processes: dict[Name, Process] = Field(default_factory=dict)
    ports: dict[Name, Port] = Field(default_factory=dict)
    paths: dict[Name, PathGrant] = Field(default_factory=dict)
    network: Network = Field(default_factory=Network)
    logs: Logs = Field(default_factory=Logs)
    limits: Limits = Field(default_factory=Limits)
    lb: Balancer | None = None
    cron: dict[Name, CronJob] = Field(default_factory=dict)
