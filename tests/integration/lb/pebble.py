"""Pebble, Let's Encrypt's ACME test server, on loopback for tests (Debian package ``pebble``).

``run_pebble`` starts ``/usr/bin/pebble-challtestsrv`` as the DNS server only (every name
resolves to 127.0.0.1, no AAAA) and ``/usr/bin/pebble`` with a config whose ``httpPort`` is
where the test answers HTTP-01 (``ChallengeServer``) and whose HTTPS certificate, for
localhost, is made here with trustme (the package ships none)::

    with ChallengeServer(store.get) as answers, run_pebble(tmp_path, answers.port) as pebble:
        issuer = AcmeIssuer(pebble.directory_url, ca_bundle=str(pebble.ca_bundle), email=None,
                            account_key_path=tmp_path / "acme" / "account.key")
        cert = issuer.issue(["shop.test"], key_pem, store)
        pebble.verify(cert.fullchain_pem, "shop.test")

Pebble's ACME directory listens on ``address`` (127.0.0.1 by default; the multi-host tests
give the bridge's address, which their hosts reach), its certificate naming localhost,
127.0.0.1 and that address; its validator fetches HTTP-01 answers from ``http_port`` of
whatever address a name resolves to (``Pebble.resolve``).

Pebble runs with ``PEBBLE_VA_NOSLEEP=1`` (validates at once), rejects ``nonce_reject`` % of
good nonces (its default 5), reuses valid authorizations ``authz_reuse`` % of the time (0
here, so that each order is validated), and issues certificates valid ``validity_s`` seconds
(its default: 5 years). Each start makes a new root CA: ``root_pem()`` fetches it from the
management interface (``/roots/0``).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store

from conftest import require
from corral.testing import free_port
from integration.lb._harness import stop

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


def require_pebble() -> None:
    """Skip (fail under CI=true) without Debian's pebble package."""
    require(all(os.access(p, os.X_OK) for p in (PEBBLE, CHALLTESTSRV)),
            "needs Debian's pebble package (apt-get install pebble; scripts/setup.sh)")


@dataclass
class Pebble:
    """A running Pebble: where its ACME directory is and what to trust."""

    directory_url: str
    ca_bundle: Path  # PEM of the CA that signed Pebble's HTTPS certificate (for the client)
    management_url: str
    http_port: int  # where Pebble's validator fetches HTTP-01 answers (127.0.0.1 unless resolved)
    dns_port: int
    workdir: Path
    dns_management_url: str = ""  # challtestsrv's management API

    def resolve(self, host: str, address: str) -> None:
        """Make the DNS server answer ``host`` with ``address`` (IPv4) from now on, instead
        of 127.0.0.1 (e.g. to make a validation fail: nothing answers there)."""
        body = json.dumps({"host": host.rstrip(".") + ".", "addresses": [address]}).encode()
        req = urllib.request.Request(self.dns_management_url + "/add-a", data=body,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def _get(self, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(self.management_url + path, context=ctx,
                                    timeout=5) as r:
            data: bytes = r.read()
            return data

    def root_pem(self) -> bytes:
        """Pebble's root CA (made at its start)."""
        return self._get("/roots/0")

    def verify(self, fullchain_pem: bytes, domain: str) -> list[x509.Certificate]:
        """Verify ``fullchain_pem`` for ``domain`` up to Pebble's root (RFC 5280 and the
        Web PKI's rules, as cryptography's verifier checks them); returns the built chain."""
        root = x509.load_pem_x509_certificate(self.root_pem())
        leaf, *intermediates = x509.load_pem_x509_certificates(fullchain_pem)
        verifier = PolicyBuilder().store(Store([root])).build_server_verifier(DNSName(domain))
        return verifier.verify(leaf, intermediates)

    def log(self) -> str:
        """What Pebble and its DNS server printed so far."""
        return "".join(p.read_text(errors="replace") for p in
                       (self.workdir / "pebble.log", self.workdir / "challtestsrv.log")
                       if p.exists())


def _free_tcp_udp_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the DNS server takes both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, logfile: Path,
              timeout: float = 10.0, address: str = "127.0.0.1") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{logfile.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port}:\n{logfile.read_text()}")


@contextlib.contextmanager
def run_pebble(workdir: Path, http_port: int, *, nonce_reject: int = 5, authz_reuse: int = 0,
               validity_s: int | None = None, env: dict[str, str] | None = None,
               address: str = "127.0.0.1") -> Iterator[Pebble]:
    """Start challtestsrv (DNS) and Pebble; stop both on exit. See the module docstring."""
    require_pebble()
    workdir = Path(workdir) / "pebble"
    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*dict.fromkeys(("localhost", "127.0.0.1", address)))
    server.private_key_pem.write_to_path(str(workdir / "localhost.key"))
    server.cert_chain_pems[0].write_to_path(str(workdir / "localhost.pem"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    acme_port, mgmt_port, dns_port, cts_mgmt = (free_port(), free_port(),
                                                _free_tcp_udp_port(), free_port())
    config: dict[str, object] = {
        "listenAddress": f"{address}:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(workdir / "localhost.pem"),
        "privateKey": str(workdir / "localhost.key"),
        "httpPort": http_port,
        "tlsPort": free_port(),  # TLS-ALPN-01: unused
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_s is not None:
        config["certificateValidityPeriod"] = validity_s
    (workdir / "pebble.json").write_text(json.dumps({"pebble": config}, indent=2))

    dns_log = open(workdir / "challtestsrv.log", "wb")
    pebble_log = open(workdir / "pebble.log", "wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dns = subprocess.Popen(
            [CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{cts_mgmt}"],
            stdout=dns_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(dns)
        _wait_tcp(dns_port, dns, "pebble-challtestsrv", workdir / "challtestsrv.log")
        penv = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_WFE_NONCEREJECT": str(nonce_reject),
                "PEBBLE_AUTHZREUSE": str(authz_reuse), **(env or {})}
        peb = subprocess.Popen(
            [PEBBLE, "-config", str(workdir / "pebble.json"),
             "-dnsserver", f"127.0.0.1:{dns_port}"],
            stdout=pebble_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=penv,
            cwd=workdir)
        procs.append(peb)
        _wait_tcp(acme_port, peb, "pebble", workdir / "pebble.log", address=address)
        _wait_tcp(mgmt_port, peb, "pebble (management)", workdir / "pebble.log")
        name = "localhost" if address == "127.0.0.1" else address
        yield Pebble(directory_url=f"https://{name}:{acme_port}/dir",
                     ca_bundle=workdir / "ca.pem",
                     management_url=f"https://localhost:{mgmt_port}",
                     http_port=http_port, dns_port=dns_port, workdir=workdir,
                     dns_management_url=f"http://127.0.0.1:{cts_mgmt}")
    finally:
        for p in reversed(procs):
            stop(p)
        dns_log.close()
        pebble_log.close()


@dataclass
class ChallengeServer:
    """HTTP on 127.0.0.1 answering ``GET /.well-known/acme-challenge/<token>`` from
    ``lookup`` (e.g. ``ChallengeStore.get``), as the lb's :80 frontend does; with ``fail``
    set it answers 404 to everything. ``requests`` records (Host, path) of each request."""

    lookup: Callable[[str], str | None]
    port: int = 0
    fail: bool = False
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None

    def __enter__(self) -> ChallengeServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.headers.get("Host", ""), self.path))
                prefix = "/.well-known/acme-challenge/"
                answer = None
                if self.path.startswith(prefix) and not outer.fail:
                    answer = outer.lookup(self.path[len(prefix):])
                body = (answer or "no such challenge\n").encode()
                self.send_response(200 if answer is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="challenge-server").start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
