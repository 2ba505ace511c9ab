"""journald sink: the native protocol (datagrams of KEY=VALUE fields) to the journal socket."""

from __future__ import annotations

import os
import socket
import struct

from corral_log.records import Chunk, Record
from corral_log.sinks._base import SinkUnavailable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY = {"stdout": b"6", "stderr": b"3", "corral": b"4"}


def _field(key: bytes, value: bytes) -> bytes:
    if b"\n" in value:
        # binary-safe form: KEY\n<u64 little-endian length><value>\n
        return key + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return key + b"=" + value + b"\n"


def format_native(record: Record) -> bytes:
    """One journal entry in the native protocol."""
    parts = [
        _field(b"MESSAGE", record.message.encode("utf-8", "replace")),
        _field(b"PRIORITY", PRIORITY.get(record.stream, b"5")),
        _field(b"SYSLOG_IDENTIFIER", record.app.encode()),
        _field(b"CORRAL_APP", record.app.encode()),
        _field(b"CORRAL_PROCESS", record.process.encode()),
        _field(b"CORRAL_INSTANCE", record.instance.encode()),
        _field(b"CORRAL_STREAM", record.stream.encode()),
        _field(b"CORRAL_TIME_NS", str(record.time_ns).encode()),
    ]
    if record.partial:
        parts.append(_field(b"CORRAL_PARTIAL", b"1"))
    return b"".join(parts)


def journald_present(path: str = JOURNAL_SOCKET) -> bool:
    """Whether a journal socket exists at ``path``."""
    try:
        return os.path.exists(path) and not os.path.isdir(path)
    except OSError:
        return False


class JournaldSink:
    """Sends each record as one journal entry to the journal's native socket."""

    def __init__(self, name: str, *, socket_path: str = JOURNAL_SOCKET) -> None:
        self.name = name
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, chunk: Chunk) -> None:
        """Send every record; raise SinkUnavailable when the journal does not take it."""
        try:
            for r in chunk.records():
                self.sock.sendto(format_native(r), self.socket_path)
        except OSError as exc:
            raise SinkUnavailable(f"journald {self.socket_path}: {exc}") from exc

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
