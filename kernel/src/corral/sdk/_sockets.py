"""The listening sockets a driver process inherits from the kernel (``listen_sockets``).

A driver that declared the ``listen_sockets`` feature may have the kernel keep copies of its
listening TCP sockets (``socket.keep``); when the kernel starts the driver's next process it
passes them as inherited descriptors named in ``CORRAL_KEPT_FDS`` (docs/protocol.md §9.6).
"""

from __future__ import annotations

import json
import os
import socket

import structlog

from corral.protocol import KEPT_FDS_ENV

log = structlog.get_logger("corral.sdk")


def inherited_sockets() -> dict[str, socket.socket]:
    """The sockets this process inherited from the kernel, by the key they were kept under.

    Read once: the variable leaves the environment and every descriptor is made
    non-inheritable, so the driver's own children get neither. A malformed variable or a
    descriptor that is not a socket is logged and skipped (the driver then opens afresh)."""
    raw = os.environ.pop(KEPT_FDS_ENV, "")
    if not raw:
        return {}
    try:
        named = json.loads(raw)
        if not isinstance(named, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        log.error("ignoring a malformed inherited-sockets variable", variable=KEPT_FDS_ENV,
                  error=str(exc))
        return {}
    out: dict[str, socket.socket] = {}
    for key, fd in named.items():
        try:
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3:
                raise ValueError(f"descriptor {fd!r}")
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)
        except (OSError, ValueError) as exc:
            log.error("ignoring an inherited socket", key=key, error=str(exc))
            continue
        out[str(key)] = sock
    return out
