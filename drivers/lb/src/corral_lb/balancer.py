"""The lb's state: services by app, their frontends on either data plane, and their backends.

The driver's operations map one to one onto ``Balancer`` methods; the Balancer itself knows
nothing of the bus, so it runs the same under corrald, in tests and in benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from corral.errors import ConflictError, NotFoundError
from corral_lb.activation import Activator, OnDemand
from corral_lb.backend import BackendState
from corral_lb.config import (
    HTTP_IDLE_TIMEOUT,
    MAX_BODY_SIZE,
    MAX_CONNECTIONS,
    TCP_IDLE_TIMEOUT,
    LbConfig,
    PolicyProgram,
)
from corral_lb.edge import Edge
from corral_lb.nft import TABLE, NftPlane, established_to, service_key
from corral_lb.policy_program import PolicyProgram as PolicyProgramRunner
from corral_lb.proxy_http import HttpFrontend
from corral_lb.proxy_l4 import L4Frontend, Relay
from corral_lb.service import Service
from corral_lb.sockets import FreshSockets, ListenSockets, http_key, tcp_key

log = structlog.get_logger("corral_lb")

ActivatorFactory = Callable[[str, LbConfig], Activator]


class Balancer:
    """Every balanced service on this host, keyed by app name."""

    def __init__(
        self, *, activators: ActivatorFactory | None = None, runtime_dir: Path | None = None,
        nft: NftPlane | None = None, nft_table: str = TABLE,
    ) -> None:
        self.services: dict[str, Service] = {}  # app -> service
        self.activators = activators
        self._runtime_dir = runtime_dir
        self._own_runtime_dir: Path | None = None  # made here, so removed by close()
        self._nft = nft
        self.nft_table = nft_table  # used when the kernel plane is first needed
        self.nft_owner = ""  # tags this balancer's nft services (see NftPlane.owner)
        self.nft_socket_lb = True  # translate the host's own connections at connect()
        # Proxy timeouts (host config), taken when the relay / an HTTP frontend is created:
        # an L4 connection with no bytes either way, and an HTTP client that has not sent a
        # whole request head since it connected or since its previous response.
        self.tcp_idle_timeout = TCP_IDLE_TIMEOUT
        self.http_idle_timeout = HTTP_IDLE_TIMEOUT
        # Proxy limits (host config), taken when a frontend is created: the largest HTTP
        # request body, and the client connections a frontend keeps open at once.
        self.max_body_size = MAX_BODY_SIZE
        self.max_connections = MAX_CONNECTIONS
        self._http: dict[tuple[str, int], HttpFrontend] = {}
        self._l4: dict[str, L4Frontend] = {}
        self._relay: Relay | None = None  # the L4 proxy's relay thread, started on first use
        self._programs: dict[str, PolicyProgramRunner] = {}
        self._app_dirs: dict[str, str] = {}
        # where frontends get their listening sockets: the driver sets KeptSockets, so they
        # outlive its restarts; fresh ones otherwise (tests, benchmarks, corral dev)
        self.sockets: ListenSockets = FreshSockets()
        # the host's shared HTTP/HTTPS frontends (apps with domains); set by the driver
        self.edge: Edge | None = None

    @property
    def runtime_dir(self) -> Path:
        """Where policy programs' sockets live: the driver's ``<runtime>/lb``, or, when none
        was given (tests, benchmarks), a private temporary directory made on first use and
        removed by ``close``: nothing of the balancer outlives it."""
        if self._runtime_dir is None:
            self._runtime_dir = self._own_runtime_dir = Path(
                tempfile.mkdtemp(prefix="corral-lb-"))
        return self._runtime_dir

    @runtime_dir.setter
    def runtime_dir(self, path: Path) -> None:
        self._runtime_dir = path

    @property
    def nft(self) -> NftPlane:
        """The kernel plane, created on first use (needs root and libnftables)."""
        if self._nft is None:
            self._nft = NftPlane(self.nft_table, owner=self.nft_owner,
                                 socket_lb=self.nft_socket_lb)
        return self._nft

    # -- services ----------------------------------------------------------------------------

    async def attach(self, app: str, config: LbConfig, *, directory: str | None = None) -> Service:
        """Register ``app`` under ``config.name`` and open its frontend (idempotent)."""
        current = self.services.get(app)
        if current is not None:
            if current.config == config:
                return current
            await self.detach(app)
        for other, s in self.services.items():
            if s.name == config.name:
                raise ConflictError(f"lb name {config.name!r} is held by app {other!r}",
                                    kind="lbname", key=config.name, holder=other)
        service = Service(config, app=app)
        self.services[app] = service
        try:
            await self._open_frontend(service)
            if config.activation == "on-demand":
                if self.activators is None:
                    raise NotFoundError(f"app {app!r}: on-demand activation needs an activator")
                OnDemand(service, self.activators(app, config), idle=config.idle,
                         socket_activation=config.socket_activation)
            if isinstance(config.policy, PolicyProgram):
                prog = PolicyProgramRunner(
                    service, config.policy.exec, deadline=config.policy.deadline,
                    endpoint=f"ipc://{self.runtime_dir}/policy-{service_key(config.name)}.sock",
                    cwd=directory,
                )
                await prog.start()
                self._programs[app] = prog
        except BaseException:
            await self.detach(app)
            raise
        log.info("service attached", app=app, name=config.name, plane=config.plane,
                 mode=config.mode, frontend="{}:{}".format(*config.listen))
        return service

    async def _open_frontend(self, service: Service) -> None:
        cfg = service.config
        listen = cfg.listen
        if cfg.plane == "nft":
            nft = self.nft
            await asyncio.to_thread(nft.install, cfg.name, listen, cfg.policy_name)
            name = cfg.name

            def rewrite(s: Service) -> None:
                nft.set_backends(name, s.eligible)

            service.on_change.append(rewrite)
            service.active_probe = established_to
            rewrite(service)
            return
        if cfg.mode == "tcp":
            if self._relay is None:
                self._relay = Relay(idle_timeout=self.tcp_idle_timeout)
            fe = L4Frontend(service, self._relay, max_connections=self.max_connections)
            await self.start_frontend(fe, tcp_key(service.app), *listen)
            self._l4[service.app] = fe
            return
        if cfg.domains:
            if self.edge is None:
                raise NotFoundError(f"app {service.app!r}: domains need the host's shared "
                                    "frontends, which this lb does not run")
            await self.edge.add(service)
        if cfg.frontend is None:
            return
        http = self._http.get(listen)
        if http is None:
            http = self.http_frontend()
            await self.start_frontend(http, http_key(*listen), *listen)
            self._http[listen] = http
        http.add(service)

    async def start_frontend(self, frontend: HttpFrontend | L4Frontend, key: str, host: str,
                             port: int) -> None:
        """Start ``frontend`` on the listening socket ``sockets`` has for ``key`` (the one the
        kernel kept for the previous process, when there is one)."""
        sock = await self.sockets.open(key, host, port)
        try:
            await frontend.start(host, port, sock=sock)
        except BaseException:
            sock.close()
            await self.sockets.release(key)
            raise

    async def close_frontend(self, frontend: HttpFrontend | L4Frontend, key: str) -> None:
        """Close ``frontend`` for good: its socket is no longer kept (``close()`` of the whole
        balancer, when the process stops, closes frontends without this)."""
        await frontend.close()
        await self.sockets.release(key)

    def http_frontend(self, **options: Any) -> HttpFrontend:
        """An HTTP frontend with this host's timeouts and limits (``options``: the shared
        frontends' forwarding, scheme, TLS and routing)."""
        return HttpFrontend(idle_timeout=self.http_idle_timeout,
                            max_body_size=self.max_body_size,
                            max_connections=self.max_connections, **options)

    async def detach(self, app: str) -> None:
        """Close the app's frontend, stop its program and on-demand instance, forget it."""
        service = self.services.pop(app, None)
        if service is None:
            return
        prog = self._programs.pop(app, None)
        if prog is not None:
            await prog.close()
        await service.close()
        cfg = service.config
        if cfg.plane == "nft":
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.nft.uninstall, cfg.name, cfg.listen)
        elif cfg.mode == "tcp":
            fe = self._l4.pop(app, None)
            if fe is not None:
                await self.close_frontend(fe, tcp_key(app))
        else:
            if cfg.domains and self.edge is not None:
                await self.edge.remove(app)
            http = self._http.get(cfg.listen) if cfg.frontend is not None else None
            if http is not None:
                http.remove(service)
                if not http.routes:
                    del self._http[cfg.listen]
                    await self.close_frontend(http, http_key(*cfg.listen))
        log.info("service detached", app=app, name=cfg.name)

    def service(self, app: str) -> Service:
        """The app's service; ``NotFoundError`` names the app otherwise."""
        s = self.services.get(app)
        if s is None:
            raise NotFoundError(f"app {app!r} has no lb service (no [lb] section attached)")
        return s

    # -- backends ----------------------------------------------------------------------------

    async def add_backend(
        self, app: str, backend_id: str, host: str, port: int, *, weight: int = 1,
        wait: float = 0.0,
    ) -> bool:
        """Add a backend; with ``wait`` > 0, wait that long for it to turn healthy."""
        s = self.service(app)
        b = s.add(backend_id, host, port, weight=weight)
        if wait <= 0:
            return b.eligible
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while b.state is not BackendState.HEALTHY:
                    await asyncio.sleep(0.01)
        return b.state is BackendState.HEALTHY

    async def remove_backend(self, app: str, backend_id: str, *, drain: float | None = None
                             ) -> bool:
        """Drain (stop new work, wait for active work up to ``drain`` s) and remove a backend."""
        s = self.services.get(app)
        if s is None:
            return True
        return await s.drain(backend_id, drain)

    # -- reporting -----------------------------------------------------------------------------

    def status(self, app: str | None = None) -> dict[str, Any]:
        """Services (all, or one app's) with backends and their health."""
        apps = [app] if app else sorted(self.services)
        out = []
        for a in apps:
            st = self.service(a).status()
            if st["plane"] == "nft" and self._nft is not None:
                # frontends whose host-originated connects are translated at connect()
                st["socket_lb"] = ["{}:{}".format(*fe)
                                   for fe in self._nft.socket_frontends(st["name"])]
            out.append(st)
        return {"services": out}

    def metrics(self, app: str | None = None) -> dict[str, Any]:
        """Per-backend requests, active connections, latency histogram and 5xx count; and per
        proxy frontend its client connections (an HTTP frontend is shared by the services on
        its port, so they report the same figures)."""
        apps = [app] if app else sorted(self.services)
        out = []
        for a in apps:
            m = self.service(a).metrics()
            cfg = self.services[a].config
            fe: HttpFrontend | L4Frontend | None = (
                self._l4.get(a) if cfg.mode == "tcp" else self._http.get(cfg.listen))
            if fe is not None and cfg.plane == "proxy":
                m["frontend"] = fe.metrics()
            out.append(m)
        result: dict[str, Any] = {"services": out}
        if self.edge is not None and not app:
            result["edge"] = self.edge.metrics()
        return result

    async def close(self) -> None:
        """Detach every service (the nft table's services are removed too). Kept listening
        sockets stay kept: the process stops, its frontends are not gone."""
        self.sockets = FreshSockets()
        for app in list(self.services):
            await self.detach(app)
        if self.edge is not None:
            await self.edge.close()
        if self._nft is not None:
            self._nft.close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._own_runtime_dir is not None:
            shutil.rmtree(self._own_runtime_dir, ignore_errors=True)
            if self._runtime_dir == self._own_runtime_dir:
                self._runtime_dir = None
            self._own_runtime_dir = None
