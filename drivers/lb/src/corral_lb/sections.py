"""The manifest's ``[lb]`` section: its one schema (the lb's runtime config), defaults and checks.

Cheap to import (pydantic, ``corral.sdk.sections``): the ``corral.drivers`` entry point's
description names ``LB`` here, so ``corral check`` validates ``[lb]`` without starting the lb,
and the running lb serves the same check as ``manifest.check``.
"""

from __future__ import annotations

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


UrlPath = Annotated[str, BeforeValidator(_url_path), json_schema(type="string", pattern="^/")]
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


def _health(value: object) -> object:
    return {} if value is None else value  # a resolved manifest of an older kernel: null


class LbConfig(SectionModel):
    """One app's ``[lb]`` section: the manifest schema and the lb's runtime config in one."""

    name: Hostname = Field(description="registered name (HTTP Host routing key); default: the "
                           "app's name")
    frontend: Frontend = Field(description="port, or 'address:port' to listen on")
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
        """(address, port) of the frontend; a bare port listens on every address."""
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
    port = cfg.listen[1]
    report.port(("frontend",), port)
    report.claim("lbname", cfg.name, {"app": context.app})
    report.claim("port", str(port), {"app": context.app, "name": "lb"})
    if cfg.activation == "on-demand" and cfg.process is not None:
        report.start_on_demand(cfg.process)
    return cfg


LB = Section("lb", LbConfig, check, offset_ports=(("frontend",),),
             doc="the app behind a registered name and a claimed frontend port")
