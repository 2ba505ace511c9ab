"""corral_lb._relay, the L4 proxy's byte relay in C, on real loopback sockets.

Each test hands the relay the middle ends of two socket pairs (client <-> relay <-> backend)
and talks through it from the outer ends, with blocking sockets on the test's side.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import struct
import threading
import time

import pytest

from corral_lb._relay import Relay

Pair = tuple[socket.socket, socket.socket, int]  # (client end, backend end, tag)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (outer end, end for the relay)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    return outer, inner


def relay_pair(relay: Relay, tag: int) -> Pair:
    client, client_inner = tcp_pair()
    backend, backend_inner = tcp_pair()
    for s in (client_inner, backend_inner):
        s.setblocking(False)
    relay.add(client_inner.detach(), backend_inner.detach(), tag)
    for s in (client, backend):
        s.settimeout(10)
    return client, backend, tag


def collect(relay: Relay, n: int, timeout: float = 10.0) -> list[tuple[int, int, int, bool, float]]:
    """Wait until ``n`` finished pairs were reported (the eventfd wakes us)."""
    done: list[tuple[int, int, int, bool, float]] = []
    deadline = time.monotonic() + timeout
    while len(done) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(done)} of {n} pairs reported: {done}"
        select.select([relay.fileno()], [], [], left)
        done += relay.collect()
    return done


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def relay() -> object:
    r = Relay()
    yield r
    r.close()


def test_bytes_both_ways_and_client_half_close(relay: Relay) -> None:
    """The client's FIN reaches the backend as EOF; the backend can still answer."""
    client, backend, _ = relay_pair(relay, 7)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    assert read_all(backend) == b"GET / HTTP/1.0\r\n\r\n"  # ends: EOF was passed on
    backend.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello")
    backend.close()
    assert read_all(client) == b"HTTP/1.0 200 OK\r\n\r\nhello"
    [(got_tag, up, down, failed, ended_at)] = collect(relay, 1)
    assert (got_tag, up, down, failed) == (7, 18, 24, False)
    assert abs(ended_at - time.monotonic()) < 5  # the same clock as time.monotonic()
    client.close()


def test_backend_half_close_first(relay: Relay) -> None:
    """A backend that finishes first (FIN) leaves the client's direction open."""
    client, backend, _ = relay_pair(relay, 1)
    backend.sendall(b"banner\n")
    backend.shutdown(socket.SHUT_WR)
    assert read_all(client) == b"banner\n"
    client.sendall(b"late request")
    client.shutdown(socket.SHUT_WR)
    assert read_all(backend) == b"late request"
    backend.close()
    [(_, up, down, failed, _)] = collect(relay, 1)
    assert (up, down, failed) == (12, 7, False)
    client.close()


def test_large_transfers_both_ways_with_a_slow_reader(relay: Relay) -> None:
    """32 MiB each way at once, the client reading slowly: every byte arrives, in order."""
    client, backend, _ = relay_pair(relay, 2)
    up_data, down_data = os.urandom(32 << 20), os.urandom(32 << 20)
    got: dict[str, bytes] = {}

    def send(s: socket.socket, data: bytes) -> None:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    def slow_read(s: socket.socket, key: str) -> None:
        time.sleep(0.3)  # the relay must stop reading the backend meanwhile, not buffer 32 MiB
        h, n = hashlib.sha256(), 0
        while chunk := s.recv(4096):
            h.update(chunk)
            n += len(chunk)
        got[key] = h.digest() + struct.pack("!Q", n)

    def read(s: socket.socket, key: str) -> None:
        data = read_all(s)
        got[key] = hashlib.sha256(data).digest() + struct.pack("!Q", len(data))

    threads = [threading.Thread(target=f, args=a) for f, a in (
        (send, (client, up_data)), (send, (backend, down_data)),
        (read, (backend, "up")), (slow_read, (client, "down")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got["up"] == hashlib.sha256(up_data).digest() + struct.pack("!Q", len(up_data))
    assert got["down"] == hashlib.sha256(down_data).digest() + struct.pack("!Q", len(down_data))
    [(_, up, down, failed, _)] = collect(relay, 1)
    assert (up, down, failed) == (32 << 20, 32 << 20, False)
    client.close()
    backend.close()


def test_reset_by_one_side_closes_both_and_reports_failed(relay: Relay) -> None:
    client, backend, _ = relay_pair(relay, 3)
    client.sendall(b"x")
    assert backend.recv(1) == b"x"
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    backend.close()  # RST
    [(_, _, _, failed, _)] = collect(relay, 1)
    assert failed is True
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass  # closed either way: EOF or reset
    client.close()


def test_cut_closes_a_pair_now(relay: Relay) -> None:
    client, backend, _ = relay_pair(relay, 4)
    other_client, other_backend, _ = relay_pair(relay, 5)
    relay.cut(4)
    relay.cut(999)  # unknown tags are ignored
    [(tag, _, _, failed, _)] = collect(relay, 1)
    assert (tag, failed) == (4, True)
    assert client.recv(10) == b"" and backend.recv(10) == b""
    other_client.sendall(b"still here")  # the other pair is untouched
    assert other_backend.recv(100) == b"still here"
    for s in (client, backend, other_client, other_backend):
        s.close()


def test_close_closes_open_pairs_and_refuses_more() -> None:
    relay = Relay()
    client, backend, _ = relay_pair(relay, 6)
    relay.close()
    assert client.recv(10) == b"" and backend.recv(10) == b""
    assert relay.collect() == []
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="closed"):
        relay.add(a.fileno(), b.fileno(), 1)
    with pytest.raises(ValueError, match="closed"):
        relay.fileno()
    relay.close()  # idempotent
    for s in (client, backend, a, b):
        s.close()


def test_close_in_the_middle_of_bulk_transfers() -> None:
    """close() while pairs are busy (some waiting for their next turn, some with bytes kept
    for a full socket): every socket is closed and nothing is left running."""
    relay = Relay()
    pairs = [relay_pair(relay, 20 + i) for i in range(8)]
    stop = threading.Event()

    def pump(s: socket.socket) -> None:
        chunk = b"z" * (1 << 20)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                s.sendall(chunk)

    def drain(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while s.recv(1 << 20):
                pass

    threads = []
    for client, backend, _ in pairs:
        threads += [threading.Thread(target=pump, args=(client,)),
                    threading.Thread(target=drain, args=(backend,))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    relay.close()
    stop.set()
    for t in threads:  # the relay's ends are gone: senders get a reset, readers the end
        t.join(10)
        assert not t.is_alive()
    for client, backend, _ in pairs:
        client.close()
        backend.close()


def test_bad_descriptors_are_refused(relay: Relay) -> None:
    with pytest.raises(ValueError, match="two distinct"):
        relay.add(-1, 5, 1)
    a, _ = socket.socketpair()
    with pytest.raises(ValueError, match="two distinct"):
        relay.add(a.fileno(), a.fileno(), 1)


def test_a_stalled_reader_stops_the_relay_reading(relay: Relay) -> None:
    """A client that reads nothing: the backend can only send what the socket buffers and the
    relay's bounded buffer hold, not its 64 MiB."""
    client, backend, _ = relay_pair(relay, 8)
    backend.setblocking(False)
    chunk, sent = b"x" * (1 << 20), 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and sent < 64 << 20:
        try:
            sent += backend.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    # Loopback buffers autotune up to a few MiB each (four sockets on the way), plus at most
    # 1 MiB in the relay: far less than 64 MiB.
    assert 0 < sent < 32 << 20, sent
    backend.setblocking(True)
    client.close()
    backend.close()


def test_many_pairs_at_once(relay: Relay) -> None:
    """200 concurrent pairs (800 descriptors), each echoing through its own backend, all
    reported once."""
    pairs = [relay_pair(relay, 1000 + i) for i in range(200)]
    for i, (client, _, _) in enumerate(pairs):
        client.sendall(b"ping %d" % i)
    for i, (_, backend, _) in enumerate(pairs):
        assert backend.recv(100) == b"ping %d" % i
        backend.sendall(b"pong %d" % i)
    for i, (client, backend, _) in enumerate(pairs):
        assert client.recv(100) == b"pong %d" % i
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
    done = collect(relay, len(pairs))
    assert sorted(t for t, *_ in done) == [tag for _, _, tag in pairs]
    assert all(not failed for *_, failed, _ in done)
    for client, backend, _ in pairs:
        client.close()
        backend.close()


def test_idle_pairs_are_closed_after_the_idle_timeout() -> None:
    """With idle_timeout, a pair with no bytes either way for that long is closed (reported
    failed); one with traffic is kept, and goes the same way once it falls silent."""
    relay = Relay(idle_timeout=0.5)
    try:
        quiet_client, quiet_backend, _ = relay_pair(relay, 30)
        busy_client, busy_backend, _ = relay_pair(relay, 31)
        t0 = time.monotonic()
        done: list[tuple[int, int, int, bool, float]] = []
        while time.monotonic() - t0 < 1.5:  # three timeouts' worth of steady traffic
            busy_client.sendall(b"ping")
            assert busy_backend.recv(10) == b"ping"
            done += relay.collect()
            time.sleep(0.05)
        [(tag, _, _, failed, ended_at)] = done
        assert (tag, failed) == (30, True)
        assert 0.5 <= ended_at - t0 < 1.5
        assert quiet_client.recv(10) == b"" and quiet_backend.recv(10) == b""
        busy_client.sendall(b"still")  # the busy pair is untouched
        assert busy_backend.recv(10) == b"still"
        [(tag, _, _, failed, _)] = collect(relay, 1)  # now silent: closed in turn
        assert (tag, failed) == (31, True)
    finally:
        relay.close()
    for s in (quiet_client, quiet_backend, busy_client, busy_backend):
        s.close()
    with pytest.raises(ValueError, match="idle_timeout"):
        Relay(idle_timeout=-1)
