"""The manifest's ``[lb]`` section: its one schema (the lb's runtime config), defaults and checks.

Cheap to import (pydantic, ``corral.sdk.sections``): the ``corral.drivers`` entry point's
description names ``LB`` here, so ``corral check`` validates ``[lb]`` without starting the lb,
and the running lb serves the same check as ``manifest.check``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, ValidationInfo, model_validator

from corral.protocol import ManifestCheck
from corral.sdk.sections import (
    Hostname,
    Name,
    Positive,
    PositiveDuration,
    Report,
    Section,
    SectionModel,
    Text,
    check_port,
    fail,
    json_schema,
    render,
)
from corral.units import parse_duration

POLICY_NAMES = ("round-robin", "weighted", "least-conn", "p2c", "hash-source", "hash-header")
NFT_POLICIES = ("weighted", "round-robin", "hash-source")
DEFAULT_IDLE = 300.0  # s an on-demand app may stay idle before its instances are stopped
POLICY_EXPECTED = f"a policy name ({', '.join(POLICY_NAMES)}) or {{ exec = [\"prog\", ...] }}"


def _url_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        fail('an HTTP path starting with "/", e.g. "/healthz"', value)
    return value


def _frontend(value: object, info: ValidationInfo) -> int | str:
    """A port, or "address:port" to listen on one address only."""
    if isinstance(value, str):
        host, colon, port = value.rpartition(":")
        if value.isdigit() and 1 <= int(value) <= 65535:
            return value
        if colon and host and port.isdigit() and 1 <= int(port) <= 65535:
            return value
        fail('a port 1..65535 or "address:port", e.g. 8080 or "127.0.0.1:8080"', value)
    return check_port(value, int((info.context or {}).get("offset", 0)))


def _policy_name(value: object) -> str:
    if not isinstance(value, str) or value not in POLICY_NAMES:
        fail(POLICY_EXPECTED, value)
    return value


_DOMAIN_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _domain(value: object) -> str:
    """A domain an app is reached at: a DNS name of two labels or more (letters, digits, '-';
    not an address), written in lowercase as the ledger keys it."""
    if isinstance(value, str):
        name = value.lower()
        labels = name.split(".")
        if (len(name) <= 253 and len(labels) >= 2 and not labels[-1].isdigit()
                and all(_DOMAIN_LABEL.fullmatch(label) for label in labels)):
            return name
    fail('a domain name such as "shop.example.com" (letters, digits and \'-\' in dot-separated'
         " labels; no scheme, port, path or wildcard)", value)
    raise AssertionError  # fail() raised


def _hsts(value: object) -> float:
    """``hsts``: true (a year, the usual max-age), false or 0 (not sent), or a duration."""
    if value is True:
        return 365 * 86400.0
    if value is False or value == 0:
        return 0.0
    try:
        if isinstance(value, str | int | float):
            seconds = parse_duration(value)
            if seconds > 0:
                return seconds
    except ValueError:
        pass
    fail('true (a year), false, or a duration such as "180d"', value)
    raise AssertionError  # fail() raised


UrlPath = Annotated[str, BeforeValidator(_url_path), json_schema(type="string", pattern="^/")]
Domain = Annotated[str, BeforeValidator(_domain), json_schema(type="string", format="hostname")]
Frontend = Annotated[
    int | str, BeforeValidator(_frontend),
    json_schema(anyOf=[{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string"}]),
]


class HealthConfig(SectionModel):
    """``lb.health``: a TCP connect (the default) or an HTTP GET of a path, every ``interval``."""

    http: UrlPath | None = Field(default=None, description="path to GET; 2xx/3xx is healthy")
    tcp: bool = Field(default=True, description="a TCP connect, unless http is set")
    interval: PositiveDuration = 2.0
    timeout: PositiveDuration = 1.0
    rise: Positive = Field(default=1, description="consecutive passes before joining")
    fall: Positive = Field(default=2, description="consecutive failures before leaving")


class PolicyProgram(SectionModel):
    """``lb.policy = { exec = [...] }``: an external program speaking the CLBP/1 protocol."""

    exec: list[Text] = Field(min_length=1)
    deadline: PositiveDuration = Field(default=0.005,
                                       description="pick deadline; the fallback after it")
    fallback: Annotated[str, BeforeValidator(_policy_name)] = "p2c"


def _policy_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "named"
    if isinstance(value, dict | PolicyProgram):
        return "exec"
    return None


Policy = Annotated[
    Annotated[str, BeforeValidator(_policy_name), Tag("named")]
    | Annotated[PolicyProgram, Tag("exec")],
    Discriminator(_policy_kind, custom_error_type="corral",
                  custom_error_message=f"expected {POLICY_EXPECTED}"),
]


class TlsFiles(SectionModel):
    """``lb.tls = { cert = "PATH", key = "PATH" }``: a certificate from elsewhere (PEM: the
    full chain, and its private key), reloaded when the files change."""

    cert: Text = Field(description="PEM file: the certificate and its chain")
    key: Text = Field(description="PEM file: the private key (root-readable only)")


def _tls_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "auto"
    if isinstance(value, dict | TlsFiles):
        return "files"
    return None


Tls = Annotated[
    Annotated[Literal["auto"], Tag("auto")] | Annotated[TlsFiles, Tag("files")],
    Discriminator(_tls_kind, custom_error_type="corral",
                  custom_error_message='expected "auto" (a certificate from the host\'s ACME '
                  'directory) or { cert = "PATH", key = "PATH" }'),
]


def _health(value: object) -> object:
    return {} if value is None else value  # a resolved manifest of an older kernel: null


class LbConfig(SectionModel):
    """One app's ``[lb]`` section: the manifest schema and the lb's runtime config in one."""

    name: Hostname = Field(description="registered name (HTTP Host routing key); default: the "
                           "app's name")
    frontend: Frontend | None = Field(
        default=None, description="a frontend of the app's own: port, or 'address:port' to "
        "listen on (needed for mode = \"tcp\"; HTTP apps may use domains instead)")
    domains: list[Domain] = Field(
        default_factory=list, description="names the app is reached at on the host's shared "
        "HTTP and HTTPS frontends (routed by Host and SNI); each is claimed in the ledger")
    tls: Tls | None = Field(
        default=None, description='HTTPS for the domains: "auto" (ACME) or { cert, key }')
    redirect_https: bool = Field(
        default=True, description="with tls: plain HTTP requests are redirected to HTTPS "
        "(308) once the certificate is valid")
    hsts: Annotated[float, BeforeValidator(_hsts)] = Field(
        default=0.0, description="with tls: Strict-Transport-Security max-age (a duration, or "
        "true for a year); 0/false: not sent")
    process: Name | None = Field(
        default=None,
        description="process whose instances are the backends (default: the one with a port)")
    policy: Policy | None = Field(
        default=None, description="default: p2c on the proxy plane, weighted on nft")
    hash_header: Text | None = Field(
        default=None, description="the request header hashed by policy = \"hash-header\"")
    health: Annotated[HealthConfig, BeforeValidator(_health)] = Field(
        default_factory=HealthConfig)
    activation: Literal["always", "on-demand"] = "always"
    idle: PositiveDuration = Field(
        default=DEFAULT_IDLE, description="on-demand: stop the instances after this long "
        "without traffic")
    plane: Literal["proxy", "nft"] | None = Field(default=None,
                                                  description="default: the host's lb config")
    mode: Literal["tcp", "http"] = "tcp"
    drain: PositiveDuration = Field(default=30.0,
                                    description="longest wait for active work when draining")
    socket_activation: bool = Field(
        default=False,
        description="on-demand: the lb hands its listening socket to the instance as fd 3 "
        "(LISTEN_FDS=1, LISTEN_PID); the app accepts on it instead of binding its port")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any, info: ValidationInfo) -> Any:
        """The name defaults to the app's (the validation context's ``app``)."""
        app = (info.context or {}).get("app")
        if isinstance(data, dict) and data.get("name") is None and app:
            data = {**data, "name": app}
        return data

    @property
    def listen(self) -> tuple[str, int]:
        """(address, port) of the app's own frontend; a bare port listens on every address.
        ("", 0) when it has none (it is reached through the shared frontends only)."""
        if self.frontend is None:
            return ("", 0)
        if isinstance(self.frontend, int):
            return ("0.0.0.0", self.frontend)  # noqa: S104 - a bare port means every address
        host, _, port = self.frontend.rpartition(":")
        return (host or "0.0.0.0", int(port))  # noqa: S104 - as above

    @property
    def policy_name(self) -> str:
        """The built-in policy in force (a program's fallback when the policy is a program)."""
        if isinstance(self.policy, PolicyProgram):
            return self.policy.fallback
        if self.policy is not None:
            return self.policy
        return "weighted" if self.plane == "nft" else "p2c"


def rules(cfg: LbConfig) -> list[tuple[tuple[str, ...], str]]:
    """The rules across ``[lb]``'s own values: (field path, problem) for each one broken. The
    runtime config (``load_lb_config``) is held to them too."""
    out: list[tuple[tuple[str, ...], str]] = []
    if cfg.plane == "nft":
        if cfg.mode != "tcp":
            out.append((("mode",), 'expected mode = "tcp" with plane = "nft" (L4 only: kernel '
                         'forwarding cannot read HTTP); use plane = "proxy" for mode = "http"'))
        if cfg.activation == "on-demand":
            out.append((("activation",), 'activation = "on-demand" needs plane = "proxy" (it '
                        "holds the first connection while the instance starts)"))
        if isinstance(cfg.policy, str) and cfg.policy not in NFT_POLICIES:
            out.append((("policy",), f"policy {render(cfg.policy)} needs plane = \"proxy\"; "
                        f"the nft plane supports {', '.join(NFT_POLICIES)}"))
    if cfg.socket_activation and cfg.activation != "on-demand":
        out.append((("socket_activation",), 'socket_activation needs activation = "on-demand" '
                    "(the lb hands its socket to the instance it starts)"))
    if cfg.policy == "hash-header" and not cfg.hash_header:
        out.append((("policy",), 'policy = "hash-header" needs hash_header = "<header name>"'))
    if cfg.policy == "hash-header" and cfg.mode != "http":
        out.append((("policy",), 'policy = "hash-header" needs mode = "http"'))
    if cfg.hash_header and cfg.policy != "hash-header":
        out.append((("hash_header",), 'expected hash_header only with policy = "hash-header"'))
    if cfg.health.http is None and not cfg.health.tcp:
        out.append((("health",), 'expected a check: http = "/path" or tcp = true'))
    if cfg.frontend is None and not cfg.domains:
        out.append(((), "expected frontend = PORT (a frontend of the app's own) or domains = "
                    '["name.example.com"] (the host\'s shared HTTP/HTTPS frontends)'))
    if cfg.domains and (cfg.mode != "http" or cfg.plane == "nft"):
        out.append((("domains",), 'domains are routed by Host and SNI: they need mode = "http"'
                    ' and plane = "proxy"'))
    if len(set(cfg.domains)) != len(cfg.domains):
        out.append((("domains",), "a domain is listed twice"))
    if cfg.tls is not None and not cfg.domains:
        out.append((("tls",), "tls is for the domains on the shared HTTPS frontend: list them "
                    "in domains"))
    return out


def _written(cfg: LbConfig) -> list[tuple[tuple[str, ...], str]]:
    """Rules on what the manifest says explicitly (not on the defaults a resolved section
    carries): idle without on-demand, two health checks at once."""
    out: list[tuple[tuple[str, ...], str]] = []
    if cfg.activation == "always" and "idle" in cfg.model_fields_set:
        out.append((("idle",), 'expected idle only with activation = "on-demand"'))
    health = cfg.health
    if health.http is not None and "tcp" in health.model_fields_set and health.tcp:
        out.append((("health",), 'expected exactly one check: http = "/path" or tcp = true'))
    return out


def check(cfg: LbConfig, context: ManifestCheck, report: Report) -> LbConfig:
    """Cross-check ``[lb]`` against the app: its backends' process, the name and frontend to
    claim, the process started on demand."""
    for path, message in [*rules(cfg), *_written(cfg)]:
        report.problem(path, message)
    if cfg.health.http is not None:
        cfg.health.tcp = False  # the one check in force, said once in the resolved section
    with_port = [name for name, p in context.processes.items() if p.get("port") is not None]
    if cfg.process is not None:
        chosen = context.processes.get(cfg.process)
        if chosen is None or chosen.get("port") is None:
            report.problem(("process",), f"expected a process with a port "
                           f"({', '.join(with_port) or 'none defined'}), got {render(cfg.process)}")
    elif "web" in with_port or len(with_port) == 1:
        cfg.process = "web" if "web" in with_port else with_port[0]
    else:
        report.problem((), "expected one process with a port to receive the traffic " + (
            f"(several have one: {', '.join(with_port)}; choose with lb.process)" if with_port
            else '(give a [processes] entry port = "<name of a [ports] entry>")'))
    report.claim("lbname", cfg.name, {"app": context.app})
    if cfg.frontend is not None:
        port = cfg.listen[1]
        report.port(("frontend",), port)
        report.claim("port", str(port), {"app": context.app, "name": "lb"})
    for domain in cfg.domains:  # one holder per domain on the host; a conflict names it
        report.claim("domain", domain, {"app": context.app})
    if isinstance(cfg.tls, TlsFiles):
        from corral_lb.certs import CertError, check_files

        try:
            check_files(cfg.tls.cert, cfg.tls.key, domains=cfg.domains)
        except CertError as exc:
            report.problem(("tls",), exc.reason)
    if cfg.activation == "on-demand" and cfg.process is not None:
        report.start_on_demand(cfg.process)
    return cfg


LB = Section("lb", LbConfig, check, offset_ports=(("frontend",),),
             doc="the app behind a registered name and a claimed frontend port")
