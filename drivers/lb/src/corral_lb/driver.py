"""The lb driver process: CDP/1 operations mapped onto a ``Balancer``.

The kernel claims the lb name (kind ``lbname``) and the frontend port (kind ``port``) in the
deploy transaction, before ``app.attach``; this driver claims nothing itself for the apps of
its host. On hosts sharing a ledger the routing mesh (``corral_lb.mesh``) records this host's
backends there (kind ``backend``) and serves the other hosts' apps (recording the ports it
serves them on, kind ``lb-frontend``); the certificates of the apps homed here are published
(kind ``certificate``), the other homes' served here, and the ACME challenges of every host
answered by all (kind ``acme-challenge``; ``corral_lb.mesh_tls``).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
import ssl
from collections.abc import Coroutine
from typing import Any

import structlog

from corral.errors import CorralError, ErrorCode
from corral.protocol import AppSpec, InstanceRecord, Welcome
from corral.sdk import Driver, KernelLink, inherited_sockets, op, run
from corral_lb import DRIVER
from corral_lb.acme import AcmeIssuer, ChallengeStore
from corral_lb.activation import OnDemand, StartedInstance
from corral_lb.balancer import Balancer
from corral_lb.certs import CertError, CertManager, CertStore, Mode
from corral_lb.config import LbConfig, load_lb_config, proxy_limits, proxy_timeouts
from corral_lb.edge import Edge, EdgeSettings
from corral_lb.mesh import LocalBackend, Mesh, is_remote
from corral_lb.mesh_tls import ClusterCerts, import_certificate
from corral_lb.nft import TABLE as NFT_TABLE
from corral_lb.proxy_http import HttpFrontend
from corral_lb.sections import TlsFiles
from corral_lb.sockets import KeptSockets
from corral_lb.tls import SniRouter, server_context

log = structlog.get_logger("corral_lb")

EDGE_OWNER = "driver:lb"  # holds the shared frontends' ports in the ledger

class KernelActivator:
    """Starts on-demand instances through the kernel (``instance.spawn``/``instance.stop``)."""

    def __init__(self, kernel: KernelLink, app: str, process: str) -> None:
        self.kernel, self.app, self.process = kernel, app, process

    async def start(self, listen: socket.socket | None) -> StartedInstance:
        """Ask the kernel for one instance; returns once it is launched.

        With ``listen`` the kernel takes a copy of that socket from this process (by pid and
        descriptor number, ``pidfd_getfd``) and hands it to the instance as fd 3
        (``LISTEN_FDS=1``): the backend is the socket's own address, which queues connections
        until the app accepts them."""
        args: dict[str, Any] = {"app": self.app, "process": self.process}
        if listen is not None:
            args["listen_fd"] = {"pid": os.getpid(), "fd": listen.fileno(), "name": "http"}
        reply = await self.kernel.call("instance.spawn", args)
        rec = InstanceRecord.model_validate(reply)
        if listen is not None:
            host, port = listen.getsockname()[:2]
            return StartedInstance(rec.spec.id, host, port, rec)
        if rec.spec.port is None:
            raise CorralError(f"app {self.app!r}: process {self.process!r} has no port",
                              code=ErrorCode.INVALID, retry=False)
        return StartedInstance(rec.spec.id, rec.address, rec.spec.port, rec)

    async def stop(self, instance: StartedInstance) -> None:
        """Ask the kernel to stop the instance and release it."""
        await self.kernel.call("instance.stop", {"instance_id": instance.id})


class LbDriver(Driver):
    """Load balancer: userspace proxy (L4 and HTTP) and nftables DNAT behind one contract."""

    name = "lb"
    capability = "lb"
    description = DRIVER  # its [section]s, checked by manifest.check
    features = frozenset({"listen_sockets"})
    version = "0.1.0"

    def __init__(self) -> None:
        super().__init__()
        self.balancer = Balancer(activators=self._activator, runtime_dir=None)
        self._configs: dict[str, LbConfig] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.sockets: KeptSockets | None = None  # frontend sockets kept by the kernel
        # the shared frontends' certificates: ACME answers, SNI routing, the manager
        self.challenges = ChallengeStore()
        self.sni = SniRouter()
        self.edge_settings = EdgeSettings()
        self.certs: CertManager | None = None
        # other hosts' instances, apps, certificates and ACME challenges, on hosts sharing a
        # ledger (idle on one host)
        self.mesh = Mesh(lambda: self.kernel, self.balancer, self._configs,
                         default_plane=lambda: str(self.config.get("plane", "proxy")),
                         ready=self._welcomed_link, sni=self.sni, challenges=self.challenges)

    def _welcomed_link(self) -> bool:
        """Whether the kernel link may carry requests (its WELCOME is in); the mesh's rounds
        (not started by a request of the kernel's) wait for it. Another link (a test's fake
        kernel) is taken as welcomed."""
        return not isinstance(self.kernel, KernelLink) or self.kernel.welcomed

    def _activator(self, app: str, config: LbConfig) -> KernelActivator:
        return KernelActivator(self.kernel, app, config.process or "web")

    def _config(self, app: AppSpec) -> LbConfig | None:
        section = app.manifest.get("lb")
        if not section:
            return None
        return load_lb_config(section, app=app.name,
                              default_plane=str(self.config.get("plane", "proxy")))

    # The SDK may dispatch a request that arrived right behind WELCOME before it has handed
    # the driver its config (see the report on corral.sdk): every operation waits for it, so
    # nothing ever runs with the defaults instead of this host's settings.
    def welcomed(self, welcome: Welcome) -> None:
        """Take the host config (``plane``: default plane, ``nft_table``: this driver's table,
        ``socket_lb``: translate the host's own connections to nft frontends at connect(),
        ``tcp_idle_timeout``/``http_idle_timeout``: the proxy's timeouts,
        ``max_body_size``/``max_connections_per_frontend``: its limits); operations may run
        from now on."""
        super().welcomed(welcome)
        self.balancer.nft_table = str(self.config.get("nft_table", NFT_TABLE))
        self.balancer.nft_socket_lb = bool(self.config.get("socket_lb", True))
        self.balancer.tcp_idle_timeout, self.balancer.http_idle_timeout = proxy_timeouts(
            self.config)
        self.balancer.max_body_size, self.balancer.max_connections = proxy_limits(self.config)
        # this kernel's services, told apart from other kernels' in a shared table
        self.balancer.nft_owner = hashlib.blake2b(str(self.home).encode(),
                                                  digest_size=6).hexdigest()
        # the shared HTTP/HTTPS frontends (``http_port``, ``https_port``, ``edge_address``,
        # ``forwarded``, ``trusted_proxies``) and ACME (``acme_directory``, ``acme_ca_bundle``,
        # ``acme_email``): made once per process (WELCOME comes again after a kernel restart;
        # the frontends and certificates of this process go on)
        if self.balancer.edge is not None:
            return
        try:
            self.edge_settings = EdgeSettings.from_config(self.config)
        except ValueError as exc:
            raise CorralError(str(exc), code=ErrorCode.INVALID, retry=False) from None
        self.balancer.edge = Edge(
            self.edge_settings, challenge=self.mesh.tokens.get,
            new_frontend=self.balancer.http_frontend, start_frontend=self._start_frontend,
            stop_frontend=self._stop_frontend, ssl_context=lambda: self.sni.context)
        directory = self.config.get("acme_directory")
        issuer = None
        if directory:
            issuer = AcmeIssuer(str(directory), ca_bundle=self.config.get("acme_ca_bundle"),
                                email=self.config.get("acme_email"),
                                account_key_path=self.home / "lb" / "acme" / "account.key")
        # certificates: stored ones are served again at once, orders start as apps attach;
        # on a shared ledger every host answers the challenges (mesh.tokens)
        self.certs = CertManager(CertStore(self.home / "lb" / "certs"), issuer=issuer,
                                 challenges=self.mesh.tokens, on_change=self._cert_changed,
                                 on_state=self._cert_state)

    async def start(self) -> None:
        """Keep sockets of policy programs under the runtime directory; open frontends on
        sockets the kernel keeps across restarts (taking back those it kept for the previous
        process, whose open-connection counts it finds in ``<runtime>/lb/connections``)."""
        rd = self.runtime_dir / "lb"
        rd.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.balancer.runtime_dir = rd
        self.sockets = KeptSockets(self.kernel, rd / "connections",
                                   inherited=inherited_sockets())
        self.balancer.sockets = self.sockets
        self.mesh.start()

    async def _start_frontend(self, frontend: HttpFrontend, key: str, host: str, port: int
                              ) -> None:
        """Open a shared frontend's listening socket (``key`` names it across restarts),
        its port claimed in the ledger for the lb (an app asking for it is told who holds
        it; a port an app holds makes this fail, naming the app)."""
        claim = {"kind": "port", "key": str(port), "value": {"name": key}}
        await self.kernel.call("ledger.claim", {"owner": EDGE_OWNER, "claims": [claim]})
        try:
            await self.balancer.start_frontend(frontend, key, host, port)
        except BaseException:
            await self._release_port(port)
            raise

    async def _stop_frontend(self, frontend: HttpFrontend, key: str) -> None:
        """Close a shared frontend for good and release its port."""
        port = int(frontend.listen.rsplit(":", 1)[1]) if frontend.listen else 0
        await self.balancer.close_frontend(frontend, key)
        if port:
            await self._release_port(port)

    async def _release_port(self, port: int) -> None:
        try:
            await self.kernel.call("ledger.release", {"owner": EDGE_OWNER,
                                                      "keys": [["port", str(port)]]})
        except CorralError as exc:
            log.warning("shared port not released", port=port, error=exc.reason)

    async def _cert_changed(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        """A certificate (new, renewed, reloaded) goes into service for new handshakes, and
        to the other hosts (on a shared ledger)."""
        cfg = self._configs.get(name)
        if cfg is None:
            return
        ctx = await asyncio.to_thread(server_context, cert_pem, key_pem)
        self.sni.set(cfg.domains, ctx)
        if self.balancer.edge is not None:
            self.balancer.edge.set_secure(name, True)
        self.mesh.certs.publish(name, cfg.domains, cert_pem, key_pem,
                                mode="auto" if cfg.tls == "auto" else "files")

    async def _cert_state(self, name: str, state: dict[str, Any]) -> None:
        """Tell the world (``app.<app>.cert.<state>``): valid, pending or failing. A
        certificate no longer in service (expired) stops the redirect to HTTPS."""
        if self.balancer.edge is not None and not state.get("serving"):
            self.balancer.edge.set_secure(name, False)
        try:
            await self.kernel.call("event.publish", {
                "topic": f"app.{name}.cert.{state.get('state', 'unknown')}",
                "data": {k: v for k, v in state.items() if k in (
                    "domains", "issuer", "not_after", "state", "last_error", "next_attempt")}})
        except CorralError as exc:
            log.warning("certificate event not published", app=name, error=exc.reason)

    def _secure_if_serving(self, app: str) -> None:
        state = self.certs.state(app) if self.certs is not None else None
        if self.balancer.edge is not None and state is not None and state.get("serving"):
            self.balancer.edge.set_secure(app, True)

    async def _want_certificate(self, app: str, cfg: LbConfig,
                                cluster: ClusterCerts | None = None) -> None:
        """Serve ``app``'s certificate: its own (ordered, stored or from files), or, for a
        share of an app homed on another host (``cluster``: read now when not given), its
        home's; after an adoption, the certificate its home before published is imported
        rather than ordered."""
        if self.certs is None or not cfg.domains:
            return
        if cfg.tls is None:
            await self._drop_certificate(app)
            return
        if cluster is None:
            cluster = await self.mesh.certs.view()
        if app in cluster.followed:  # its home orders it, and publishes it for this host
            if self.certs.state(app) is not None:  # homed here until now
                await self.certs.drop(app)
                self.sni.remove(cfg.domains)
            self.mesh.certs.follow(app)
            return
        try:
            await self._want_own_certificate(app, cfg, cluster)
        finally:  # its home's until now (it was adopted here): served until its own is in
            self.mesh.certs.unfollow(app)

    async def _want_own_certificate(self, app: str, cfg: LbConfig, cluster: ClusterCerts
                                    ) -> None:
        assert self.certs is not None
        assert cfg.tls is not None
        mode: Mode = ("auto" if cfg.tls == "auto" else
                      ("files", cfg.tls.cert, cfg.tls.key))
        if isinstance(cfg.tls, TlsFiles):  # in service now; the manager reloads on change
            try:
                cert_pem, key_pem = await asyncio.to_thread(_read_pair, cfg.tls)
                self.sni.set(cfg.domains,
                             await asyncio.to_thread(server_context, cert_pem, key_pem))
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("certificate files not loaded yet", app=app, error=str(exc))
        if mode == "auto" and self.certs.state(app) is None:
            await self._import_certificate(app, cfg, cluster)
        if mode == "auto" and self.certs.issuer is None:
            raise CorralError(f"app {app!r}: tls = \"auto\" needs an ACME directory: set "
                              "acme_directory in the host's [drivers.lb] config",
                              code=ErrorCode.INVALID, retry=False)
        await self.certs.want(app, cfg.domains, mode)

    async def _import_certificate(self, app: str, cfg: LbConfig, cluster: ClusterCerts
                                  ) -> None:
        """Store the app's ``certificate`` record (its previous home's) when this host has
        no usable certificate as good for it: the manager then serves and renews it."""
        value = cluster.records.get(app)
        if value is None or self.certs is None:
            return
        try:
            serial = await asyncio.to_thread(import_certificate, self.certs.store, app,
                                             cfg.domains, value)
        except (CertError, OSError, ValueError) as exc:
            log.warning("certificate record not imported: ordering one", app=app,
                        error=str(exc))
            return
        if serial is not None:
            log.info("certificate imported from the ledger instead of ordered", app=app,
                     serial=serial)

    async def _drop_certificate(self, app: str, *, withdraw: bool = True) -> None:
        """Stop serving ``app``'s certificate; ``withdraw``: release its record too (not when
        its domains change: the record stays until the new certificate replaces it)."""
        cfg = self._configs.get(app)
        if self.certs is not None and self.certs.state(app) is not None:
            await self.certs.drop(app)
        if cfg is not None:
            self.sni.remove(cfg.domains)
        self.mesh.certs.unfollow(app)
        if withdraw:
            self.mesh.certs.withdraw(app)
        if self.balancer.edge is not None:
            self.balancer.edge.set_secure(app, False)

    async def stop(self) -> None:
        """Close the proxies; the nft table stays, so kernel-plane traffic keeps flowing."""
        await self.mesh.close()
        for app in list(self.balancer.services):
            s = self.balancer.services[app]
            if s.config.plane == "nft":
                # forget without uninstalling: state.sync of the next driver picks it up
                del self.balancer.services[app]
                await s.close()
        if self.certs is not None:
            await self.certs.close()
        await self.balancer.close()

    @op("app.attach")
    async def attach(self, args: Any) -> dict[str, Any]:
        """Open the app's frontend on its plane; no backend until an instance is healthy."""
        app: AppSpec = args.app
        cfg = self._config(app)
        if cfg is None:
            return {"lb": False}
        old = self._configs.get(app.name)
        if old is not None and old.domains != cfg.domains:
            await self._drop_certificate(app.name, withdraw=False)
        # the certificate first (a stored one is in the SNI router before this returns), so
        # the HTTPS frontend never accepts a handshake it cannot finish
        self._configs[app.name] = cfg
        await self._want_certificate(app.name, cfg)
        async with self.mesh.lock:  # served for another host until now: this host's own now
            await self.mesh.attaching_local(app.name, cfg)
            await self.balancer.attach(app.name, cfg, directory=app.directory)
        self._secure_if_serving(app.name)
        return {"lb": True, "name": cfg.name, "frontend": "{}:{}".format(*cfg.listen),
                "domains": cfg.domains, "plane": cfg.plane}

    def _backend_of(self, app: AppSpec, rec: InstanceRecord) -> tuple[LbConfig, int] | None:
        cfg = self._configs.get(app.name) or self._config(app)
        if cfg is None or rec.spec.kind != "instance" or rec.spec.port is None:
            return None
        if cfg.process is not None and rec.spec.process != cfg.process:
            return None
        return cfg, rec.spec.port

    @op("instance.started")
    async def started(self, args: Any) -> dict[str, Any]:
        """Add the instance as a backend and wait (bounded) until its health checks pass.

        The wait is ``join_within_s`` in a rollout (none otherwise); the answer says
        ``healthy`` and the last check's result, and the kernel keeps or stops the instance
        on that. An unhealthy backend stays registered but gets no traffic."""
        app: AppSpec = args.app
        rec: InstanceRecord = args.instance
        found = self._backend_of(app, rec)
        if found is None or app.name not in self.balancer.services:
            return {"backend": False}
        activation = self.balancer.services[app.name].activation
        if isinstance(activation, OnDemand) and activation.socket_activation:
            # the app listens on our socket, not on its port: OnDemand adds that backend
            return {"backend": False, "socket_activation": True}
        # a rollout waits for the verdict; a restart or an adoption joins when healthy, unwaited
        wait = args.join_within_s or 0.0
        healthy = await self.balancer.add_backend(
            app.name, rec.spec.id, rec.address, found[1], wait=wait)
        service = self.balancer.services.get(app.name)
        backend = service.backends.get(rec.spec.id) if service is not None else None
        last = backend.last_health if backend is not None else "removed meanwhile"
        if backend is not None:  # the other hosts' lbs balance over it too
            await self.mesh.started(_published(app, rec, found[1]))
        return {"backend": True, "healthy": healthy, "health": last or "no check finished"}

    @op("instance.stopping")
    async def stopping(self, args: Any) -> dict[str, Any]:
        """Drain the instance's backend (no new work, wait for active work) and remove it.

        The kernel calls this before it signals the instance, so no request is cut; the other
        hosts' lbs are told first (its record released), so they drain it too."""
        self._forget_on_demand(args.app, args.instance_id)
        await self.mesh.stopped(args.app, args.instance_id)
        clean = await self.balancer.remove_backend(args.app, args.instance_id)
        return {"drained": clean}

    @op("instance.stopped")
    async def stopped(self, args: Any) -> dict[str, Any]:
        """Forget the instance if it went away without `instance.stopping` (it crashed)."""
        self._forget_on_demand(args.app, args.instance_id)
        await self.mesh.stopped(args.app, args.instance_id)
        clean = await self.balancer.remove_backend(args.app, args.instance_id, drain=0)
        return {"drained": clean}

    def _forget_on_demand(self, app: str, instance_id: str) -> None:
        service = self.balancer.services.get(app)
        if service is not None and isinstance(service.activation, OnDemand):
            service.activation.forget(instance_id)

    @op("app.detach")
    async def detach(self, args: Any) -> dict[str, Any]:
        """Close the app's frontend and forget its backends (and its certificate), and
        release the records that published its instances to the other hosts."""
        await self._drop_certificate(args.app)
        async with self.mesh.lock:
            if args.app in self._configs or not self.mesh.serves(args.app):
                await self.balancer.detach(args.app)
            self._configs.pop(args.app, None)
        await self.mesh.detached(args.app)
        return {}

    @op("state.sync")
    async def sync(self, args: Any) -> dict[str, Any]:
        """Re-apply every app's service and backends; drop services and nft leftovers (the
        services and backends the routing mesh holds for other hosts stay its own)."""
        async with self.mesh.lock:
            result = await self._sync(args)
        await self.mesh.synced_local(result.pop("published"))
        if self.sockets is not None:  # the kernel keeps what is open now (it may have restarted)
            await self.sockets.sync()
        return result

    async def _sync(self, args: Any) -> dict[str, Any]:
        wanted: dict[str, AppSpec] = {}
        cluster: ClusterCerts | None = None  # read once, at the first app with tls
        for app in args.apps:
            cfg = self._config(app)
            if cfg is not None:
                wanted[app.name] = app
                self._configs[app.name] = cfg
                if cluster is None and cfg.tls is not None and cfg.domains:
                    cluster = await self.mesh.certs.view()
                try:  # one app's certificate problem never stops the others' sync
                    await self._want_certificate(app.name, cfg, cluster)
                except CorralError as exc:
                    log.error("certificate not wanted", app=app.name, error=exc.reason)
                await self.mesh.attaching_local(app.name, cfg)
                await self.balancer.attach(app.name, cfg, directory=app.directory)
                self._secure_if_serving(app.name)
        for name in list(self.balancer.services):
            if name not in wanted and not self.mesh.serves(name):
                await self._drop_certificate(name)
                await self.balancer.detach(name)
                self._configs.pop(name, None)
        live: dict[str, set[str]] = {}
        published: list[LocalBackend] = []
        adds = []
        for rec in args.instances:
            app = wanted.get(rec.spec.app)
            if app is None or rec.state not in ("ready", "starting"):
                continue
            found = self._backend_of(app, rec)
            if found is None:
                continue
            activation = self.balancer.services[app.name].activation
            if isinstance(activation, OnDemand) and activation.socket_activation:
                if activation.instance is None or activation.instance.id != rec.spec.id:
                    # it listens on a socket of a previous lb process, whose address we no
                    # longer know: stop it (after this reply); the next connection starts a
                    # fresh one
                    self._background(self._stop_orphan(rec.spec.id))
                else:  # ours (the kernel restarted, we did not): its backend is our socket
                    live.setdefault(app.name, set()).add(rec.spec.id)
                continue
            live.setdefault(app.name, set()).add(rec.spec.id)
            published.append(_published(app, rec, found[1]))
            adds.append(self.balancer.add_backend(app.name, rec.spec.id, rec.address, found[1]))
        await asyncio.gather(*adds)
        removed = 0
        for name, service in self.balancer.services.items():
            for bid in list(service.backends):
                if (bid not in live.get(name, set()) and service.activation is None
                        and not is_remote(bid)):  # another host's: the mesh keeps it
                    service.remove(bid)
                    removed += 1
        configs = [*self._configs.values(), *self.mesh.serving.values()]
        if os.geteuid() == 0 and any(c.plane == "nft" for c in configs):
            from corral_lb.nft import service_key

            keep = {service_key(c.name) for c in configs if c.plane == "nft"}
            for key in self.balancer.nft.installed(mine=True) - keep:
                self.balancer.nft.uninstall_key(key)
        return {"services": len(self.balancer.services), "removed_backends": removed,
                "published": published}

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_orphan(self, instance_id: str) -> None:
        try:
            await self.kernel.call("instance.stop", {"instance_id": instance_id})
        except CorralError as exc:
            log.warning("cannot stop orphaned socket-activated instance",
                        instance=instance_id, error=exc.reason)

    @op("query.lb.status")
    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Services with their backends and health (``{"app": name}`` for one); on hosts
        sharing a ledger each backend's ``host``, ``remote`` on the services served for other
        hosts, and ``unserved``: the other hosts' apps not served here, and why."""
        return self.mesh.annotate(self.balancer.status(args.get("app")))

    @op("query.lb.stats")
    async def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """Per app, for `corral ps`: backends by health, and each backend's health."""
        apps: dict[str, Any] = {}
        for svc in self.balancer.status()["services"]:
            backends = svc["backends"]
            healthy = sum(1 for b in backends if b["state"] == "healthy")
            apps[svc["app"]] = {
                "name": svc["name"], "frontend": svc["frontend"],
                "backends_healthy": healthy, "backends_unhealthy": len(backends) - healthy,
                "backends": {b["id"]: b["state"] for b in backends},
            }
            remote = sum(1 for b in backends if is_remote(b["id"]))
            if remote:  # other hosts' instances (ids <instance>@<host>), counted above too
                apps[svc["app"]]["backends_remote"] = remote
            cert = self.certs.state(svc["app"]) if self.certs is not None else None
            borrowed = self.mesh.certs.served.get(svc["app"])
            if cert is not None:  # valid until ... / pending / failing (served over HTTP)
                apps[svc["app"]]["tls"] = (
                    f"valid-until-{str(cert.get('not_after') or '')[:10]}"
                    if cert.get("state") == "valid" else str(cert.get("state")))
            elif borrowed is not None:  # its home's certificate
                apps[svc["app"]]["tls"] = f"valid-until-{borrowed.not_after.date()}"
        return {"apps": apps,
                "shown": ["backends_healthy", "backends_unhealthy", "backends_remote", "tls"]}

    @op("query.lb.certs")
    async def certs_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Each certificate: its app, domains, issuer, expiry, state (valid / pending /
        failing with the last error); ``{"app": name}`` for one app's."""
        found = [] if self.certs is None else self.certs.status()
        app = args.get("app")
        return {"certs": [dict(c, app=c.get("name")) for c in found
                          if app is None or c.get("name") == app]}

    @op("query.lb.renew")
    async def renew(self, args: dict[str, Any]) -> dict[str, Any]:
        """Renew an app's ACME certificate now (``{"app": name}``); its new state."""
        app = str(args.get("app") or "")
        if self.certs is None or not app:
            raise CorralError("renew: name the app", code=ErrorCode.INVALID, retry=False)
        if self.certs.state(app) is None:
            raise CorralError(f"renew: app {app!r} has no certificate (it needs [lb] domains "
                              "and tls)", code=ErrorCode.INVALID, retry=False)
        return await self.certs.renew(app)

    @op("query.lb.metrics")
    async def metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        """Per-backend requests, active connections, latency histogram, 5xx count."""
        return self.balancer.metrics(args.get("app"))


def freeze_startup_heap() -> None:
    """Take what the process holds before it serves (modules, classes, schemas: alive until
    it exits) out of the garbage collector's passes, after collecting what is garbage already.

    The collector's full passes walk every tracked object; under new-connection load they run
    every few seconds (connections surviving the young passes pile up), and over the ~45,000
    objects of the imports alone one took 30-55 ms on the bench machine: a pause every
    client in flight waits out, and ~9 us per new TLS connection on average. Frozen objects
    are never collected, so this runs once, before any app's state exists.
    """
    gc.collect()
    gc.freeze()


def main() -> None:
    """``python -m corral_lb``: run the lb driver under corrald."""
    freeze_startup_heap()
    run(LbDriver, uvloop=True)


def _published(app: AppSpec, rec: InstanceRecord, port: int) -> LocalBackend:
    """A local backend as the mesh publishes it: with the app's resolved ``[lb]`` section
    (what the other hosts' lbs serve it from; never its config vars)."""
    return LocalBackend(app=app.name, instance=rec.spec.id, address=rec.address, port=port,
                        process=rec.spec.process, lb=dict(app.manifest.get("lb") or {}))


def _read_pair(tls: TlsFiles) -> tuple[bytes, bytes]:
    with open(tls.cert, "rb") as cert, open(tls.key, "rb") as key:
        return cert.read(), key.read()
