"""The routing mesh: on hosts sharing a ledger, every host's lb serves every app of the cluster.

Docker Swarm's ingress routing mesh is the anchor: a client may come in on any host, and the
lb there balances over the app's instances on every host. Only the backend sets change; the
proxies' per-connection and per-request paths are the ones a single host runs.

- **Publish.** For each instance this host's lb balances over, it claims a ledger record of
  kind ``backend`` (cluster-wide, listed by every host), key ``<app>/<instance>@<host>``,
  owner the app (the kernel's host view stores ``<app>@<host>``): the host, the instance's
  address and port, its process and the app's ``[lb]`` section (what another host needs to
  serve the app; never its config vars). Released when the instance stops or the app
  detaches; reconciled on ``state.sync`` and every round (records of instances no longer
  live are released, once this process has had its ``state.sync``).
- **Learn.** Every ``INTERVAL_S`` the lb lists kinds ``backend`` and ``host-alive`` (and this
  host's ``port`` records, for the frontends). Another
  host's instance whose host is alive becomes a backend (id ``<instance>@<host>``, health
  checked like a local one): of the app's local service when the app is attached here, else
  of a service the mesh opens for it from the record's ``[lb]`` section (``remote_config``:
  no on-demand starts, no policy program; its ``tls`` as its home has it, served with the
  certificate its home publishes). A backend whose record is gone is drained; one whose host
  is not alive is removed at once. A remote app none of whose records is left is no longer
  served here.
- **Frontends.** A remote app gets its own ``frontend`` on this host when the port is free
  here (no ``port`` record of this host holds it), or shares the lb's HTTP frontend already
  on that address and port (HTTP apps on the proxy plane, routed by Host: a local app's, or
  another remote app's). The mesh records what it serves on as kind ``lb-frontend`` (per
  host, owner ``driver:lb``), not as ``port``: a host's own apps always win its ports, so a
  deploy here that wants one is never refused because of the mesh; the mesh steps aside at
  ``app.attach`` (or, for a port an app takes otherwise, within a round). Domains go on the
  host's shared frontends, whose ports the lb claims as ``driver:lb`` (as for its own apps).
  A frontend this host cannot give (its port held, an address it does not have) is logged
  and published (``app.<app>.lb.unserved``) with its holder, once, and tried again every
  round.
- **TLS** (``corral_lb.mesh_tls``). The home of an app publishes its certificate (kind
  ``certificate``, sealed by the kernel under the cluster key); every other host serves the
  app's domains over HTTPS with it on its shared HTTPS frontend, and answers the ACME
  challenges of every host's orders (kind ``acme-challenge``). Each round lists both kinds.

On a host whose ledger is its own (``kernel.status`` ``shared_ledger`` false) none of this
runs: the lb behaves as it always has.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from corral.errors import CorralError, ErrorCode
from corral_lb.acme import ChallengeStore
from corral_lb.balancer import Balancer
from corral_lb.config import LbConfig, PolicyProgram, load_lb_config
from corral_lb.service import Service
from corral_lb.tls import SniRouter

if TYPE_CHECKING:
    from corral_lb.mesh_tls import SharedCerts, SharedChallenges

log = structlog.get_logger("corral_lb")

BACKEND = "backend"  # ledger kind: an instance an lb balances over (cluster-wide, listed by all)
ALIVE = "host-alive"  # ledger kind: present while the host's lease lives; key: the host name
PORT = "port"  # ledger kind: a host port (per host)
FRONTEND = "lb-frontend"  # ledger kind: a port the mesh serves other hosts' apps on (per host)
OWNER = "driver:lb"  # the lb's own name in the ledger (as for the shared frontends' ports)
CERTIFICATE = "certificate"  # ledger kind: an app's certificate and key, sealed (cluster-wide)
CHALLENGE = "acme-challenge"  # ledger kind: an HTTP-01 token, or a host's acknowledgement of it
SEP = "@"  # in a backend id: <instance>@<host>; no app, process or host name holds one
INTERVAL_S = 1.0  # between two rounds of learning
CALL_TIMEOUT_S = 5.0  # a mesh call to the kernel: never hold a driver operation for long
SWEEP_EVERY = 30  # rounds between two reads of this host's lb-frontend records


class KernelCalls(Protocol):
    """What the mesh asks of the kernel (``corral.sdk.KernelLink`` is one)."""

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        """Run kernel operation ``op``; raises ``CorralError``."""
        ...


def backend_id(instance: str, host: str) -> str:
    """The id of another host's instance among a service's backends."""
    return f"{instance}{SEP}{host}"


def is_remote(backend: str) -> bool:
    """Whether a backend id names another host's instance (local ids hold no ``@``)."""
    return SEP in backend


def record_key(app: str, instance: str, host: str) -> str:
    """The ``backend`` record's key: ``<app>/<instance>@<host>`` (instance ids repeat across
    hosts: an app adopted by another host starts ``shop.web.1`` there too)."""
    return f"{app}/{backend_id(instance, host)}"


@dataclass(frozen=True)
class LocalBackend:
    """One of this host's instances the lb balances over, as it is published."""

    app: str
    instance: str
    address: str
    port: int
    process: str
    lb: dict[str, Any]  # the app's resolved [lb] section


@dataclass(frozen=True)
class RemoteBackend:
    """Another host's instance, from its ``backend`` record."""

    app: str
    instance: str
    host: str
    address: str
    port: int
    lb: dict[str, Any]
    revision: int

    @property
    def id(self) -> str:
        """Its backend id here: ``<instance>@<host>``."""
        return backend_id(self.instance, self.host)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> RemoteBackend | None:
        """The backend a ``ledger.list`` record describes, or None when it is not a well-formed
        record of its owner (``<app>@<host>``, the app and host its value names)."""
        value = rec.get("value")
        if not isinstance(value, dict):
            return None
        app, instance, host = value.get("app"), value.get("instance"), value.get("host")
        address, port, section = value.get("address"), value.get("port"), value.get("lb")
        if not (isinstance(app, str) and isinstance(instance, str) and isinstance(host, str)
                and isinstance(address, str) and isinstance(section, dict)):
            return None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return None
        if rec.get("owner") != f"{app}{SEP}{host}" or not app or not host or not address:
            return None
        revision = rec.get("revision")
        return cls(app, instance, host, address, port, section,
                   revision if isinstance(revision, int) else 0)


def remote_config(section: dict[str, Any], *, app: str, default_plane: str) -> LbConfig:
    """The config this host serves another host's app with: its ``[lb]`` section as its own
    host reads it, without what only that host can do: no on-demand start (``activation =
    "always"``), and a policy program's built-in fallback instead of the program. ``tls``
    stays: its domains are on the shared HTTPS frontend, served with the certificate its home
    publishes (``corral_lb.mesh_tls``; until there is one, over HTTP only, as for an app
    whose certificate is pending); this host never orders one, nor reads ``tls`` files.
    ``ManifestError`` when the section does not load here (a newer lb's keys)."""
    cfg = load_lb_config(section, app=app, default_plane=default_plane)
    policy = cfg.policy
    if isinstance(policy, PolicyProgram):
        policy = policy.fallback if cfg.plane == "proxy" else None
    return cfg.model_copy(update={"activation": "always", "socket_activation": False,
                                  "policy": policy})


def shares_http(a: LbConfig, b: LbConfig) -> bool:
    """Whether two apps' own frontends can be one: HTTP on the proxy plane, the same address
    and port (the frontend routes by Host)."""
    return (a.frontend is not None and b.frontend is not None and a.listen == b.listen
            and a.plane == b.plane == "proxy" and a.mode == b.mode == "http")


def _describe(owner: str) -> str:
    """A ledger owner as messages name it: ``driver:lb`` -> "driver 'lb'", ``blog`` -> "app
    'blog'" (the kernel's wording)."""
    role, sep, name = owner.partition(":")
    return f"{role} '{name}'" if sep and role and name else f"app '{owner}'"


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


class Mesh:
    """This host's part of the routing mesh (see the module).

    ``kernel()`` is the driver's current link and ``ready()`` whether the kernel has
    welcomed it (nothing is sent before); ``local`` the driver's configs of the apps
    attached here (read, never written); ``default_plane()`` the host's ``plane``. ``lock``
    guards the balancer's services: the driver holds it while it attaches or detaches an
    app, the mesh while it changes what it serves. ``sni`` is the shared HTTPS frontend's
    router and ``challenges`` this host's ACME answers (the driver's): ``certs`` and
    ``tokens`` share them with the other hosts (``corral_lb.mesh_tls``)."""

    def __init__(self, kernel: Callable[[], KernelCalls], balancer: Balancer,
                 local: Mapping[str, LbConfig], *, default_plane: Callable[[], str],
                 ready: Callable[[], bool] = lambda: True, sni: SniRouter | None = None,
                 challenges: ChallengeStore | None = None) -> None:
        from corral_lb.mesh_tls import SharedCerts, SharedChallenges  # it builds on this module

        self._kernel = kernel
        self._ready = ready
        self.balancer = balancer
        self.local = local
        self.default_plane = default_plane
        self.lock = asyncio.Lock()
        self.shared: bool | None = None  # None: not asked yet
        self._announced = False  # "routing mesh on" said (once, not after every state.sync)
        self.host = ""
        self.address: str | None = None  # this host's, from its host-alive record
        # publishing: what should be in the ledger, and what is (this host's records)
        self.backends: dict[tuple[str, str], LocalBackend] = {}
        self.published: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (owner, value)
        self.synced = False  # state.sync seen: records of unknown instances may be released
        self._gone: set[tuple[str, str]] = set()  # (owner, key) to release, synced or not
        self._push_lock = asyncio.Lock()
        # serving: other hosts' apps attached here, their hosts, the frontends recorded for
        # them, and why others are not
        self.serving: dict[str, LbConfig] = {}
        self._hosts: dict[str, list[str]] = {}  # app -> the hosts of its instances
        self.frontends: dict[str, dict[str, Any]] = {}  # lb-frontend key -> value (recorded)
        self.unserved: dict[str, str] = {}  # app -> why it is not served here
        self._draining: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._rounds = 0
        self._task: asyncio.Task[None] | None = None
        self.sealed: frozenset[str] = frozenset()  # kinds the kernel seals (kernel.status)
        # TLS: certificates published and served, ACME challenges answered by every host
        self.certs: SharedCerts = SharedCerts(self, sni if sni is not None else SniRouter())
        self.tokens: SharedChallenges = SharedChallenges(
            self, challenges if challenges is not None else ChallengeStore())

    # -- the cluster --------------------------------------------------------------------------

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """``op`` asked of the kernel; UNAVAILABLE, unsent, until the link is welcomed (the
        kernel refuses a peer whose request comes before its HELLO is done, and a round
        may come while the driver reconnects). The check and the send are one step: no
        await between them."""
        if not self._ready():
            raise CorralError("kernel not connected (no WELCOME yet)",
                              code=ErrorCode.UNAVAILABLE)
        return await self._kernel().call(op, args, timeout=CALL_TIMEOUT_S)

    async def cluster(self) -> bool:
        """Whether this host shares its ledger with others (asked of the kernel once, and
        again after ``forget_cluster``); False while the kernel cannot be asked."""
        if self.shared is None:
            try:
                status = await self._call("kernel.status", {})
            except CorralError as exc:
                log.debug("kernel status not known yet", error=exc.reason)
                return False
            self.host = str(status.get("host") or "")
            self.sealed = frozenset(str(k) for k in status.get("sealed_kinds") or ())
            shared = bool(status.get("shared_ledger")) and bool(self.host)
            if shared and not self._announced:
                log.info("routing mesh on", host=self.host)
            self.shared = self._announced = shared
        return bool(self.shared)

    def forget_cluster(self) -> None:
        """Ask the kernel again before the next step (it may have restarted)."""
        self.shared = None

    def start(self) -> None:
        """Run rounds every ``INTERVAL_S`` until ``close``."""
        self.tokens.loop = asyncio.get_running_loop()  # the issuing threads' way back
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                if self._ready():
                    await self.tick()
            except CorralError as exc:
                log.warning("routing mesh round failed", error=exc.reason)
            except Exception:  # a bug must not end the mesh: the next round tries again
                log.exception("routing mesh round failed")
            await asyncio.sleep(INTERVAL_S)

    async def close(self) -> None:
        """Stop the rounds and the drains under way (what is served stays until the
        balancer closes; what is published stays: the instances live on)."""
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # cancelled or failed: over
        self._task = None

    # -- publishing ---------------------------------------------------------------------------

    async def started(self, backend: LocalBackend) -> None:
        """A local instance joined as a backend: publish it (errors are logged; the next
        round tries again)."""
        self.backends[(backend.app, backend.instance)] = backend
        if await self.cluster():
            await self._push()

    async def stopped(self, app: str, instance: str) -> None:
        """A local instance is stopping (or gone): release its record, so the other hosts
        stop sending it work while it drains here."""
        if self.backends.pop((app, instance), None) is None or not await self.cluster():
            return
        self._gone.add((app, record_key(app, instance, self.host)))
        await self._push()

    async def detached(self, app: str) -> None:
        """A local app detached: release the records of its instances."""
        gone = [k for k in self.backends if k[0] == app]
        for k in gone:
            del self.backends[k]
        if gone and await self.cluster():
            self._gone.update((app, record_key(app, i, self.host)) for _, i in gone)
            await self._push()

    async def synced_local(self, backends: Iterable[LocalBackend]) -> None:
        """``state.sync``: these are the live local backends; every other record of this
        host is released (now and in later rounds)."""
        self.forget_cluster()
        self.certs.refused = None  # a restarted kernel may have a cluster key now
        self.backends = {(b.app, b.instance): b for b in backends}
        if not await self.cluster():
            return
        self.synced = True
        await self._push()
        await self.certs.push()

    def _wanted(self) -> tuple[dict[str, tuple[str, dict[str, Any]]], set[str]]:
        """Record key -> (owner, value) for every local backend whose address other hosts
        can reach (a loopback address is this host's own address), and the keys of those
        waiting for this host's address (not known before a round has read it): kept as
        they are meanwhile."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        waiting: set[str] = set()
        for b in self.backends.values():
            key = record_key(b.app, b.instance, self.host)
            address = self.address if _loopback(b.address) else b.address
            if not address:
                waiting.add(key)
                continue
            out[key] = (b.app, {
                "host": self.host, "app": b.app, "instance": b.instance, "address": address,
                "port": b.port, "process": b.process, "lb": b.lb})
        return out, waiting

    async def _push(self) -> None:
        async with self._push_lock:
            await self._push_locked()

    async def _push_locked(self) -> None:
        """Claim what is wanted and not in the ledger as wanted; release the records of
        instances that stopped, and (once synced) whatever else is in the ledger and not
        wanted. One call per app; a failed one is logged (the next round tries again)."""
        wanted, waiting = self._wanted()
        kept = wanted.keys() | waiting
        self._gone = {g for g in self._gone if g[1] not in kept}  # started again
        claims: dict[str, list[dict[str, Any]]] = {}
        for key, (owner, value) in wanted.items():
            if self.published.get(key) != (owner, value):
                claims.setdefault(owner, []).append({"kind": BACKEND, "key": key,
                                                     "value": value})
        for owner, items in claims.items():
            try:
                await self._call("ledger.claim", {"owner": owner, "claims": items})
            except CorralError as exc:
                log.warning("backends not published", app=owner, error=exc.reason)
                continue
            for item in items:
                self.published[item["key"]] = (owner, item["value"])
        releases: dict[str, list[str]] = {}
        for owner, key in sorted(self._gone):
            releases.setdefault(owner, []).append(key)
        for key, (owner, _) in self.published.items():
            if self.synced and key not in kept and key not in releases.get(owner, []):
                releases.setdefault(owner, []).append(key)
        for owner, keys in releases.items():
            try:
                await self._call("ledger.release", {
                    "owner": owner, "keys": [[BACKEND, k] for k in keys]})
            except CorralError as exc:
                log.warning("backends not released", app=owner, error=exc.reason)
                continue
            for key in keys:
                self.published.pop(key, None)
                self._gone.discard((owner, key))

    # -- learning -----------------------------------------------------------------------------

    async def tick(self) -> None:
        """One round: list the cluster's backends and live hosts and this host's ports,
        reconcile this host's records, and serve the other hosts' instances. A ledger that
        cannot be read changes nothing this round."""
        if not await self.cluster():
            return
        try:
            records = (await self._call("ledger.list", {"kind": BACKEND}))["records"]
            alive_records = (await self._call("ledger.list", {"kind": ALIVE}))["records"]
            ports = (await self._call("ledger.list", {"kind": PORT}))["records"]
            if self._rounds % SWEEP_EVERY == 0:  # what an earlier process recorded, too
                self.frontends = {str(r.get("key")): dict(r.get("value") or {}) for r in (
                    await self._call("ledger.list", {"kind": FRONTEND}))["records"]
                    if r.get("owner") == OWNER}
        except CorralError as exc:
            log.warning("routing mesh: ledger not read", error=exc.reason)
            return
        held = {int(r["key"]): (str(r.get("owner") or ""),
                                (r.get("value") or {}).get("name") == "lb")
                for r in ports if str(r.get("key", "")).isdigit()}
        alive = {str(r.get("key")): r.get("value") or {} for r in alive_records}
        address = alive.get(self.host, {}).get("address")
        if isinstance(address, str) and address:
            self.address = address
        own: dict[str, tuple[str, dict[str, Any]]] = {}
        remote: dict[str, dict[str, RemoteBackend]] = {}
        for rec in records:
            owner = str(rec.get("owner") or "")
            if SEP not in owner:  # this host's (the host view strips our own suffix)
                own[str(rec.get("key"))] = (owner, dict(rec.get("value") or {}))
                continue
            rb = RemoteBackend.from_record(rec)
            if rb is None:
                log.debug("routing mesh: record ignored", key=rec.get("key"), owner=owner)
            elif rb.host != self.host and rb.host in alive:
                remote.setdefault(rb.app, {})[rb.id] = rb
        async with self._push_lock:
            self.published = own
            await self._push_locked()
        async with self.lock:
            await self._apply(remote, set(alive), held)
            await self._push_frontends()
        await self._tls()
        self._rounds += 1

    async def _tls(self) -> None:
        """The round's TLS part (``corral_lb.mesh_tls``): the other hosts' ACME tokens, the
        certificates of the apps served here and those published from here. A ledger that
        cannot be read changes nothing of it; the backends were served all the same."""
        self.tokens.loop = asyncio.get_running_loop()
        try:
            certs = (await self._call("ledger.list", {"kind": CERTIFICATE}))["records"]
            tokens = (await self._call("ledger.list", {"kind": CHALLENGE}))["records"]
        except CorralError as exc:
            log.warning("routing mesh: certificates and challenges not read", error=exc.reason)
            return
        await self.tokens.round(tokens)
        await self.certs.round(certs)
        await self.certs.push()

    async def _apply(self, remote: dict[str, dict[str, RemoteBackend]], alive: set[str],
                     held: Mapping[int, tuple[str, bool]]) -> None:
        """Make the services match ``remote`` (app -> backend id -> backend, live hosts only),
        and give up a frontend whose port this host's ``port`` records (``held``: port ->
        owner, and whether it is an lb frontend's) give to an app it cannot share with."""
        services = self.balancer.services
        for app, cfg in sorted(self.serving.items()):
            blocked = self._blocker(app, cfg, held)
            if blocked is not None:  # a host's own app took the port: it wins
                await self._drop(app)
                await self._unserved(app, *blocked)
        apps = set(remote) | set(self.serving) | {
            a for a, s in services.items() if any(is_remote(b) for b in s.backends)}
        for app in sorted(apps):
            wanted = remote.get(app, {})
            if app in self.local and app not in self.serving:  # attached here: one more backend
                service = services.get(app)
                if service is not None:
                    # an on-demand app's backends are what its activation started, here
                    self._converge(app, service, wanted if service.activation is None else {},
                                   alive)
                continue
            if app in self.serving and app not in services:  # detached under us: serve again
                self.serving.pop(app)
            if not wanted:
                if app in self.serving:
                    await self._drop(app)
                    log.info("another host's app no longer served here", app=app)
                self.unserved.pop(app, None)
                self._hosts.pop(app, None)
                continue
            self._hosts[app] = sorted({b.host for b in wanted.values()})
            newest = max(wanted.values(), key=lambda b: (b.revision, b.id))
            try:
                cfg = remote_config(newest.lb, app=app, default_plane=self.default_plane())
            except CorralError as exc:
                await self._unserved(app, f"its [lb] section does not load here: {exc.reason}")
                continue
            if self.serving.get(app) != cfg:
                if app in self.serving:
                    await self._drop(app)
                if not await self._serve(app, cfg, held):
                    continue
            self._converge(app, services[app], wanted, alive)

    def _converge(self, app: str, service: Service, wanted: dict[str, RemoteBackend],
                  alive: set[str]) -> None:
        """Add the wanted remote backends (health checked from now on); drain those whose
        record is gone, remove at once those of hosts no longer alive."""
        for bid, rb in wanted.items():
            if (app, bid) in self._draining:
                continue  # added again once its drain has ended
            present = service.backends.get(bid)
            if present is None or present.address != (rb.address, rb.port):
                service.add(bid, rb.address, rb.port)
        for bid in [b for b in service.backends if is_remote(b) and b not in wanted]:
            if bid.rpartition(SEP)[2] not in alive:
                service.remove(bid)
            elif (app, bid) not in self._draining:
                self._draining.add((app, bid))
                self._background(self._drain(app, service, bid))

    async def _drain(self, app: str, service: Service, bid: str) -> None:
        try:
            await service.drain(bid)
        finally:
            self._draining.discard((app, bid))

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- serving other hosts' apps ------------------------------------------------------------

    def _blocker(self, app: str, cfg: LbConfig, held: Mapping[int, tuple[str, bool]]
                 ) -> tuple[str, str] | None:
        """Why ``app`` (another host's) cannot have its own frontend here, and who holds it:
        its port held in the ledger on this host by a local app whose HTTP frontend it
        cannot share, or by anything else than an lb frontend (an app's own port, the shared
        frontends'); or served here for another host's app it cannot share with. None when
        it can. The port of a local lb app not attached yet (being deployed) is left to that
        app's ``app.attach``, which shares it or takes it; so is the app's own."""
        if cfg.frontend is None:
            return None
        port = cfg.listen[1]
        owner, lb_frontend = held.get(port, (None, False))
        if owner is not None and owner != app:
            local = self.local.get(owner)
            if local is not None and owner not in self.serving and (
                    owner in self.balancer.services):
                if not shares_http(cfg, local):
                    return (f"port {port} on host {self.host} is held by "
                            f"{_describe(owner)}"), owner
            elif not lb_frontend:
                return f"port {port} on host {self.host} is held by {_describe(owner)}", owner
        for other, ocfg in sorted(self.serving.items()):
            if (other != app and ocfg.frontend is not None and ocfg.listen[1] == port
                    and not shares_http(cfg, ocfg)):
                return (f"port {port} on host {self.host} is served for app {other!r} of "
                        "another host"), other
        return None

    async def _serve(self, app: str, cfg: LbConfig, held: Mapping[int, tuple[str, bool]]
                     ) -> bool:
        """Attach another host's app here, unless its frontend cannot be had (said once).
        An HTTP frontend already open on its address and port takes it as one more name."""
        blocked = self._blocker(app, cfg, held)
        if blocked is not None:
            await self._unserved(app, *blocked)
            return False
        try:
            await self.balancer.attach(app, cfg)
        except (CorralError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            details = getattr(exc, "details", None) or {}
            await self._unserved(app, reason, str(details.get("holder") or ""))
            return False
        self.serving[app] = cfg
        self.unserved.pop(app, None)
        log.info("serving another host's app", app=app, hosts=self._hosts.get(app),
                 name=cfg.name, frontend="{}:{}".format(*cfg.listen), domains=cfg.domains)
        return True

    async def _drop(self, app: str) -> None:
        """Stop serving another host's app here (its frontend closes unless shared, its
        certificate leaves the SNI router)."""
        self.serving.pop(app)
        self.certs.forget(app)
        await self.balancer.detach(app)

    async def _push_frontends(self) -> None:
        """Keep this host's ``lb-frontend`` records (owner ``driver:lb``, key the port) as
        what the mesh serves on: the address and, per app, the hosts of its instances."""
        wanted: dict[str, dict[str, Any]] = {}
        for app, cfg in sorted(self.serving.items()):
            if cfg.frontend is not None:
                entry = wanted.setdefault(str(cfg.listen[1]), {"address": cfg.listen[0],
                                                               "apps": {}})
                entry["apps"][app] = self._hosts.get(app, [])
        changed = {key: value for key, value in wanted.items()
                   if self.frontends.get(key) != value}
        gone = [key for key in self.frontends if key not in wanted]
        try:
            if changed:
                await self._call("ledger.claim", {"owner": OWNER, "claims": [
                    {"kind": FRONTEND, "key": k, "value": v} for k, v in changed.items()]})
                self.frontends.update(changed)
            if gone:
                await self._call("ledger.release", {"owner": OWNER,
                                                    "keys": [[FRONTEND, k] for k in gone]})
                for key in gone:
                    del self.frontends[key]
        except CorralError as exc:
            log.warning("routing mesh: frontends not recorded", error=exc.reason)

    async def _unserved(self, app: str, reason: str, holder: str = "") -> None:
        """Say once (log and ``app.<app>.lb.unserved``) why another host's app is not served
        here; the next rounds try again quietly."""
        if self.unserved.get(app) == reason:
            return
        self.unserved[app] = reason
        log.error("another host's app not served here", app=app, host=self.host,
                  reason=reason, holder=holder or None)
        try:
            await self._call("event.publish", {"topic": f"app.{app}.lb.unserved", "data": {
                "host": self.host, "reason": reason, "holder": holder or None}})
        except CorralError as exc:
            log.warning("event not published", app=app, error=exc.reason)

    # -- the driver's side --------------------------------------------------------------------

    async def attaching_local(self, app: str, cfg: LbConfig) -> None:
        """``app`` is about to be attached as this host's own (call with ``lock`` held): it is
        no longer served for another host (the balancer replaces or keeps its service), and
        the other hosts' apps served on its frontend port that cannot share it leave it (a
        host's own apps always win its ports)."""
        self.serving.pop(app, None)
        self.unserved.pop(app, None)
        if cfg.frontend is None:
            return
        port = cfg.listen[1]
        for other, ocfg in sorted(self.serving.items()):
            if ocfg.frontend is not None and ocfg.listen[1] == port and not shares_http(
                    cfg, ocfg):
                await self._drop(other)
                await self._unserved(other, f"port {port} on host {self.host} is held by "
                                            f"app {app!r}", app)

    def serves(self, app: str) -> bool:
        """Whether ``app`` is served here for other hosts only."""
        return app in self.serving

    def annotate(self, status: dict[str, Any]) -> dict[str, Any]:
        """``query.lb.status`` with each backend's host and the services served for other
        hosts (``remote``), with the facts of the certificate their home published when it is
        served here (``certificate``: home, serial, not_after, domains); on several hosts the
        reply says which apps are not served here and why (``unserved``)."""
        if not self.shared:
            return status
        for svc in status.get("services", []):
            if svc.get("app") in self.serving:
                svc["remote"] = True
            borrowed = self.certs.served.get(str(svc.get("app")))
            if borrowed is not None:  # its home's certificate, served here (never the key)
                svc["certificate"] = borrowed.facts()
            for b in svc.get("backends", []):
                bid = str(b.get("id"))
                b["host"] = bid.rpartition(SEP)[2] if is_remote(bid) else self.host
        status["host"] = self.host
        status["unserved"] = dict(sorted(self.unserved.items()))
        return status
