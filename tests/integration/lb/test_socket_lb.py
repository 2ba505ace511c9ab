"""Connect-time translation of the host's own connections to nft frontends, for real: a
cgroup/connect4 BPF program on the cgroup v2 root (corral_lb.socket_lb)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from corral.testing import free_port
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from corral_lb.nft import NftPlane
from corral_lb.socket_lb import SocketBalancer
from integration.lb._harness import backends, get
from integration.lb.test_nft import FAST_HEALTH, nft_plane

pytestmark = pytest.mark.root


def peer_of(port: int) -> tuple[str, int]:
    """Where a connection to 127.0.0.1:port really went, as the client sees it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        host, peer = c.getpeername()[:2]
        return str(host), int(peer)


async def serving(nft: NftPlane, fe: int, backend: int, *, policy: str = "weighted") -> Balancer:
    lb = Balancer(nft=nft)
    cfg = load_lb_config({"name": f"s{fe}.test", "frontend": str(fe), "plane": "nft",
                          "mode": "tcp", "policy": policy, "health": FAST_HEALTH},
                         app=f"s{fe}")
    await lb.attach(f"s{fe}", cfg)
    await lb.add_backend(f"s{fe}", "a", "127.0.0.1", backend, wait=5)
    return lb


@pytest.fixture
def plane() -> Iterator[NftPlane]:
    nft = nft_plane(socket_lb=True)
    yield nft
    nft.close()


def test_host_connections_go_straight_to_the_backend(plane: NftPlane) -> None:
    """With the program a host connection to the frontend is made to the backend itself (its
    peer is the backend: no NAT); without it, the same service works through DNAT (its peer
    is the frontend)."""
    pa, fe = free_port(), free_port()

    async def main() -> None:
        with backends(("a", pa)):
            lb = await serving(plane, fe, pa)
            try:
                assert await get(fe) == (200, b"a")
                assert peer_of(fe) == ("127.0.0.1", pa)
                assert lb.status()["services"][0]["socket_lb"] == [f"127.0.0.1:{fe}"]
                plane.close()  # the driver exits: the link goes, the kernel detaches it
                assert peer_of(fe) == ("127.0.0.1", fe)  # DNAT carries on
                assert await get(fe) == (200, b"a")
            finally:
                await lb.detach(f"s{fe}")

    asyncio.run(main())


def test_hash_source_services_stay_with_dnat(plane: NftPlane) -> None:
    """From the host every source address is the same: hash-source keeps DNAT's behaviour."""
    pa, fe = free_port(), free_port()

    async def main() -> None:
        with backends(("a", pa)):
            lb = await serving(plane, fe, pa, policy="hash-source")
            try:
                assert SocketBalancer.handles(("0.0.0.0", fe), "hash-source") == []
                assert peer_of(fe) == ("127.0.0.1", fe)
                assert await get(fe) == (200, b"a")
            finally:
                await lb.detach(f"s{fe}")

    asyncio.run(main())


# Inside another network namespace: its own listener on 127.0.0.1:PORT, and a connect to it.
NETNS_CLIENT = textwrap.dedent("""
    import socket, sys
    port = int(sys.argv[1])
    ls = socket.socket(); ls.bind(("127.0.0.1", port)); ls.listen()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    s, _ = ls.accept(); s.sendall(b"own")
    print(c.recv(3).decode(), c.getpeername()[1])
""")


def test_other_network_namespaces_are_not_translated(plane: NftPlane) -> None:
    """The program runs for every process on the host, but only connections made in the
    host's network namespace are translated: an app's own 127.0.0.1:PORT is its own."""
    pa, fe = free_port(), free_port()
    ns = f"corral-slb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)

        async def main() -> None:
            with backends(("a", pa)):
                lb = await serving(plane, fe, pa)
                try:
                    assert peer_of(fe) == ("127.0.0.1", pa)  # translated on the host
                    out = subprocess.run(
                        ["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_CLIENT, str(fe)],
                        capture_output=True, text=True, timeout=30)
                    assert out.returncode == 0, out.stderr
                    assert out.stdout.split() == ["own", str(fe)]
                finally:
                    await lb.detach(f"s{fe}")

        asyncio.run(main())
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
