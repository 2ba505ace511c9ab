"""The app's helper for corral's contract: ports, paths, identity, readiness. Stdlib only.

    from corral import app
    port = app.port("http")        # $CORRAL_PORT_HTTP
    data = app.path("data")        # $CORRAL_PATH_DATA, as a Path
    app.notify_ready()             # sd_notify READY=1 when started under corral

Every value comes from the environment corral starts the app with, so the same code runs under
`corral dev` on a laptop and in production. Nothing here imports corral's kernel dependencies.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = [
    "ContractError",
    "instance",
    "listen_fds",
    "manifest",
    "name",
    "notify",
    "notify_ready",
    "path",
    "port",
]

LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at file descriptor 3


class ContractError(LookupError):
    """A variable of corral's contract is missing or malformed; the message names it."""


def _suffix(name: str) -> str:
    return name.upper().replace("-", "_")


def _variable(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None or value == "":
        raise ContractError(
            f"${variable} is not set: is this process started by corral "
            "(corral up / corral dev), and does corral.toml define it?"
        )
    return value


def port(name: str | None = None) -> int:
    """Return the port named ``name`` ($CORRAL_PORT_<NAME>), or this process's own ($PORT)."""
    variable = "PORT" if name is None else f"CORRAL_PORT_{_suffix(name)}"
    value = _variable(variable)
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ContractError(f"${variable} is {value!r}, expected a port 1..65535")
    return int(value)


def path(name: str) -> Path:
    """Return the path named ``name`` in [paths] ($CORRAL_PATH_<NAME>)."""
    return Path(_variable(f"CORRAL_PATH_{_suffix(name)}"))


def name() -> str:
    """Return the app's name ($CORRAL_APP)."""
    return _variable("CORRAL_APP")


def instance() -> str:
    """Return this instance's id, ``<app>.<process>.<index>`` ($CORRAL_INSTANCE)."""
    return _variable("CORRAL_INSTANCE")


def manifest() -> dict[str, Any]:
    """Return the resolved manifest as JSON ($CORRAL_MANIFEST names the file)."""
    file = _variable("CORRAL_MANIFEST")
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ContractError(f"$CORRAL_MANIFEST names {file}, which cannot be read: {exc}") from exc
    except ValueError as exc:
        raise ContractError(f"$CORRAL_MANIFEST names {file}, which is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"$CORRAL_MANIFEST names {file}, which holds no JSON object")
    return data


def notify(*assignments: str) -> bool:
    """Send sd_notify ``assignments`` (e.g. "READY=1") to $NOTIFY_SOCKET; False if unset."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: the name starts with a NUL byte
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(assignments).encode())
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell the supervisor the app is ready (READY=1); False when not started with a socket."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def listen_fds() -> list[int]:
    """Return the sockets passed by socket activation ($LISTEN_FDS for this $LISTEN_PID)."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))
