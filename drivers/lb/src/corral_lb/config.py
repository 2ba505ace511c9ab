"""The manifest's ``[lb]`` section as the lb driver reads it (validated, durations in seconds)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.errors import CorralError, ErrorCode, ManifestError
from corral.units import UnitError, parse_duration, parse_size
from corral_lb.policy import POLICY_NAMES

TCP_IDLE_TIMEOUT = 3600.0  # s: an L4 connection with no bytes either way (host config)
HTTP_IDLE_TIMEOUT = 75.0  # s: an HTTP client without a whole request head (nginx's keepalive)
MAX_BODY_SIZE = 1024**3  # bytes: a larger HTTP request body is refused with 413 (host config)
MAX_CONNECTIONS = 10_000  # client connections open at once per proxy frontend (host config)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthConfig(_Section):
    """``lb.health``: TCP connect (default) or HTTP GET of a path, every ``interval``."""

    http: str | None = Field(default=None, description="path to GET; 2xx/3xx is healthy")
    tcp: bool = True
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = Field(default=1, ge=1, description="consecutive passes before joining")
    fall: int = Field(default=2, ge=1, description="consecutive failures before leaving")

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("http")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"health.http must be a path starting with '/', got {v!r}")
        return v


class PolicyProgram(_Section):
    """``lb.policy = { exec = [...] }``: an external program speaking the CLBP/1 protocol."""

    exec: list[str] = Field(min_length=1)
    deadline: float = Field(default=0.005, description="pick deadline; default policy after it")
    fallback: str = "p2c"

    @field_validator("deadline", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class LbConfig(_Section):
    """One app's ``[lb]`` section."""

    name: str = Field(min_length=1, description="registered name (HTTP Host routing key)")
    frontend: int | str = Field(description="port, or 'address:port' to listen on")
    process: str | None = Field(default=None, description="process whose instances are backends")
    policy: str | PolicyProgram | None = None
    hash_header: str | None = Field(default=None, description="header hashed by hash-header")
    health: HealthConfig = Field(default_factory=HealthConfig)
    activation: Literal["always", "on-demand"] = "always"
    idle: float = 300.0
    plane: Literal["proxy", "nft"] = "proxy"
    mode: Literal["tcp", "http"] = "tcp"
    drain: float = Field(default=30.0, description="longest wait for active work when draining")
    socket_activation: bool = Field(
        default=False, description="on-demand apps that take the listening socket (LISTEN_FDS)"
    )

    @field_validator("idle", "drain", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str | PolicyProgram | None) -> str | PolicyProgram | None:
        if isinstance(v, str) and v not in POLICY_NAMES:
            raise ValueError(f"unknown policy {v!r}; expected one of {', '.join(POLICY_NAMES)}")
        return v

    @model_validator(mode="after")
    def _plane_fits(self) -> LbConfig:
        if self.plane == "nft":
            if self.mode != "tcp":
                raise ValueError("plane 'nft' is L4 only: set mode = 'tcp' or plane = 'proxy'")
            if self.activation == "on-demand":
                raise ValueError("activation 'on-demand' needs plane = 'proxy' (it holds the "
                                 "first connection while the instance starts)")
            if isinstance(self.policy, str) and self.policy not in NFT_POLICIES:
                raise ValueError(f"policy {self.policy!r} needs plane = 'proxy'; the nft plane "
                                 f"supports {', '.join(NFT_POLICIES)}")
        if self.socket_activation and self.activation != "on-demand":
            raise ValueError("socket_activation needs activation = 'on-demand' (the lb hands "
                             "its socket to the instance it starts)")
        if self.policy == "hash-header" and not self.hash_header:
            raise ValueError("policy 'hash-header' needs hash_header = '<header name>'")
        if self.policy == "hash-header" and self.mode != "http":
            raise ValueError("policy 'hash-header' needs mode = 'http'")
        return self

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
        return "p2c" if self.plane == "proxy" else "weighted"


NFT_POLICIES = ("weighted", "round-robin", "hash-source")
KERNEL_DEFAULT_POLICY = "p2c"  # corral.manifest's Balancer.policy default


def load_lb_config(
    section: dict[str, Any], *, app: str, default_plane: str = "proxy"
) -> LbConfig:
    """Validate an app's resolved ``[lb]`` section; ``ManifestError`` names each bad field.

    Fields the kernel's manifest leaves unset (None) take the lb's defaults: the name is the
    app's, the plane the host's, health a TCP check, idle five minutes.
    """
    section = {k: v for k, v in section.items() if v is not None}
    section.setdefault("name", app)
    section.setdefault("plane", default_plane)
    if section["plane"] == "nft" and section.get("policy") == KERNEL_DEFAULT_POLICY:
        # The kernel's manifest model writes its default policy ("p2c", proxy only) into every
        # resolved [lb] section, so "unset" cannot be told apart here: on the nft plane it
        # means the plane's own default (weighted).
        del section["policy"]
    try:
        return LbConfig.model_validate(section)
    except ValidationError as e:
        problems = [
            f"app {app!r}: lb.{'.'.join(str(p) for p in err['loc']) or '(section)'}: {err['msg']}"
            for err in e.errors()
        ]
        raise ManifestError(problems) from None


def proxy_timeouts(host_config: dict[str, Any]) -> tuple[float, float]:
    """``(tcp_idle_timeout, http_idle_timeout)`` in seconds from the host's ``[drivers.lb]
    config`` (durations such as "75s", "1h30m", "1d" in ``corral.units``' notation); unset keys
    keep the defaults (1 h, 75 s), 0 turns a timeout off. A bad value is
    an ``INVALID`` ``CorralError`` naming the key."""
    out = []
    for key, default in (("tcp_idle_timeout", TCP_IDLE_TIMEOUT),
                         ("http_idle_timeout", HTTP_IDLE_TIMEOUT)):
        value = host_config.get(key, default)
        try:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"expected a duration such as '75s' or '1h', got {value!r}")
            out.append(parse_duration(value))
        except ValueError as e:
            raise CorralError(f"[drivers.lb] config: {key}: {e}", code=ErrorCode.INVALID,
                              retry=False) from None
    return out[0], out[1]


def proxy_limits(host_config: dict[str, Any]) -> tuple[int, int]:
    """``(max_body_size, max_connections_per_frontend)`` from the host's ``[drivers.lb]
    config``: the largest HTTP request body in bytes (a size such as ``"1GiB"``, the kernel's
    notation; default 1 GiB) and the client connections a proxy frontend keeps open at once
    (default 10000); 0 lifts either limit. A bad value is an ``INVALID`` ``CorralError``."""
    key = "max_body_size"
    try:
        body = parse_size(host_config.get(key, MAX_BODY_SIZE))
        key = "max_connections_per_frontend"
        conns = host_config.get(key, MAX_CONNECTIONS)
        if isinstance(conns, bool) or not isinstance(conns, int) or conns < 0:
            raise ValueError(f"expected a whole number >= 0, got {conns!r}")
    except (UnitError, ValueError) as e:
        raise CorralError(f"[drivers.lb] config: {key}: {e}", code=ErrorCode.INVALID,
                          retry=False) from None
    return body, conns
