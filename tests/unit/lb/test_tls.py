"""corral_lb.tls over real loopback TLS: the intermediate policy, SNI routing, swaps.

A server on the default asyncio loop and on uvloop (the driver's) accepts with
``connect_accepted_socket(..., ssl=router.context)`` and answers each read with
``<sni>|<alpn>|<what it read>``; clients are blocking ``ssl`` sockets in the test's thread.
Certificates come from a trustme CA, with ECDSA P-256 keys.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from cryptography.hazmat.primitives import serialization

from corral_lb import tls
from corral_lb.tls import SniRouter, server_context

HANDSHAKE_TIMEOUT = 1.0


class Pki:
    def __init__(self) -> None:
        self.ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        self.leaves = {name: self.ca.issue_cert(name, key_type=trustme.KeyType.ECDSA)
                       for name in ("a.test", "b.test", "*.w.test", "default.test")}
        self.a2 = self.ca.issue_cert("a.test", key_type=trustme.KeyType.ECDSA)  # a renewal

    @staticmethod
    def pems(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
        chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
        return chain, leaf.private_key_pem.bytes()

    def context(self, leaf: trustme.LeafCert) -> ssl.SSLContext:
        return server_context(*self.pems(leaf))

    @staticmethod
    def der(leaf: trustme.LeafCert) -> bytes:
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    def client(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A verifying client; it offers http/1.1 by ALPN unless told otherwise."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(["http/1.1"] if alpn is None else alpn)
        return ctx


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.obj = transport.get_extra_info("ssl_object")
        Server.last_transport = transport

    def data_received(self, data: bytes) -> None:
        head = f"{tls.sni(self.transport)}|{self.obj.selected_alpn_protocol()}|".encode()
        self.transport.write(head + data)


class Server:
    """An accept loop on its own thread: ``sock_accept`` then ``connect_accepted_socket``."""

    last_transport: asyncio.BaseTransport | None = None

    def __init__(self, kind: str, router: SniRouter) -> None:
        self.kind = kind
        self.router = router
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda _loop, _ctx: None)  # refused handshakes
        self.refused: list[BaseException] = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.acceptor = asyncio.run_coroutine_threadsafe(self._accept(), self.loop)

    async def _accept(self) -> None:
        while True:
            sock, _ = await self.loop.sock_accept(self.lsock)
            self.loop.create_task(self._setup(sock))

    async def _setup(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                Echo, sock, ssl=self.router.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError) as e:
            self.refused.append(e)
            sock.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.acceptor.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.lsock.close()

    def connect(self, name: str | None, ctx: ssl.SSLContext,
                **kw: Any) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        try:
            return ctx.wrap_socket(raw, server_hostname=name, **kw)
        except BaseException:
            raw.close()
            raise


def ask(s: ssl.SSLSocket, data: bytes = b"ping") -> bytes:
    s.sendall(data)
    return s.recv(4096)


def san(s: ssl.SSLSocket) -> tuple[tuple[str, str], ...]:
    cert = s.getpeercert()
    assert cert is not None
    return cert["subjectAltName"]  # type: ignore[return-value]


def lax_client(**kw: Any) -> ssl.SSLContext:
    """A client that does not verify and that may offer old versions and ciphers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(params=["asyncio", "uvloop"])
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Server]:
    router = SniRouter()
    for name in ("a.test", "b.test", "*.w.test"):
        router.set(name, pki.context(pki.leaves[name]))
    srv = Server(request.param, router)
    yield srv
    srv.close()


def test_each_name_gets_its_own_certificate(server: Server, pki: Pki) -> None:
    """The certificate follows the SNI name; the protocol learns the name through sni()."""
    client = pki.client()
    for name in ("a.test", "b.test"):
        with server.connect(name, client) as s:
            assert san(s) == (("DNS", name),)
            assert ask(s) == f"{name}|http/1.1|ping".encode()
            assert s.version() in ("TLSv1.3", "TLSv1.2")


def test_sni_is_recorded_in_lower_case(server: Server, pki: Pki) -> None:
    """A client may send the name in any case: the router and sni() see it lowered."""
    with server.connect("A.Test", pki.client()) as s:
        assert ask(s) == b"a.test|http/1.1|ping"


def test_uvloop_uses_its_own_ssl_protocol(server: Server, pki: Pki) -> None:
    """On uvloop the TLS transport is uvloop's (its Cython sslproto), not asyncio's."""
    with server.connect("a.test", pki.client()) as s:
        ask(s)
        module = type(Server.last_transport).__module__
    assert module.startswith("uvloop" if server.kind == "uvloop" else "asyncio")


def test_a_wildcard_matches_one_label(server: Server, pki: Pki) -> None:
    """*.w.test serves x.w.test, but neither w.test nor y.x.w.test."""
    with server.connect("x.w.test", pki.client()) as s:
        assert san(s) == (("DNS", "*.w.test"),)
        assert ask(s) == b"x.w.test|http/1.1|ping"
    for name in ("w.test", "y.x.w.test"):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            server.connect(name, lax_client())


def test_an_unknown_name_is_refused_with_unrecognized_name(server: Server, pki: Pki) -> None:
    """No certificate for the name: the handshake fails with the unrecognized_name alert."""
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        server.connect("c.test", pki.client())


def test_no_sni_is_refused_unless_a_default_is_named(server: Server, pki: Pki) -> None:
    """Without SNI the router refuses, or serves its default context if it has one."""
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        server.connect(None, lax_client())
    server.router.default = pki.context(pki.leaves["default.test"])
    with server.connect(None, lax_client()) as s:
        assert ask(s) == b"None|None|ping"  # no SNI, no ALPN
        assert s.getpeercert(binary_form=True) == pki.der(pki.leaves["default.test"])
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):  # unknown names still
        server.connect("c.test", pki.client())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(server: Server, version: ssl.TLSVersion) -> None:
    """A client that can speak the old version (security level 0) is refused by the server."""
    kw = {"minimum_version": ssl.TLSVersion.TLSv1}
    old = lax_client(maximum_version=version, **kw)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
        server.connect("a.test", old)
    control = lax_client(maximum_version=ssl.TLSVersion.TLSv1_2, **kw)  # same client, 1.2
    control.set_ciphers("DEFAULT:@SECLEVEL=0")
    with server.connect("a.test", control) as s:
        assert s.version() == "TLSv1.2"


@pytest.mark.parametrize("cipher", [
    "AES128-SHA",  # RSA key exchange
    "ECDHE-ECDSA-AES128-SHA",  # CBC with SHA-1
    "ECDHE-ECDSA-AES128-SHA256",  # CBC
    "ECDHE-ECDSA-AES256-CCM",  # not in the list
])
def test_tls_1_2_ciphers_outside_intermediate_are_refused(server: Server, cipher: str) -> None:
    """A TLS 1.2 client offering only a cipher outside Mozilla's intermediate list fails."""
    ctx = lax_client(maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(cipher + ":@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"):
        server.connect("a.test", ctx)


def test_tls_1_2_follows_the_clients_cipher_order(server: Server) -> None:
    """Server preference is off (Mozilla intermediate): the client's first choice wins."""
    for first, second in (("ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                          ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305")):
        ctx = lax_client(maximum_version=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(f"{first}:{second}")
        with server.connect("a.test", ctx) as s:
            cipher = s.cipher()
            assert cipher is not None and cipher[0] == first and s.version() == "TLSv1.2"


def handshake_in_memory(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """A handshake between two SSLObjects through memory buffers; raises if it fails."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out, server_hostname="a.test")
    pending = [cli, srv]
    for _ in range(10):
        for obj in list(pending):
            try:
                obj.do_handshake()
                pending.remove(obj)
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if not pending:
            return
    raise AssertionError("the handshake did not finish")


def test_key_exchange_groups_are_x25519_p256_p384(server: Server, pki: Pki,
                                                  tmp_path: Path) -> None:
    """A TLS 1.3 client offering only P-521 or X448 finds no shared group, where OpenSSL's
    own defaults would have taken them."""
    if not tls._set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)):
        pytest.skip("this Python/OpenSSL cannot restrict the groups: OpenSSL's defaults stay")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for path, data in zip((cert, key), pki.pems(pki.leaves["a.test"]), strict=True):
        path.write_bytes(data)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the control: no group policy
    plain.load_cert_chain(cert, key)
    for curve, ok in (("secp521r1", False), ("X448", False), ("prime256v1", True),
                      ("secp384r1", True), ("X25519", True)):
        ctx = lax_client(maximum_version=ssl.TLSVersion.TLSv1_3)
        ctx.set_ecdh_curve(curve)
        handshake_in_memory(plain, ctx)
        if ok:
            with server.connect("a.test", ctx) as s:
                assert ask(s).endswith(b"ping") and s.version() == "TLSv1.3"
        else:
            with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
                server.connect("a.test", ctx)


def test_a_client_that_ignores_the_alert_is_closed_by_the_handshake_timeout(
        server: Server) -> None:
    """The alert goes out before the failure is raised; a client that stays is cut off."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = lax_client().wrap_bio(c_in, c_out, server_hostname="c.test")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(c_out.read())
        # a plaintext alert record: fatal (2), unrecognized_name (112)
        assert raw.recv(100) == bytes([21, 3, 3, 0, 2, 2, 112])
        start = time.monotonic()
        assert raw.recv(100) == b""
        assert time.monotonic() - start < HANDSHAKE_TIMEOUT + 2


def test_alpn_selects_http_1_1(server: Server, pki: Pki) -> None:
    """A client offering h2 and http/1.1 gets http/1.1; one without ALPN gets none."""
    with server.connect("a.test", pki.client(["h2", "http/1.1"])) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert ask(s) == b"a.test|http/1.1|ping"
    with server.connect("a.test", pki.client([])) as s:
        assert s.selected_alpn_protocol() is None
        assert ask(s) == b"a.test|None|ping"


def test_a_swap_keeps_open_connections_and_serves_new_ones_the_new_cert(
        server: Server, pki: Pki) -> None:
    """set() swaps the certificate for new handshakes; an open connection keeps its own."""
    client = pki.client()
    old = server.connect("a.test", client)
    assert ask(old) == b"a.test|http/1.1|ping"
    assert old.getpeercert(binary_form=True) == pki.der(pki.leaves["a.test"])
    server.router.set(["a.test"], pki.context(pki.a2))
    with server.connect("a.test", client) as new:
        assert new.getpeercert(binary_form=True) == pki.der(pki.a2)
        assert ask(new) == b"a.test|http/1.1|ping"
    assert ask(old, b"still") == b"a.test|http/1.1|still"
    assert old.getpeercert(binary_form=True) == pki.der(pki.leaves["a.test"])
    server.router.remove("a.test")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        server.connect("a.test", client)
    assert ask(old, b"after") == b"a.test|http/1.1|after"
    old.close()


def test_sessions_resume_until_the_ticket_keys_rotate(server: Server, pki: Pki) -> None:
    """A TLS 1.3 ticket resumes the session; after rotate_ticket_keys() it no longer does."""
    client = pki.client()
    with server.connect("a.test", client) as first:
        ask(first)  # reads the NewSessionTicket messages too
        session = first.session
    with server.connect("a.test", client, session=session) as again:
        assert again.session_reused and ask(again) == b"a.test|http/1.1|ping"
    server.router.rotate_ticket_keys()
    with server.connect("a.test", client, session=session) as after:
        assert not after.session_reused and ask(after) == b"a.test|http/1.1|ping"


# -- without a server --------------------------------------------------------------------------

def test_lookup_prefers_exact_names_and_rejects_malformed_ones(pki: Pki) -> None:
    """Exact beats wildcard; a name is stored lower case without a trailing dot."""
    router = SniRouter()
    exact, wild = pki.context(pki.leaves["a.test"]), pki.context(pki.leaves["*.w.test"])
    router.set(["*.W.test.", "x.w.test"], wild)
    router.set("x.w.test", exact)
    assert router.lookup("X.w.test") is exact
    assert router.lookup("y.w.test") is wild
    assert router.lookup("w.test") is None
    assert sorted(router.names) == ["*.w.test", "x.w.test"]
    for bad in ("", "a..test", "*", "*.", "a.*.test", "x*.test", "*.*.test", "é.test"):
        with pytest.raises(ValueError):
            router.set(bad, exact)


def test_server_context_leaves_no_file_and_refuses_bad_keys(pki: Pki) -> None:
    """Keys are read from memory files closed at once; a wrong or encrypted key is refused."""
    fds = len(os.listdir("/proc/self/fd"))
    cert, key = pki.pems(pki.leaves["a.test"])
    ctx = server_context(cert, key)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    _, other_key = pki.pems(pki.leaves["b.test"])
    with pytest.raises(ssl.SSLError):
        server_context(cert, other_key)
    private = serialization.load_pem_private_key(key, password=None)
    locked = private.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ValueError, match="encrypted"):
        server_context(cert, locked)
    assert len(os.listdir("/proc/self/fd")) == fds
