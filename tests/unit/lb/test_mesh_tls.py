"""TLS across the routing mesh (``corral_lb.mesh_tls``) against the fake cluster kernel of
``_cluster`` (which seals ``certificate`` values with the real ``Channel``, as the kernel
does): the home publishes its certificates, every other host serves them on its shared HTTPS
frontend, a new home imports them, and every host answers the ACME challenges of an order."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from structlog.testing import capture_logs

from corral.ledger import Claim, HostView
from corral.protocol import AppAttach, AppDetach, StateSync
from corral.testing import free_port
from corral_lb import mesh_tls
from corral_lb.driver import LbDriver
from corral_lb.mesh_tls import certificate_value
from unit.lb._cluster import Cluster, ClusterKernel, app_spec, lb_section

DOMAIN = "shop.example.com"
UNREACHABLE_CA = "https://127.0.0.1:9/dir"  # an order would fail at once (none must start)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def pair(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
    """(full chain PEM, key PEM) of a trustme certificate."""
    return (b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes())


def serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


def secret(key_pem: bytes) -> str:
    """A piece of a private key that would give it away wherever it showed up."""
    return key_pem.decode().splitlines()[1][:40]


def write_files(d: Path, leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
    cert, key = pair(leaf)
    (d / "key.pem").write_bytes(key)
    (d / "cert.pem").write_bytes(cert)
    return cert, key


def tls_serial(port: int, name: str, ca: trustme.CA) -> int:
    """The serial of the certificate the HTTPS frontend on ``port`` gives for SNI ``name``,
    verified against ``ca``; ``ssl.SSLError`` when the handshake is refused. Blocks."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=name) as t:
        der = t.getpeercert(binary_form=True) or b""
    return x509.load_der_x509_certificate(der).serial_number


def https_get(port: int, name: str, ca: trustme.CA) -> tuple[int, bytes]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                server_hostname=name)
    conn.request("GET", "/", headers={"Host": name})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def http_get(port: int, host: str, path: str = "/") -> tuple[int, str | None, bytes]:
    """(status, Location, body) of a plain HTTP GET. Blocks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("Location"), body


async def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def backend(body: bytes) -> tuple[asyncio.Server, int]:
    """An HTTP backend on loopback answering ``body`` to every request."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def tls_lb(tls: Any = "auto", **extra: Any) -> dict[str, Any]:
    """shop's [lb]: HTTP behind DOMAIN on the shared frontends, with ``tls``."""
    return lb_section("shop.test", None, domains=[DOMAIN], tls=tls, **extra)


def shown(d: LbDriver, kernel: ClusterKernel, answers: list[Any]) -> str:
    """Everything the driver has told the world: its query answers and events."""
    return json.dumps([*answers, kernel.events], default=str)


# -- the home publishes -----------------------------------------------------------------------


def test_a_certificate_in_service_is_published_sealed_replaced_and_released(
        cluster: Cluster, ca: trustme.CA, tmp_path: Path) -> None:
    """A certificate going into service for an app homed here (files mode) is claimed as
    certificate/<app> (owner the app) with its PEMs, domains and expiry; the ledger itself
    holds it sealed; a round with nothing changed claims nothing; a renewal replaces it; the
    app's tls removed, it is released; claimed again and the app detached, released."""
    files = tmp_path / "files"
    files.mkdir()
    cert, key = write_files(files, ca.issue_cert(DOMAIN))
    d, kernel = cluster.edge_driver("h1", free_port(), free_port())
    tls = {"cert": str(files / "cert.pem"), "key": str(files / "key.pem")}
    shop = app_spec("shop", tls_lb(tls))
    answers: list[Any] = []

    def certificate_claims() -> int:
        return sum(1 for c in kernel.claims if c[1] == "certificate")

    async def main() -> None:
        assert d.certs is not None
        with capture_logs() as logs:
            await d.attach(AppAttach(app=shop))
            await until(lambda: (d.certs.state("shop") or {}).get("state") == "valid",
                        "files loaded")
            await d.mesh.tick()
            owner, value = cluster.certificates()["shop"]
            assert owner == "shop@h1"
            assert value["cert"] == cert.decode() and value["key"] == key.decode()
            assert value["domains"] == [DOMAIN] and value["mode"] == "files"
            assert int(value["serial"], 16) == serial(cert) and value["not_after"]
            stored = cluster.stored("certificate")["shop"][1]
            assert list(stored) == ["sealed"] and secret(key) not in json.dumps(stored)

            claims = certificate_claims()
            await d.mesh.tick()
            assert certificate_claims() == claims  # unchanged: not claimed again

            cert2, key2 = write_files(files, ca.issue_cert(DOMAIN))
            await d.certs.renew("shop")
            await d.mesh.tick()
            assert cluster.certificates()["shop"][1]["key"] == key2.decode()
            assert int(cluster.certificates()["shop"][1]["serial"], 16) == serial(cert2)
            answers.extend([await d.status({}), await d.stats({}), await d.certs_status({})])

            await d.attach(AppAttach(app=app_spec("shop", tls_lb(None))))  # tls removed
            await d.mesh.tick()
            assert "shop" not in cluster.certificates()

            await d.attach(AppAttach(app=shop))
            await until(lambda: "shop" in d.mesh.certs.wanted, "in service again")
            await d.mesh.tick()
            assert "shop" in cluster.certificates()
            await d.detach(AppDetach(app="shop"))
            await d.mesh.tick()
            assert cluster.certificates() == {}
            await d.stop()
        text = shown(d, kernel, answers) + json.dumps(logs, default=str)
        assert secret(key) not in text and secret(key2) not in text

    run(main)


def test_a_publication_that_fails_is_tried_again_by_the_next_round(
        cluster: Cluster, ca: trustme.CA, tmp_path: Path) -> None:
    """While the ledger does not answer, the certificate is served here all the same and not
    published; the first round after it answers again publishes it."""
    files = tmp_path / "files"
    files.mkdir()
    cert, _ = write_files(files, ca.issue_cert(DOMAIN))
    https = free_port()
    d, kernel = cluster.edge_driver("h1", free_port(), https)
    tls = {"cert": str(files / "cert.pem"), "key": str(files / "key.pem")}

    async def main() -> None:
        await d.attach(AppAttach(app=app_spec("shop", tls_lb(tls))))
        kernel.unavailable = True  # after the attach, which claims the shared ports
        await until(lambda: "shop" in d.mesh.certs.wanted, "in service")
        await d.mesh.tick()
        assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert)
        assert cluster.certificates() == {}
        kernel.unavailable = False
        await d.mesh.tick()
        assert int(cluster.certificates()["shop"][1]["serial"], 16) == serial(cert)
        await d.stop()

    run(main)


@pytest.mark.parametrize("kernel_is", ["without a cluster key", "from before sealing"])
def test_a_kernel_that_cannot_seal_gets_no_key_said_once_and_it_is_served_here(
        cluster: Cluster, ca: trustme.CA, tmp_path: Path, kernel_is: str) -> None:
    """A kernel without a cluster key refuses the claim; one from before sealing
    (``kernel.status`` lists no ``sealed_kinds``) would keep the record as it came, key and
    all, so the lb claims nothing. Either way the lb says so once, claims no more (until the
    next state.sync, where it asks again) and still serves the certificate here."""
    files = tmp_path / "files"
    files.mkdir()
    write_files(files, ca.issue_cert(DOMAIN))
    https = free_port()
    keyed = kernel_is != "without a cluster key"
    d, kernel = cluster.edge_driver("h1", free_port(), https, keyed=keyed)
    kernel.seals = kernel_is != "from before sealing"  # without a key: listed, refused
    why = "cluster_key" if not keyed else "does not seal"
    tls = {"cert": str(files / "cert.pem"), "key": str(files / "key.pem")}

    async def main() -> None:
        assert d.certs is not None
        with capture_logs() as logs:
            await d.attach(AppAttach(app=app_spec("shop", tls_lb(tls))))
            await until(lambda: "shop" in d.mesh.certs.wanted, "in service")
            for _ in range(3):
                await d.mesh.tick()
        said = [e for e in logs if e["event"].startswith("certificates not shared")]
        assert len(said) == 1 and why in said[0]["reason"], logs
        assert cluster.certificates() == {} and d.mesh.certs.refused
        assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca)  # served here all the same
        await d.sync(StateSync(apps=[app_spec("shop", tls_lb(tls))], instances=[]))
        assert d.mesh.certs.refused  # asked again after the sync, refused again
        assert cluster.certificates() == {}
        await d.stop()

    run(main)


# -- the other hosts serve ----------------------------------------------------------------------


def test_another_hosts_certificate_is_served_replaced_skipped_when_broken_and_removed(
        cluster: Cluster, ca: trustme.CA) -> None:
    """h3 serves h1's app: with h1's certificate record, the app's domain is served over HTTPS
    on h3's shared HTTPS frontend (verified by a real client) and HTTP is redirected; status
    shows the certificate's facts; a renewed record replaces it; a record whose key does not
    match is logged once and skipped (the previous one stays); the record gone, the handshake
    is refused and HTTP no longer redirected. No key in any answer, event or log."""
    http_port, https = free_port(), free_port()
    d, kernel = cluster.edge_driver("h3", http_port, https)
    cluster.alive("h1")
    first, renewed = ca.issue_cert(DOMAIN), ca.issue_cert(DOMAIN)
    cert, key = pair(first)
    cert2, key2 = pair(renewed)
    answers: list[Any] = []

    async def main() -> None:
        server, port = await backend(b"shop\n")
        cluster.publish("h1", "shop", 1, "127.0.0.1", port, tls_lb())
        with capture_logs() as logs:
            await d.mesh.tick()  # served, over HTTP only: no certificate yet
            assert d.mesh.serves("shop")
            status, location, _ = await asyncio.to_thread(http_get, http_port, DOMAIN)
            assert location is None
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(tls_serial, https, DOMAIN, ca)

            cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert, key,
                                                                mode="auto"))
            await d.mesh.tick()
            assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert)
            await until(lambda: d.balancer.service("shop").eligible, "backend healthy")
            assert await asyncio.to_thread(https_get, https, DOMAIN, ca) == (200, b"shop\n")
            status, location, _ = await asyncio.to_thread(http_get, http_port, DOMAIN, "/a?b")
            assert (status, location) == (308, f"https://{DOMAIN}:{https}/a?b")
            svc = (await d.status({"app": "shop"}))["services"][0]
            assert svc["remote"] is True and svc["certificate"]["home"] == "h1"
            assert int(svc["certificate"]["serial"], 16) == serial(cert)
            assert svc["certificate"]["domains"] == [DOMAIN]
            assert (await d.stats({}))["apps"]["shop"]["tls"].startswith("valid-until-")

            cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert2, key2,
                                                                mode="auto"))
            await d.mesh.tick()
            assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert2)
            answers.extend([await d.status({}), await d.stats({}), await d.certs_status({})])

            cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert, key2,
                                                                mode="auto"))
            await d.mesh.tick()
            await d.mesh.tick()
            assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert2)

            cluster.uncertify("h1", "shop")
            await d.mesh.tick()
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(tls_serial, https, DOMAIN, ca)
            status, location, body = await asyncio.to_thread(http_get, http_port, DOMAIN)
            assert (status, location, body) == (200, None, b"shop\n")
            assert "certificate" not in (await d.status({"app": "shop"}))["services"][0]
        skipped = [e for e in logs if e["event"].startswith("another host's certificate not "
                                                             "served")]
        assert len(skipped) == 1 and "key does not match" in skipped[0]["error"], skipped
        text = shown(d, kernel, answers) + json.dumps(logs, default=str)
        assert secret(key) not in text and secret(key2) not in text
        await d.stop()
        server.close()

    run(main)


def test_a_certificate_not_covering_every_domain_is_served_for_those_it_covers(
        cluster: Cluster, ca: trustme.CA) -> None:
    """Two domains, a record covering one: that one is served over HTTPS, HTTP is not
    redirected (it would send clients of the other to a name refused over TLS)."""
    http_port, https = free_port(), free_port()
    d, _ = cluster.edge_driver("h3", http_port, https)
    cluster.alive("h1")
    cluster.publish("h1", "shop", 1, "127.0.0.1", free_port(),
                    lb_section("shop.test", None, domains=[DOMAIN, "www.example.com"],
                               tls="auto"))
    cert, key = pair(ca.issue_cert(DOMAIN))
    cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert, key, mode="auto"))

    async def main() -> None:
        await d.mesh.tick()
        assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert)
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls_serial, https, "www.example.com", ca)
        assert d.balancer.edge is not None
        assert d.balancer.edge.sites["shop"].secure is False  # HTTP is not redirected
        await d.stop()

    run(main)


def test_a_share_of_an_app_homed_elsewhere_orders_nothing_and_serves_its_homes_certificate(
        cluster: Cluster, ca: trustme.CA) -> None:
    """A spread app's share run here (its satellite record, the kernel's) is attached as a
    local app: no certificate is ordered for it here (query.lb.certs shows none), its home's
    is served on this host's HTTPS frontend; detached, it leaves."""
    http_port, https = free_port(), free_port()
    d, _ = cluster.edge_driver("h3", http_port, https, acme_directory=UNREACHABLE_CA)
    cert, key = pair(ca.issue_cert(DOMAIN))
    cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert, key, mode="auto"))
    cluster.satellite("h3", "shop", "h1")

    async def main() -> None:
        assert d.certs is not None
        await d.attach(AppAttach(app=app_spec("shop", tls_lb())))
        await d.mesh.tick()
        assert d.certs.state("shop") is None and (await d.certs_status({})) == {"certs": []}
        assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert)
        assert (await asyncio.to_thread(http_get, http_port, DOMAIN))[0] == 308
        await d.detach(AppDetach(app="shop"))
        assert d.mesh.certs.served == {} and DOMAIN not in d.sni.names
        assert "shop" in cluster.certificates()  # its home's: never released from here
        await d.stop()

    run(main)


def test_a_new_home_imports_the_certificate_record_instead_of_ordering(
        cluster: Cluster, ca: trustme.CA) -> None:
    """After an adoption (the record's owner moved to h3), h3's lb attaching the app with an
    empty store imports the record (valid at once, stored, served, not ordered, not claimed
    again); a record that does not cover the app's domains is not imported."""
    https = free_port()
    d, kernel = cluster.edge_driver("h3", free_port(), https, acme_directory=UNREACHABLE_CA)
    cert, key = pair(ca.issue_cert(DOMAIN))
    cluster.certificate("h1", "shop", certificate_value([DOMAIN], cert, key, mode="auto"))
    cluster.adopt_certificate("shop", "h1", "h3")
    other, okey = pair(ca.issue_cert("elsewhere.example.com"))
    cluster.certificate("h1", "blog", certificate_value(["elsewhere.example.com"], other, okey,
                                                        mode="auto"))

    async def main() -> None:
        assert d.certs is not None
        await d.attach(AppAttach(app=app_spec("shop", tls_lb())))
        state = d.certs.state("shop")
        assert state is not None and state["state"] == "valid", state
        assert int(state["serial"], 16) == serial(cert) and state["failures"] == 0
        stored = d.certs.store.load("shop")
        assert stored is not None and stored.key_pem == key
        assert await asyncio.to_thread(tls_serial, https, DOMAIN, ca) == serial(cert)
        await d.mesh.tick()
        await asyncio.sleep(0.2)
        assert d.certs.state("shop")["state"] == "valid"  # type: ignore[index]
        assert not [c for c in kernel.claims if c[1] == "certificate"]  # the same record
        assert cluster.certificates()["shop"][0] == "shop@h3"

        blog = lb_section("blog.test", None, domains=["blog.example.com"], tls="auto")
        await d.attach(AppAttach(app=app_spec("blog", blog)))
        assert d.certs.store.load("blog") is None  # not imported: it would not serve
        await d.stop()

    run(main)


# -- ACME challenges, answered by every host ----------------------------------------------------


def test_a_token_put_on_one_host_is_answered_by_another_before_put_returns(
        cluster: Cluster) -> None:
    """h1's put claims acme-challenge/<token> and returns once h3 (serving a domain app, so
    its shared HTTP frontend is open) has acknowledged it (<token>@h3); h3 answers the token
    on its HTTP frontend; remove releases it, then h3 forgets it and its acknowledgement."""
    d1, _ = cluster.driver("h1")
    http_port = free_port()
    d3, _ = cluster.edge_driver("h3", http_port, free_port())
    cluster.publish("h1", "shop", 1, "127.0.0.1", free_port(), tls_lb())

    async def main() -> None:
        await d1.mesh.tick()
        await d3.mesh.tick()  # serves shop: its HTTP frontend is open

        async def rounds() -> None:
            while True:
                await d3.mesh.tick()
                await asyncio.sleep(0.05)

        ticking = asyncio.ensure_future(rounds())
        t0 = time.monotonic()
        await asyncio.to_thread(d1.mesh.tokens.put, "tok-1", "tok-1.thumb")
        assert time.monotonic() - t0 < mesh_tls.ACK_WAIT_S / 2
        records = cluster.challenges()
        assert records["tok-1"] == ("driver:lb@h1", {"key_authorization": "tok-1.thumb"})
        assert records["tok-1@h3"][0] == "driver:lb@h3"
        assert d1.mesh.tokens.get("tok-1") == "tok-1.thumb"  # and here, as before
        got = await asyncio.to_thread(http_get, http_port, "shop.example.com",
                                      "/.well-known/acme-challenge/tok-1")
        assert (got[0], got[2]) == (200, b"tok-1.thumb")

        await asyncio.to_thread(d1.mesh.tokens.remove, "tok-1")
        assert "tok-1" not in cluster.challenges()
        await until(lambda: cluster.challenges() == {}, "acknowledgement released")
        got = await asyncio.to_thread(http_get, http_port, "shop.example.com",
                                      "/.well-known/acme-challenge/tok-1")
        assert got[0] == 404
        ticking.cancel()
        await d1.stop()
        await d3.stop()

    run(main)


def test_a_live_host_that_never_acknowledges_delays_the_order_a_bounded_time(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """h2 is alive but runs no lb: put waits ACK_WAIT_S, says which host did not answer,
    and returns (the token stays claimed: h1 answers it); a host whose shared HTTP frontend is
    not open does not acknowledge."""
    monkeypatch.setattr(mesh_tls, "ACK_WAIT_S", 0.6)
    d1, _ = cluster.driver("h1")
    d3, _ = cluster.driver("h3")  # no domain app: no shared HTTP frontend
    cluster.alive("h2")

    async def main() -> None:
        await d1.mesh.tick()
        await d3.mesh.tick()
        with capture_logs() as logs:
            t0 = time.monotonic()
            await asyncio.to_thread(d1.mesh.tokens.put, "tok-2", "tok-2.thumb")
            assert 0.5 < time.monotonic() - t0 < 3
        await d3.mesh.tick()
        assert set(cluster.challenges()) == {"tok-2"}
        said = [e for e in logs if e["event"].startswith("acme challenge not acknowledged")]
        assert len(said) == 1 and said[0]["missing"] == ["h2", "h3"], logs
        assert d3.mesh.tokens.get("tok-2") == "tok-2.thumb"  # learned, not acknowledged
        await d1.stop()
        await d3.stop()

    run(main)


def test_tokens_an_earlier_process_left_are_released(cluster: Cluster) -> None:
    """A token record of this host's lb that no order of this process put (the lb was killed
    in the middle of an order) is released by the first round."""
    d1, _ = cluster.driver("h1")
    HostView(cluster.ledger, "h1").claim("driver:lb", [Claim("acme-challenge", "old", {
        "key_authorization": "old.thumb"})])

    async def main() -> None:
        await d1.mesh.tick()
        assert cluster.challenges() == {}
        await d1.stop()

    run(main)


def test_on_one_host_nothing_is_shared(cluster: Cluster, ca: trustme.CA,
                                       tmp_path: Path) -> None:
    """A ledger of its own: a certificate in service and a token put claim nothing."""
    files = tmp_path / "files"
    files.mkdir()
    write_files(files, ca.issue_cert(DOMAIN))
    d, kernel = cluster.driver("h1", shared=False)

    async def main() -> None:
        d.mesh.tokens.loop = asyncio.get_running_loop()
        await asyncio.to_thread(d.mesh.tokens.put, "tok", "tok.thumb")
        assert d.mesh.tokens.get("tok") == "tok.thumb"
        cert, key = pair(ca.issue_cert(DOMAIN))
        d.mesh.certs.publish("shop", [DOMAIN], cert, key, mode="files")
        await d.mesh.tick()
        await asyncio.sleep(0.05)
        assert set(kernel.calls) == {"kernel.status"}
        await d.stop()

    run(main)
