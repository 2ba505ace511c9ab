"""The lb's runtime configuration: an app's ``[lb]`` section (schema in ``corral_lb.sections``,
the one definition) with the host's defaults filled in, and the host's ``[drivers.lb]`` config."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from corral.errors import CorralError, ErrorCode, ManifestError
from corral.sdk.sections import describe, format_path
from corral.units import UnitError, parse_duration, parse_size
from corral_lb.sections import (
    NFT_POLICIES,
    POLICY_NAMES,
    HealthConfig,
    LbConfig,
    PolicyProgram,
    rules,
)

__all__ = [
    "NFT_POLICIES", "POLICY_NAMES", "HealthConfig", "LbConfig", "PolicyProgram",
    "load_lb_config", "parse_duration", "proxy_limits", "proxy_timeouts",
]

TCP_IDLE_TIMEOUT = 3600.0  # s: an L4 connection with no bytes either way (host config)
HTTP_IDLE_TIMEOUT = 75.0  # s: an HTTP client without a whole request head (nginx's keepalive)
MAX_BODY_SIZE = 1024**3  # bytes: a larger HTTP request body is refused with 413 (host config)
MAX_CONNECTIONS = 10_000  # client connections open at once per proxy frontend (host config)

def load_lb_config(
    section: dict[str, Any], *, app: str, default_plane: str = "proxy"
) -> LbConfig:
    """Validate an app's resolved ``[lb]`` section; ``ManifestError`` names each bad field.

    Unset fields (None) take the lb's defaults: the name is the app's, the plane the host's.
    """
    section = {k: v for k, v in section.items() if v is not None}
    section.setdefault("plane", default_plane)
    try:
        config = LbConfig.model_validate(section, context={"app": app})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            path, message = describe(err, section, LbConfig)
            problems.append(f"app {app!r}: {format_path(('lb', *path))}: {message}")
        raise ManifestError(problems) from None
    broken = rules(config)
    if broken:
        raise ManifestError([f"app {app!r}: {format_path(('lb', *path))}: {message}"
                             for path, message in broken])
    return config


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
