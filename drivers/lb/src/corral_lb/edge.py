"""The host's shared HTTP and HTTPS frontends: every app's domains, routed by Host and SNI.

An app with ``[lb] domains`` is served on the host's HTTP frontend (``http_port``, default
80) and, with ``tls``, on its HTTPS frontend (``https_port``, default 443), next to every
other app with domains; requests are routed by Host (and the TLS handshake by SNI). Each
domain has one holder on the host: the kernel claims it in the deploy's ledger transaction.

The HTTP frontend also answers ACME HTTP-01 challenges (``/.well-known/acme-challenge/``)
for the certificates being ordered, and redirects an app's plain HTTP requests to HTTPS
(308) once its certificate is valid (``redirect_https``); until then the app is served over
HTTP and its certificate state says why. The HTTPS frontend terminates TLS with the
certificate the SNI names (``corral_lb.tls``); a new or renewed certificate is swapped in for
new handshakes while open connections keep theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from corral_lb.forwarded import Forwarding
from corral_lb.proxy_http import HttpFrontend
from corral_lb.sections import TlsFiles
from corral_lb.service import Service

log = structlog.get_logger("corral_lb")

ACME_PATH = b"/.well-known/acme-challenge/"


@dataclass
class EdgeSettings:
    """The host's ``[drivers.lb] config`` keys for the shared frontends."""

    address: str = "0.0.0.0"  # noqa: S104 - the shared frontends face the world by design
    http_port: int = 80
    https_port: int = 443
    forwarding: Forwarding = field(default_factory=Forwarding)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EdgeSettings:
        """Read ``edge_address``, ``http_port``, ``https_port``, ``forwarded`` and
        ``trusted_proxies``; a bad value raises ValueError naming the key."""
        out = cls()
        out.address = str(config.get("edge_address", out.address))
        for key in ("http_port", "https_port"):
            value = config.get(key, getattr(out, key))
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ValueError(f"[drivers.lb] config: {key}: expected a port 1..65535, "
                                 f"got {value!r}")
            setattr(out, key, value)
        trusted = config.get("trusted_proxies", [])
        if not isinstance(trusted, list) or not all(isinstance(t, str) for t in trusted):
            raise ValueError("[drivers.lb] config: trusted_proxies: expected a list of "
                             'address ranges such as "10.0.0.0/8"')
        try:
            out.forwarding = Forwarding(str(config.get("forwarded", "x-forwarded")), trusted)
        except ValueError as exc:
            raise ValueError(f"[drivers.lb] config: {exc}") from None
        return out


@dataclass
class Site:
    """One app on the shared frontends."""

    service: Service
    domains: list[str]
    tls: str | TlsFiles | None
    redirect: bool
    secure: bool = False  # its certificate is in service on the HTTPS frontend


def response(status: int, reason: str, body: bytes = b"", headers: tuple[bytes, ...] = (),
             ) -> bytes:
    """A whole HTTP/1.1 response the frontend answers by itself."""
    head = [b"HTTP/1.1 %d %s" % (status, reason.encode()),
            b"Content-Length: %d" % len(body), *headers]
    if body:
        head.append(b"Content-Type: text/plain; charset=utf-8")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Edge:
    """The shared frontends and the sites on them.

    ``challenge(token)`` answers ACME HTTP-01 challenges; ``open_socket(key, host, port)``
    returns a listening socket (kept across driver restarts when the driver has a keeper);
    ``new_frontend(**kwargs)`` makes an ``HttpFrontend`` with the host's limits."""

    def __init__(self, settings: EdgeSettings, *,
                 challenge: Callable[[str], str | None],
                 new_frontend: Callable[..., HttpFrontend],
                 start_frontend: Callable[[HttpFrontend, str, str, int], Awaitable[None]],
                 stop_frontend: Callable[[HttpFrontend, str], Awaitable[None]] | None = None,
                 ssl_context: Any = None) -> None:
        self.settings = settings
        self.challenge = challenge
        self.new_frontend = new_frontend
        self.start_frontend = start_frontend
        self.stop_frontend = stop_frontend
        self.ssl_context = ssl_context
        self.sites: dict[str, Site] = {}
        self.http: HttpFrontend | None = None
        self.https: HttpFrontend | None = None
        self._lock = asyncio.Lock()

    async def add(self, service: Service) -> None:
        """Serve ``service`` under its domains (over HTTPS too when it has ``tls``)."""
        cfg = service.config
        async with self._lock:
            taken = {d: s.service.app for s in self.sites.values() if s.service is not service
                     for d in s.domains}
            clash = sorted(d for d in cfg.domains if d in taken)
            if clash:  # the ledger claim makes this unreachable through the kernel
                raise ValueError(f"domain {clash[0]!r} is served for app {taken[clash[0]]!r}")
            site = Site(service, list(cfg.domains), cfg.tls, cfg.redirect_https)
            old = self.sites.get(service.app)
            if old is not None:
                site.secure = old.secure
                await self._unroute(old)
            self.sites[service.app] = site
            if self.http is None:
                http = self.new_frontend(forwarding=self.settings.forwarding, scheme=b"http",
                                         strict=True, intercept=self._on_http)
                await self.start_frontend(http, "edge:http", self.settings.address,
                                          self.settings.http_port)
                self.http = http
            self.http.add(service, site.domains)
            if site.tls is not None:
                if self.https is None:
                    https = self.new_frontend(forwarding=self.settings.forwarding,
                                              scheme=b"https", strict=True,
                                              ssl_context=self.ssl_context)
                    await self.start_frontend(https, "edge:https", self.settings.address,
                                              self.settings.https_port)
                    self.https = https
                self.https.add(service, site.domains)
        log.info("site on the shared frontends", app=service.app, domains=site.domains,
                 tls=bool(site.tls))

    async def remove(self, app: str) -> None:
        """Stop serving the app's domains; close a shared frontend no site uses."""
        async with self._lock:
            site = self.sites.pop(app, None)
            if site is None:
                return
            await self._unroute(site)
            # a frontend no site uses is closed for good (its kept socket released)
            if self.https is not None and not self.https.routes:
                https, self.https = self.https, None
                await self._stop(https, "edge:https")
            if self.http is not None and not self.http.routes:
                http, self.http = self.http, None
                await self._stop(http, "edge:http")

    async def _stop(self, frontend: HttpFrontend, key: str) -> None:
        if self.stop_frontend is not None:
            await self.stop_frontend(frontend, key)
        else:
            await frontend.close()

    async def _unroute(self, site: Site) -> None:
        for frontend in (self.http, self.https):
            if frontend is not None:
                frontend.remove(site.service)

    def set_secure(self, app: str, secure: bool) -> None:
        """The app's certificate is (or is no longer) in service: redirect HTTP or not."""
        site = self.sites.get(app)
        if site is not None:
            site.secure = secure
            if self.http is not None:
                self.http.generation += 1  # cached routing of keep-alive clients is stale

    async def close(self) -> None:
        """Close both frontends."""
        for frontend in (self.http, self.https):
            if frontend is not None:
                await frontend.close()
        self.http = self.https = None
        self.sites.clear()

    # -- answered at the edge ----------------------------------------------------------------

    def _on_http(self, head: bytes, host: bytes, service: Service | None) -> bytes | None:
        target = head[head.find(b" ") + 1:head.find(b" HTTP/")]
        if target.startswith(ACME_PATH):
            token = target[len(ACME_PATH):].decode("ascii", "replace")
            answer = self.challenge(token) if token.isascii() and "/" not in token else None
            if answer is None:
                return response(404, "Not Found", b"no such challenge\n")
            return response(200, "OK", answer.encode(),
                             (b"Content-Type: application/octet-stream",))
        if service is None:
            return None
        site = self.sites.get(service.app)
        if site is None or not (site.tls is not None and site.redirect and site.secure):
            return None
        name = host.rsplit(b":", 1)[0] if not host.startswith(b"[") else host
        port = self.settings.https_port
        location = b"https://" + name + (b":%d" % port if port != 443 else b"") + target
        return response(308, "Permanent Redirect", b"", (b"Location: " + location,))

    def metrics(self) -> dict[str, Any]:
        """The shared frontends' connection figures."""
        return {name: fe.metrics() for name, fe in (("http", self.http), ("https", self.https))
                if fe is not None}
