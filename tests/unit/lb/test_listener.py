"""What a Listener hands its frontend for each client it accepts."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from corral.testing import wait_for_async
from corral_lb.listener import AcceptedSocket, Listener


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not _has_ipv6_loopback(),
                                                 reason="no IPv6 loopback")),
])
def test_a_client_is_handed_over_as_an_accepted_socket(host: str) -> None:
    """The client's socket is a socket.socket of the listener's family, whose family and
    type read as plain integers (the event loop reads both for every connection it takes
    over), with the client's address as its peer."""

    async def main() -> None:
        taken: list[tuple[socket.socket, Any]] = []
        listener = Listener(lambda client, peer: taken.append((client, peer)) is None)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener.start(socket.create_server((host, 0), family=family))
        assert listener.sock is not None
        with socket.create_connection(listener.sock.getsockname()[:2]) as client:
            await wait_for_async(lambda: taken, timeout=5)
            accepted, peer = taken[0]
            assert isinstance(accepted, AcceptedSocket)
            assert type(accepted.family) is int and accepted.family == family
            assert type(accepted.type) is int and accepted.type == socket.SOCK_STREAM
            assert peer[:2] == client.getsockname()[:2] == accepted.getpeername()[:2]
            accepted.sendall(b"ok")
            assert client.recv(2) == b"ok"
            accepted.close()
        assert (listener.accepted, listener.active) == (1, 1)
        listener.close()

    asyncio.run(main())
