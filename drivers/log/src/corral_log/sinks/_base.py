"""The sink contract: one callable that delivers a chunk of records, all of it or none."""

from __future__ import annotations

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

