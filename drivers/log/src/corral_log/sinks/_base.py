"""The sink contract: one callable that delivers a chunk of records, all of it or none."""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from corral.errors import CorralError, ErrorCode
from corral_log.records import Chunk


class SinkUnavailable(CorralError):
    """The sink cannot take records now (receiver down, disk full); retry later, in order."""

    code = ErrorCode.UNAVAILABLE


class SinkRejected(CorralError):
    """The receiver refused this chunk for good (e.g. HTTP 400); retrying cannot help."""

    code = ErrorCode.INVALID


@runtime_checkable
class Sink(Protocol):
    """Where records go. The runner calls it from one thread, in order, never concurrently.

    Responsibility ends at the receiver's acknowledgement, where the transport has one (HTTP
    status, a completed write to a file); for UDP syslog there is none and a datagram the
    network loses is not seen. Raise :class:`SinkUnavailable` to have the chunk spooled and
    retried, :class:`SinkRejected` to have it counted as dropped.
    """

    name: str

    def __call__(self, chunk: Chunk) -> None:
        """Deliver every record of ``chunk`` or raise."""

    def close(self) -> None:
        """Release sockets and files; the sink is not called afterwards."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: str | int) -> int:
    """``"100MiB"`` -> 104857600; a bare number is bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size (expected e.g. '64MiB', '500KB', '1GiB')")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def parse_duration(value: str | int | float) -> float:
    """``"1d"`` -> 86400.0 seconds; a bare number is seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a duration (expected e.g. '10s', '5m', '1h', '1d')")
    return float(m.group(1)) * _SECONDS[m.group(2) or "s"]
