"""ZAP handler: admit local peers by uid before any of their messages is decoded.

libzmq asks the ZAP handler (RFC 27) at every connection handshake. On ``ipc://`` endpoints
with the NULL mechanism the request's address frame carries the peer's credentials taken from
SO_PEERCRED as ``<host>:<uid>:<gid>:<pid>``; the kernel admits the uids it trusts and tags the
connection with user id ``uid:<n>``, which libzmq then attaches to every message of that peer
(``frame.get("User-Id")``). A refused peer never gets a message through.

Not a security measure on its own for TCP: there, CURVE keys must be checked (not offered yet;
the kernel binds ipc endpoints only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
import zmq
import zmq.asyncio

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = b"corral"

log = structlog.get_logger("corral.bus.zap")


def peer_uid(address: bytes) -> int | None:
    """The uid in a ZAP address frame of an ipc peer, or None when there is none."""
    parts = address.decode("ascii", "replace").rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


class ZapHandler:
    """Answers ZAP requests on the context's inproc endpoint with ``admit(uid)``."""

    def __init__(self, ctx: zmq.asyncio.Context, admit: Callable[[int], bool]) -> None:
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._admit = admit
        self.refused = 0

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        while True:
            frames = await self._sock.recv_multipart()
            await self._sock.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6 or frames[0] != b"1.0":
            rid = frames[1] if len(frames) > 1 else b""
            return [b"1.0", rid, b"400", b"bad ZAP request", b"", b""]
        version, rid, domain, address, _identity, mechanism = frames[:6]
        uid = peer_uid(address) if mechanism == b"NULL" else None
        if domain != DOMAIN or uid is None or not self._admit(uid):
            self.refused += 1
            log.warning("peer refused", address=address.decode("ascii", "replace"))
            return [version, rid, b"400", b"peer not admitted", b"", b""]
        return [version, rid, b"200", b"OK", f"uid:{uid}".encode(), b""]

    def close(self) -> None:
        """Unbind and close."""
        self._sock.close(0)


async def run_zap(handler: ZapHandler) -> None:
    """Serve ``handler`` until cancelled, closing it on the way out."""
    try:
        await handler.serve()
    except asyncio.CancelledError:
        handler.close()
        raise
