"""HTTPS for real domains, for real: the host's shared HTTP and HTTPS frontends, routed by Host
and SNI, certificates from Pebble (Let's Encrypt's ACME test server, on loopback) with the
HTTP-01 challenge answered on the shared HTTP frontend, forwarded headers, renewal under load,
a failing challenge, kill -9 of the lb driver in the middle of an order, and the bad inputs.

challtestsrv answers every name with 127.0.0.1, so Pebble's validator reaches the shared
HTTP frontend, which listens on 127.0.0.1 only in these tests (a name pointed elsewhere, on
127.0.0.2, finds nothing there: a failing challenge).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from corral.testing import KernelProcess, free_port, new_net_host, running_kernel, wait_for
from e2e.test_lb_deployed import WEB, require_net
from e2e.test_releases import app_dir
from integration.lb.pebble import Pebble, run_pebble

pytestmark = pytest.mark.root

DRIVERS = ("net", "fs", "lb", "log")

# WEB answering "<instance> <X-Forwarded-For> <X-Forwarded-Proto> <X-Forwarded-Host>"
_BODY = 'body = (f"{iid} {version}\\n" if self.path != "/healthz" else "ok\\n").encode()'
assert _BODY in WEB
FWD_WEB = WEB.replace(_BODY, 'h = self.headers\n        body = (f"{iid} '
                      '{h.get(\'X-Forwarded-For\')} {h.get(\'X-Forwarded-Proto\')} '
                      '{h.get(\'X-Forwarded-Host\')}\\n" if self.path != "/healthz" '
                      'else "ok\\n").encode()')


class Edge:
    """A kernel whose lb serves the shared frontends on free ports of 127.0.0.1, ordering
    certificates from ``pebble``."""

    def __init__(self, k: KernelProcess, pebble: Pebble, http_port: int, https_port: int,
                 base: Path) -> None:
        self.k, self.pebble, self.http_port, self.https_port = k, pebble, http_port, https_port
        self.base = base

    def app(self, name: str, lb: str, *, instances: int = 1) -> Path:
        return app_dir(self.base / name, name, FWD_WEB, textwrap.dedent('''
            [lb]
            mode = "http"
            health = { http = "/healthz", interval = "0.5s" }
        ''') + textwrap.dedent(lb), instances=instances)

    def up(self, d: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = self.k.cli("up", str(d), timeout=120)
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    def certs(self, app: str | None = None) -> list[dict[str, Any]]:
        r = self.k.cli("certs", *([app] if app else []), "--json")
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))

    def wait_state(self, app: str, state: str, timeout: float = 30) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for c in self.certs(app):
                if c["state"] == state:
                    return c
            return None
        return wait_for(found, timeout, what=f"certificate of {app} {state}")

    def tls(self, name: str) -> ssl.SSLSocket:
        """A TLS connection to the shared HTTPS frontend with SNI ``name``, verified against
        Pebble's root."""
        ctx = ssl.create_default_context(cadata=self.pebble.root_pem().decode())
        sock = socket.create_connection(("127.0.0.1", self.https_port), timeout=10)
        return ctx.wrap_socket(sock, server_hostname=name)

    def https_get(self, name: str, path: str = "/", headers: str = "") -> tuple[str, str]:
        """(status line + headers, body) of one request over a fresh TLS connection."""
        with self.tls(name) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n"
                      f"{headers}\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        return head, body

    def http_get(self, name: str, path: str = "/", headers: dict[str, str] | None = None
                 ) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        conn.request("GET", path, headers={"Host": name, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    require_net()
    base = Path(tempfile.mkdtemp(prefix="corral-e2e-https-", dir="/tmp"))
    base.chmod(0o755)
    http_port, https_port = free_port(), free_port()
    try:
        with run_pebble(base, http_port) as pebble:
            host = new_net_host()
            lb = (f'config = {{ nft_table = "{host.lb_table}", http_port = {http_port}, '
                  f'https_port = {https_port}, edge_address = "127.0.0.1", '
                  f'acme_directory = "{pebble.directory_url}", '
                  f'acme_ca_bundle = "{pebble.ca_bundle}" }}')
            toml = host.host_toml(DRIVERS).replace(
                f'config = {{ nft_table = "{host.lb_table}" }}', lb)
            assert lb in toml
            with running_kernel(base / "k", toml, drivers=DRIVERS) as k:
                yield Edge(k, pebble, http_port, https_port, base)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_two_apps_share_the_https_frontend_each_with_its_own_certificate(edge: Edge) -> None:
    """shop (two domains) and blog get certificates from the ACME directory; a real TLS
    client gets each app's own certificate by SNI, verified against Pebble's root; plain HTTP
    to shop is redirected to HTTPS, blog (redirect_https = false) is served over HTTP too;
    `corral certs` says valid with the issuer and expiry."""
    shop = edge.app("shop", 'domains = ["shop.test", "www.shop.test"]\ntls = "auto"\n'
                    "hsts = true\n")
    blog = edge.app("blog", 'domains = ["blog.test"]\ntls = "auto"\nredirect_https = false\n')
    edge.up(shop)
    edge.up(blog)
    s = edge.wait_state("shop", "valid")
    b = edge.wait_state("blog", "valid")
    assert s["domains"] == ["shop.test", "www.shop.test"] and "Pebble" in s["issuer"]
    assert s["serial"] != b["serial"] and s["not_after"]
    seen = {}
    for name in ("shop.test", "www.shop.test", "blog.test"):
        with edge.tls(name) as conn:
            cert = conn.getpeercert()
            seen[name] = sorted(v for k, v in cert["subjectAltName"] if k == "DNS")
            assert conn.version() in ("TLSv1.3", "TLSv1.2")
    assert seen["shop.test"] == seen["www.shop.test"] == ["shop.test", "www.shop.test"]
    assert seen["blog.test"] == ["blog.test"]
    head, body = edge.https_get("www.shop.test")
    assert head.startswith("HTTP/1.1 200") and body.startswith("shop.web.1"), (head, body)
    assert "Strict-Transport-Security: max-age=31536000" in head
    r = edge.http_get("shop.test", "/path?q=1")
    assert r.status == 308
    assert r.getheader("Location") == f"https://shop.test:{edge.https_port}/path?q=1"
    r = edge.http_get("blog.test")
    assert r.status == 200
    head, body = edge.https_get("blog.test")
    assert body.startswith("blog.web.1") and "Strict-Transport-Security" not in head
    # an unknown name is not served
    assert edge.http_get("nobody.test").status == 404
    with pytest.raises(ssl.SSLError):
        edge.tls("nobody.test").close()
    text = edge.k.cli("certs").stdout
    assert "shop.test, www.shop.test" in text and "valid" in text
    ps = edge.k.cli("ps").stdout
    assert f"lb.tls=valid-until-{s['not_after'][:10]}" in ps, ps


def test_backends_get_forwarded_headers_and_never_a_client_sent_one(edge: Edge) -> None:
    """X-Forwarded-For is the client's address (a client-sent value dropped), -Proto says
    https or http, -Host the name asked for."""
    d = edge.app("fwd", 'domains = ["fwd.test"]\ntls = "auto"\nredirect_https = false\n')
    edge.up(d)
    edge.wait_state("fwd", "valid")
    _, body = edge.https_get("fwd.test", headers="X-Forwarded-For: 6.6.6.6\r\n"
                             "X-Forwarded-Proto: gopher\r\n")
    assert body.split() == ["fwd.web.1", "127.0.0.1", "https", "fwd.test"], body
    conn = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
    conn.request("GET", "/", headers={"Host": "fwd.test", "X-Forwarded-For": "6.6.6.6"})
    body = conn.getresponse().read().decode()
    assert body.split() == ["fwd.web.1", "127.0.0.1", "http", "fwd.test"], body


class TlsLoad:
    """Threads sending keep-alive HTTPS requests (and every tenth a new connection) to one
    name until stopped, counting answers and failures."""

    def __init__(self, edge: Edge, name: str, threads: int = 4) -> None:
        self.edge, self.name = edge, name
        self.ok = 0
        self.failures: list[str] = []
        self.serials: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> TlsLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set():
            try:
                if conn is None or n % 10 == 0:
                    if conn is not None:
                        conn.close()
                    tls = self.edge.tls(self.name)
                    der = tls.getpeercert(binary_form=True) or b""
                    self.serials.add(str(hash(der)))
                    conn = http.client.HTTPConnection(self.name, self.edge.https_port,
                                                      timeout=10)
                    conn.sock = tls
                conn.request("GET", "/", headers={"Host": self.name})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise ConnectionError(f"status {resp.status}")
                self.ok += 1
                n += 1
            except (OSError, ConnectionError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn = None


def test_renewal_under_load_swaps_the_certificate_without_a_failed_request(edge: Edge) -> None:
    """A forced renewal (`corral query lb renew`) while clients keep requesting over HTTPS:
    a new certificate (new serial) is served to new handshakes, and no request fails."""
    d = edge.app("renew", 'domains = ["renew.test"]\ntls = "auto"\n', instances=2)
    edge.up(d)
    before = edge.wait_state("renew", "valid")
    with TlsLoad(edge, "renew.test") as load:
        wait_for(lambda: load.ok > 50, 20, what="load running")
        r = edge.k.cli("query", "lb", "renew", json.dumps({"app": "renew"}))
        assert r.returncode == 0, r.stderr
        after = json.loads(r.stdout)
        assert after["state"] == "valid" and after["serial"] != before["serial"], after
        ok = load.ok
        wait_for(lambda: load.ok > ok + 50, 20, what="load after the renewal")
    assert load.failures == [], load.failures[:5]
    assert len(load.serials) == 2, "new handshakes did not get the renewed certificate"


def test_a_failing_challenge_keeps_http_serving_and_says_why(edge: Edge) -> None:
    """A domain the CA cannot reach us at: the certificate is failing with the CA's reason
    (in `corral certs` and as an event), and the app is served over HTTP meanwhile."""
    edge.pebble.resolve("broken.test", "127.0.0.2")  # nothing listens there
    d = edge.app("broken", 'domains = ["broken.test"]\ntls = "auto"\n')
    edge.up(d)
    c = edge.wait_state("broken", "failing")
    assert "broken.test" in c["last_error"] and c["next_attempt"], c
    r = edge.http_get("broken.test")
    assert r.status == 200  # no certificate yet: served over HTTP, not redirected
    text = edge.k.cli("certs", "broken").stdout
    assert "failing" in text and "broken.test" in text
    assert "lb.tls=failing" in edge.k.cli("ps").stdout


def test_kill9_of_the_lb_driver_in_the_middle_of_an_order_then_a_clean_finish(
        public_dir: Path) -> None:
    """Pebble validates after a delay; the lb driver is killed (-9) while the order is
    pending; the restarted driver orders again and the certificate ends valid."""
    require_net()
    http_port, https_port = free_port(), free_port()
    with run_pebble(public_dir, http_port,
                    env={"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3"}) as pebble:
        host = new_net_host()
        lb = (f'config = {{ nft_table = "{host.lb_table}", http_port = {http_port}, '
              f'https_port = {https_port}, edge_address = "127.0.0.1", '
              f'acme_directory = "{pebble.directory_url}", '
              f'acme_ca_bundle = "{pebble.ca_bundle}" }}')
        toml = host.host_toml(DRIVERS).replace(f'config = {{ nft_table = "{host.lb_table}" }}',
                                               lb)
        with running_kernel(public_dir / "k", toml, drivers=DRIVERS) as k:
            e = Edge(k, pebble, http_port, https_port, public_dir)
            d = e.app("slow", 'domains = ["slow.test"]\ntls = "auto"\n')
            e.up(d)
            e.wait_state("slow", "pending", timeout=10)
            lb_pid = next(x["pid"] for x in k.call("drivers.list")["drivers"]
                          if x["name"] == "lb")
            os.kill(lb_pid, signal.SIGKILL)
            wait_for(lambda: any(x["name"] == "lb" and x["pid"] != lb_pid
                                 and x["state"] == "running"
                                 for x in k.call("drivers.list")["drivers"]), 30,
                     what="lb restarted")
            c = e.wait_state("slow", "valid", timeout=60)
            assert c["domains"] == ["slow.test"]
            head, body = e.https_get("slow.test")
            assert head.startswith("HTTP/1.1 200") and body.startswith("slow.web.1")


def test_bad_domains_certificates_and_conflicts_are_refused_at_check(edge: Edge) -> None:
    """A domain another app holds (the holder named), a name that is no domain, tls without
    domains, a cert/key pair that does not match, a key that cannot be read: `corral check`
    and `corral up` refuse (exit 2 or 1) saying which, and nothing is claimed."""
    holder = edge.app("holder", 'domains = ["held.test"]\n')
    edge.up(holder)
    taker = edge.app("taker", 'domains = ["held.test"]\n')
    r = edge.up(taker, ok=False)
    assert r.returncode != 0 and "held.test" in r.stderr and "holder" in r.stderr, r.stderr
    for i, (lb, says) in enumerate([
            ('domains = ["shop_.test"]\n', "domain name"),
            ('domains = ["https://x.test"]\n', "domain name"),
            ('domains = ["*.x.test"]\n', "domain name"),
            ('domains = ["10.0.0.1"]\n', "domain name"),
            ('tls = "auto"\nfrontend = ' + str(free_port()) + "\n", "tls is for the domains")]):
        d = edge.app(f"bad{i}", lb)
        r = edge.k.cli("check", str(d))
        assert r.returncode == 2 and says in r.stderr, (lb, r.stderr)
    ca = trustme.CA()
    one, other = ca.issue_cert("pair.test"), ca.issue_cert("pair.test")
    files = edge.base / "files"
    files.mkdir()
    one.cert_chain_pems[0].write_to_path(str(files / "cert.pem"))
    other.private_key_pem.write_to_path(str(files / "other.key"))
    d = edge.app("pair", f'domains = ["pair.test"]\ntls = {{ cert = "{files}/cert.pem", '
                 f'key = "{files}/other.key" }}\n')
    r = edge.k.cli("check", str(d))
    assert r.returncode == 2 and "key does not match the certificate" in r.stderr, r.stderr
    d = edge.app("nokey", f'domains = ["pair.test"]\ntls = {{ cert = "{files}/cert.pem", '
                 f'key = "{files}/missing.key" }}\n')
    r = edge.k.cli("up", str(d))
    assert r.returncode == 2 and "missing.key" in r.stderr, r.stderr
    # the shared frontends' ports are the lb's: an app asking for one is told so
    ports = {r["key"]: r["owner"] for r in edge.k.call("ledger.list", {"kind": "port"})[
        "records"]}
    assert ports.get(str(edge.http_port)) == "driver:lb", ports
    d = edge.app("squatter", f"frontend = {edge.http_port}\n")
    r = edge.up(d, ok=False)
    assert r.returncode != 0 and "lb" in r.stderr and str(edge.http_port) in r.stderr, r.stderr
    r = edge.k.cli("query", "lb", "renew", json.dumps({"app": "holder"}))  # HTTP only
    assert r.returncode != 0 and "has no certificate" in r.stderr, r.stderr
    claimed = {r["key"]: r["owner"] for r in edge.k.call("ledger.list", {"kind": "domain"})[
        "records"]}
    assert claimed.get("held.test") == "holder" and "pair.test" not in claimed


def test_certificates_from_files_are_served_and_reloaded(edge: Edge) -> None:
    """tls = { cert, key }: served by SNI; replacing the files swaps the certificate in for
    new handshakes."""
    ca = trustme.CA()
    files = edge.base / "own-files"
    files.mkdir()

    def write(cert: trustme.LeafCert) -> None:
        cert.cert_chain_pems[0].write_to_path(str(files / "cert.tmp"))
        cert.private_key_pem.write_to_path(str(files / "key.tmp"))
        os.replace(files / "key.tmp", files / "key.pem")
        os.replace(files / "cert.tmp", files / "cert.pem")

    write(ca.issue_cert("own.test"))
    d = edge.app("own", f'domains = ["own.test"]\ntls = {{ cert = "{files}/cert.pem", '
                 f'key = "{files}/key.pem" }}\n')
    edge.up(d)
    edge.wait_state("own", "valid")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def serial() -> int:
        with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname="own.test") as t:
            der = t.getpeercert(binary_form=True)
        from cryptography import x509

        return int(x509.load_der_x509_certificate(der or b"").serial_number)

    first = serial()
    write(ca.issue_cert("own.test"))
    wait_for(lambda: serial() != first, 30, what="the new certificate served")


def test_private_keys_are_root_only_and_never_shown(edge: Edge) -> None:
    """Every key under the lb's home (certificates and the ACME account) is 0600 root; no
    log, listing or event holds any of them."""
    keys = [p for p in (edge.k.home / "lb").rglob("*") if p.is_file()
            and (p.name.endswith(".key") or p.name == "key.pem")]
    assert keys, "no key stored"
    secrets_ = []
    for p in keys:
        st = p.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0), p
        text = p.read_text()
        body = "".join(line for line in text.splitlines() if "-----" not in line)
        secrets_.append(body[10:60])
    shown = [edge.k.cli("certs", "--json").stdout, edge.k.cli("ps", "--json").stdout,
             json.dumps(edge.k.call("ledger.list"))]
    for log in (edge.k.home / "drivers").glob("*.log"):
        shown.append(log.read_text(errors="replace"))
    shown.append(edge.k.log())
    for s in secrets_:
        assert not any(s in text for text in shown)
