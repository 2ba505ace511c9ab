"""TLS across the routing mesh: an app's home orders its certificate, every host serves it, and
every host answers the ACME challenges of its orders.

Caddy's clustered certificate storage is the anchor: one host orders, every host serves. Only
on a shared ledger (``kernel.status`` ``shared_ledger``); on one host none of this runs.

- **Publish** (``SharedCerts``, the home's side). When a certificate goes into service for an
  app homed here (ordered, renewed, found in the store, or read from ``tls = { cert, key }``
  files), the lb claims the record ``certificate``/<app> (cluster-wide, listed by every host,
  owner the app) with ``{"domains", "cert", "key", "not_after", "serial", "mode"}`` (the full
  chain and the private key as PEM). The kernel seals the value under the cluster key before
  it reaches the ledger and opens it only in its lb driver's ``ledger.list`` answers (a client
  sees ``{"sealed": true}``). A record is claimed only when it changed, and released when the
  app's certificate is dropped (no ``tls`` any more) or the app detaches (``corral down``
  releases it in the kernel too). A claim or release that fails is logged and tried again
  every round; local serving never waits for it. Without a cluster key the kernel refuses the
  claim: said once, nothing more is claimed until the kernel's next ``state.sync``, and the
  other hosts serve this host's apps over HTTP only.
- **Serve** (``SharedCerts``, every other host). Each round lists the records. For each app
  whose certificate is its home's (another host's app the mesh serves here, or a share of a
  spread app run here for its home: ``follow``) and whose ``[lb]`` has domains and ``tls``,
  the record's certificate goes into the SNI router of the host's shared HTTPS frontend for
  the app's domains it covers, and HTTP is redirected to HTTPS (``redirect_https``) once it
  covers all of them, as for an app homed here whose certificate is valid. A changed record
  (a renewal) replaces it for new handshakes; a record gone or expired removes it. A record
  whose PEMs do not load is logged once (per record) and skipped. Such a host never orders a
  certificate for the app.
- **Adopt.** A host that becomes an app's home (failover: the kernel moves the record to the
  new home) and has no usable certificate of its own for it imports the record's into its
  store instead of ordering one (``import_certificate``; CA rate limits), then renews it as
  usual.
- **Challenges** (``SharedChallenges``: the ``ChallengeResponder`` the ACME issuer puts its
  tokens into, from its thread). The DNS of a domain usually names several hosts and the CA
  may validate through any of them. ``put`` answers the token here at once, claims
  ``acme-challenge``/<token> (cluster-wide, listed by every host, owner ``driver:lb``, value
  ``{"key_authorization"}``), then waits until every other live host's lb has acknowledged
  it, ``ACK_WAIT_S`` at most, and only then returns (and the issuer tells the CA to
  validate). Every round each host learns the other hosts' tokens (its shared HTTP frontend
  answers them next to its own) and acknowledges each with a record of its own,
  ``acme-challenge``/<token>@<host> (an ACME token is base64url: it never holds ``@``),
  once its shared HTTP frontend is open: an acknowledgement says "this host answers it".
  ``remove`` releases the token; every host forgets it and releases its acknowledgement in
  its next round (and releases its own tokens of an order an earlier process left).

  Why acknowledgements: waiting a fixed number of rounds assumes every host's rounds run
  on time (a slow ledger or a reconnecting lb breaks that silently), and a host whose shared
  HTTP frontend is not open yet (an app's first order starts at its attach, before its
  instances run and before other hosts serve it) answers 404 however long one waits; looking
  a token up in the ledger on the request itself would make the proxy's request path wait
  on the kernel, and let anyone make a host read the ledger with made-up tokens. A host
  that does not acknowledge (no lb, cut off) costs an order ``ACK_WAIT_S`` per domain; the
  order goes on, and the hosts that did not answer are named in the log.

Private keys are never logged, published in an event or shown in a ``query.lb.*`` answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from corral.errors import CorralError, ErrorCode
from corral_lb.acme import ChallengeStore, IssuedCert
from corral_lb.certs import CertError, CertMeta, CertStore, cert_domains, check_pair, covers
from corral_lb.mesh import ALIVE, CALL_TIMEOUT_S, CERTIFICATE, CHALLENGE, OWNER, SEP
from corral_lb.tls import SniRouter, server_context

if TYPE_CHECKING:
    from corral_lb.config import LbConfig
    from corral_lb.mesh import Mesh

log = structlog.get_logger("corral_lb")

SATELLITE = "satellite"  # ledger kind (per host): a share of a spread app run for its home
ACK_WAIT_S = 10.0  # the longest ``put`` waits for the other hosts to answer a token
ACK_POLL_S = 0.2  # between two looks for their acknowledgements


def certificate_value(domains: Iterable[str], cert_pem: bytes, key_pem: bytes, *,
                      mode: str) -> dict[str, Any]:
    """The ``certificate`` record's value for a certificate in service for ``domains``
    (``mode``: "auto" or "files"); ``ValueError`` when the chain does not parse."""
    info = IssuedCert.from_pem(cert_pem)
    return {"domains": list(domains), "cert": cert_pem.decode("ascii"),
            "key": key_pem.decode("ascii"), "not_after": info.not_after.isoformat(),
            "serial": info.serial, "mode": mode}


def import_certificate(store: CertStore, app: str, domains: list[str],
                       value: Mapping[str, Any]) -> str | None:
    """Store the certificate of a ``certificate`` record's ``value`` as ``app``'s, unless the
    store holds one valid as long or longer; its serial when stored, else None. ``CertError``
    when the record's pair is not one that serves ``domains`` now (not PEM, the key does not
    match, expired, a domain not covered). Blocks (files)."""
    cert_pem, key_pem = _pems(value)
    leaf = check_pair(cert_pem, key_pem, domains=domains)
    stored = store.load(app)
    if (stored is not None and stored.fullchain_pem is not None
            and stored.meta.not_after is not None
            and stored.meta.not_after >= leaf.not_valid_after_utc):
        return None
    info = IssuedCert.from_pem(cert_pem)
    meta = CertMeta(domains=list(domains), state="valid")
    meta.take(info)
    store.save(app, meta, key_pem=key_pem, fullchain_pem=cert_pem)
    return info.serial


def _pems(value: Mapping[str, Any]) -> tuple[bytes, bytes]:
    cert, key = value.get("cert"), value.get("key")
    if not isinstance(cert, str) or not isinstance(key, str):
        raise CertError("the record holds no certificate and key (sealed under another "
                        "cluster key?)")
    return cert.encode(), key.encode()


def _fingerprint(value: Mapping[str, Any]) -> str:
    """What tells one record's pair from another's (never shown)."""
    return hashlib.sha256(f"{value.get('cert')}\0{value.get('key')}".encode()).hexdigest()


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    names: list[str]  # the leaf's DNS names
    serial: str
    not_after: datetime


def _load(value: Mapping[str, Any]) -> _Loaded:
    """The record's pair as a server context; ``CertError``/``ssl.SSLError``/``ValueError``
    when it does not load or is not valid now. Blocks (OpenSSL)."""
    cert_pem, key_pem = _pems(value)
    leaf = check_pair(cert_pem, key_pem)
    return _Loaded(server_context(cert_pem, key_pem), cert_domains(leaf),
                   format(leaf.serial_number, "x"), leaf.not_valid_after_utc)


@dataclass(frozen=True)
class ClusterCerts:
    """What the ledger says of the certificates of apps attached here, read at an attach or
    a ``state.sync``: the apps this host runs a share of for their home (``followed``), and
    each app's ``certificate`` record value (``records``)."""

    followed: frozenset[str] = frozenset()
    records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Borrowed:
    """Another host's certificate of an app, in service here."""

    home: str
    fingerprint: str
    context: ssl.SSLContext
    names: tuple[str, ...]  # the app's domains it covers: in the SNI router
    domains: tuple[str, ...]  # the app's domains when it was put in service
    serial: str
    not_after: datetime

    @property
    def complete(self) -> bool:
        """Whether it covers every domain of the app (HTTP is redirected only then)."""
        return len(self.names) == len(self.domains)

    def facts(self) -> dict[str, Any]:
        """What ``query.lb.status`` shows of it (no key)."""
        return {"home": self.home, "serial": self.serial,
                "not_after": self.not_after.isoformat(), "domains": list(self.names)}


class SharedCerts:
    """The certificates of the apps of the routing mesh (see the module): those of this
    host's apps published, the other homes' served here. ``sni`` is the shared HTTPS
    frontend's router (the driver's)."""

    def __init__(self, mesh: Mesh, sni: SniRouter) -> None:
        self.mesh = mesh
        self.sni = sni
        # publishing: this host's apps' certificates in service, and the records in the ledger
        self.wanted: dict[str, dict[str, Any]] = {}
        self.published: dict[str, dict[str, Any]] = {}
        self.gone: set[str] = set()  # apps whose record is to be released
        self.learned = False  # ``published`` read from the ledger at least once
        self.refused: str | None = None  # why the kernel keeps no certificate (no cluster key)
        self._lock = asyncio.Lock()
        # serving: apps attached here as a share of their home's, and what is in service
        self.followed: set[str] = set()
        self.served: dict[str, Borrowed] = {}
        self._unusable: dict[str, str] = {}  # app -> fingerprint of a record said unusable
        self._said: dict[str, str] = {}  # app -> the last publishing problem said

    # -- publishing (the home) -----------------------------------------------------------------

    def publish(self, app: str, domains: Iterable[str], cert_pem: bytes, key_pem: bytes, *,
                mode: str) -> None:
        """``app``'s certificate went into service here: publish it (in the background)."""
        try:
            value = certificate_value(domains, cert_pem, key_pem, mode=mode)
        except ValueError:
            log.warning("certificate not published: its chain does not parse", app=app)
            return
        self.wanted[app] = value
        self.gone.discard(app)
        self.mesh._background(self.push())

    def withdraw(self, app: str) -> None:
        """``app``'s certificate is no longer in service here: release its record (in the
        background) if this host has published one."""
        self.wanted.pop(app, None)
        if app in self.published or not self.learned:
            self.gone.add(app)
            self.mesh._background(self.push())

    async def push(self) -> None:
        """Claim the records that changed and release those withdrawn (one call per app); a
        failure is logged (said once) and tried again by the next round."""
        if not await self.mesh.cluster():
            return
        async with self._lock:
            if not self.learned:  # what an earlier process published: not claimed again
                try:
                    listed = (await self.mesh._call("ledger.list", {"kind": CERTIFICATE}))
                except CorralError as exc:
                    log.warning("routing mesh: certificates not read", error=exc.reason)
                    return
                self._learn(listed["records"])
            if self.wanted and CERTIFICATE not in self.mesh.sealed and self.refused is None:
                self.refused = ("the kernel does not seal certificate records (an older "
                                "corral): private keys are not published unsealed")
                log.warning("certificates not shared with the other hosts: they serve this "
                            "host's apps over HTTP only", host=self.mesh.host,
                            reason=self.refused)
            for app, value in sorted(self.wanted.items()):
                if self.refused is not None:
                    break
                if self.published.get(app) == value:
                    continue
                try:
                    await self.mesh._call("ledger.claim", {"owner": app, "claims": [
                        {"kind": CERTIFICATE, "key": app, "value": value}]})
                except CorralError as exc:
                    if exc.code == ErrorCode.INVALID:  # no cluster key: nothing to seal with
                        self.refused = exc.reason
                        log.warning("certificates not shared with the other hosts: they serve "
                                    "this host's apps over HTTP only", host=self.mesh.host,
                                    reason=exc.reason)
                    else:
                        self._say(app, "certificate not published (tried again every round)",
                                  exc.reason)
                    continue
                self.published[app] = value
                self._said.pop(app, None)
                log.info("certificate published to the other hosts", app=app,
                         serial=value.get("serial"), not_after=value.get("not_after"))
            for app in sorted(self.gone):
                if app in self.wanted or (self.learned and app not in self.published):
                    self.gone.discard(app)
                    continue
                try:
                    await self.mesh._call("ledger.release", {
                        "owner": app, "keys": [[CERTIFICATE, app]]})
                except CorralError as exc:
                    if exc.code != ErrorCode.CONFLICT:  # CONFLICT: adopted by another host
                        self._say(app, "certificate record not released (tried again every "
                                  "round)", exc.reason)
                        continue
                self.gone.discard(app)
                self.published.pop(app, None)
                log.info("certificate record released", app=app)

    def _say(self, app: str, what: str, reason: str) -> None:
        if self._said.get(app) != reason:
            self._said[app] = reason
            log.warning(what, app=app, error=reason)

    # -- what the ledger holds ------------------------------------------------------------------

    async def view(self) -> ClusterCerts:
        """The apps followed here and the certificate records (empty on one host, or when the
        ledger cannot be read: logged, and the app is taken as homed here)."""
        if not await self.mesh.cluster():
            return ClusterCerts()
        try:
            shares = (await self.mesh._call("ledger.list", {"kind": SATELLITE}))["records"]
            records = (await self.mesh._call("ledger.list", {"kind": CERTIFICATE}))["records"]
        except CorralError as exc:
            log.warning("routing mesh: certificates not read; apps attached now are taken as "
                        "homed here", error=exc.reason)
            return ClusterCerts()
        return ClusterCerts(frozenset(str(r.get("key")) for r in shares),
                            {app: value for app, (_, value) in _by_app(records).items()})

    def follow(self, app: str) -> None:
        """``app`` is attached here as a share of its home's: its home's certificate is
        served for it (from the next round on)."""
        self.followed.add(app)

    def forget(self, app: str) -> None:
        """``app`` (another host's) is no longer served here: its certificate leaves."""
        self._unserve(app)

    def unfollow(self, app: str) -> None:
        """``app`` is no longer attached here as a share: its home's certificate leaves."""
        if app in self.followed:
            self.followed.discard(app)
            self._unserve(app)

    # -- the round ------------------------------------------------------------------------------

    async def round(self, records: list[dict[str, Any]]) -> None:
        """Take the listed ``certificate`` records: this host's (what is published) and the
        other homes' (served here, under the mesh's lock, for the apps whose certificate is
        theirs)."""
        async with self._lock:
            self._learn(records)
        async with self.mesh.lock:
            await self._serve({app: (home, value)
                               for app, (home, value) in _by_app(records).items() if home})

    def _learn(self, records: list[dict[str, Any]]) -> None:
        """This host's records among ``records`` are what is published."""
        self.published = {app: dict(value) for app, (home, value) in _by_app(records).items()
                          if not home}
        self.learned = True

    async def _serve(self, theirs: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        borrowing: dict[str, LbConfig] = dict(self.mesh.serving)
        for app in self.followed:
            cfg = self.mesh.local.get(app)
            if cfg is not None:
                borrowing[app] = cfg
        for app in [a for a in self.served if a not in borrowing]:
            self._unserve(app)  # no longer the mesh's (gone, or this host's own now)
        now = datetime.now(UTC)
        for app, cfg in sorted(borrowing.items()):
            found = theirs.get(app) if cfg.tls is not None and cfg.domains else None
            current = self.served.get(app)
            if found is None:
                if current is not None:
                    self._unserve(app, insecure=True)
                    log.info("another host's certificate no longer served here", app=app)
                continue
            home, value = found
            fingerprint = _fingerprint(value)
            if current is not None and current.fingerprint == fingerprint and (
                    current.domains == tuple(cfg.domains)):
                if now < current.not_after:
                    self._secure(app, current.complete)
                    continue
                self._unserve(app, insecure=True)  # expired: the load below says so, once
            if self._unusable.get(app) == fingerprint:
                continue
            try:
                loaded = await asyncio.to_thread(_load, value)
            except (CertError, ssl.SSLError, ValueError) as exc:
                self._unusable[app] = fingerprint
                log.warning("another host's certificate not served here: its record does not "
                            "load", app=app, home=home, error=str(exc))
                continue
            self._unusable.pop(app, None)
            self._put(app, cfg, Borrowed(
                home, fingerprint, loaded.context,
                tuple(d for d in cfg.domains if covers(loaded.names, d)), tuple(cfg.domains),
                loaded.serial, loaded.not_after))

    def _put(self, app: str, cfg: LbConfig, borrowed: Borrowed) -> None:
        """Serve ``borrowed`` for ``app`` from the next handshake on, in place of what was."""
        current = self.served.get(app)
        if current is not None:
            self._remove_ours([n for n in current.names if n not in borrowed.names],
                              current.context)
        if borrowed.names:
            self.sni.set(borrowed.names, borrowed.context)
        self.served[app] = borrowed
        self._secure(app, borrowed.complete)
        missing = [d for d in cfg.domains if d not in borrowed.names]
        log.info("serving another host's certificate", app=app, home=borrowed.home,
                 domains=list(borrowed.names), serial=borrowed.serial,
                 not_after=borrowed.not_after.isoformat(), not_covered=missing or None)

    def _unserve(self, app: str, *, insecure: bool = False) -> None:
        """Take ``app``'s borrowed certificate out of the SNI router (the names still routed
        to it: an app homed here now has put its own there); ``insecure``: stop redirecting
        its HTTP to HTTPS."""
        borrowed = self.served.pop(app, None)
        if borrowed is not None:
            self._remove_ours(borrowed.names, borrowed.context)
        if insecure:
            self._secure(app, False)

    def _remove_ours(self, names: Iterable[str], ctx: ssl.SSLContext) -> None:
        ours = [n for n in names if self.sni.lookup(n) is ctx]
        if ours:
            self.sni.remove(ours)

    def _secure(self, app: str, secure: bool) -> None:
        edge = self.mesh.balancer.edge
        site = edge.sites.get(app) if edge is not None else None
        if edge is not None and site is not None and site.secure != secure:
            edge.set_secure(app, secure)


def _by_app(records: Iterable[Mapping[str, Any]]
            ) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Listed ``certificate`` records by app -> (home, value): home "" for this host's; a
    record whose owner is not its app (``<app>`` or ``<app>@<host>``) is left out."""
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for rec in records:
        key, value = str(rec.get("key") or ""), rec.get("value")
        app, _, home = str(rec.get("owner") or "").partition(SEP)
        if key and app == key and isinstance(value, Mapping):
            out[key] = (home, value)
    return out


class SharedChallenges:
    """The ACME responder of a host of the routing mesh (see the module): ``put`` and
    ``remove`` are called from the issuing thread; ``get`` (the shared HTTP frontend's
    answer) and ``round`` run on the event loop (``loop``, set by the mesh)."""

    def __init__(self, mesh: Mesh, local: ChallengeStore) -> None:
        self.mesh = mesh
        self.local = local
        self.remote: dict[str, str] = {}  # the other hosts' tokens -> key authorizations
        self.mine: set[str] = set()  # tokens this host has claimed (changed on the loop)
        self.loop: asyncio.AbstractEventLoop | None = None

    def get(self, token: str) -> str | None:
        """The key authorization for ``token``: this host's order's, else another host's."""
        answer = self.local.get(token)
        return answer if answer is not None else self.remote.get(token)

    def put(self, token: str, key_authorization: str) -> None:
        """Answer ``token`` here at once; on a shared ledger also claim it and return once
        every other live host's lb answers it too (``ACK_WAIT_S`` at most)."""
        self.local.put(token, key_authorization)
        self._on_loop(self._share(token, key_authorization), ACK_WAIT_S + 3 * CALL_TIMEOUT_S)

    def remove(self, token: str) -> None:
        """Stop answering ``token`` here and release its record."""
        self.local.remove(token)
        self._on_loop(self._unshare(token), 2 * CALL_TIMEOUT_S)

    def _on_loop(self, work: Coroutine[Any, Any, None], timeout: float) -> None:
        """Run ``work`` on the loop and wait for it (at most ``timeout``); on the loop's own
        thread it is only started (waiting there would stop the loop)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            work.close()
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.mesh._background(work)
            return
        try:
            future = asyncio.run_coroutine_threadsafe(work, loop)
        except RuntimeError:  # the loop is closing: this host's answer is all there is
            work.close()
            return
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            log.warning("acme challenge: the other hosts not waited for any longer")
        except Exception:  # a bug: the order goes on with this host's answer
            log.exception("acme challenge not shared")

    async def _share(self, token: str, key_authorization: str) -> None:
        if not await self.mesh.cluster():
            return
        self.mine.add(token)
        try:
            await self.mesh._call("ledger.claim", {"owner": OWNER, "claims": [
                {"kind": CHALLENGE, "key": token,
                 "value": {"key_authorization": key_authorization}}]})
        except CorralError as exc:
            log.warning("acme challenge not shared: only this host answers it", token=token,
                        error=exc.reason)
            return
        await self._acknowledged(token)

    async def _acknowledged(self, token: str) -> None:
        """Wait until every other live host has acknowledged ``token`` (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACK_WAIT_S
        missing: list[str] = []
        while True:
            try:
                records = (await self.mesh._call("ledger.list", {"kind": CHALLENGE}))["records"]
                alive = (await self.mesh._call("ledger.list", {"kind": ALIVE}))["records"]
            except CorralError as exc:
                missing = [f"(ledger not read: {exc.reason})"]
            else:
                acked = {by for rec in records
                         for t, sep, by in [str(rec.get("key") or "").partition(SEP)]
                         if sep and t == token and rec.get("owner") == f"{OWNER}{SEP}{by}"}
                hosts = {str(r.get("key")) for r in alive} - {self.mesh.host}
                missing = sorted(hosts - acked)
                if not missing:
                    log.info("acme challenge answered by every host", token=token,
                             hosts=sorted(acked) or None)
                    return
            if loop.time() >= deadline:
                log.warning("acme challenge not acknowledged by every host: the CA may ask "
                            "one that does not answer it", token=token, missing=missing)
                return
            await asyncio.sleep(ACK_POLL_S)

    async def _unshare(self, token: str) -> None:
        if token not in self.mine:
            return
        try:
            await self.mesh._call("ledger.release", {"owner": OWNER,
                                                     "keys": [[CHALLENGE, token]]})
        except CorralError as exc:  # the next round releases it (ours, and not in ``mine``)
            log.warning("acme challenge record not released", token=token, error=exc.reason)
        self.mine.discard(token)

    async def round(self, records: list[dict[str, Any]]) -> None:
        """Take the listed ``acme-challenge`` records: answer the other hosts' tokens from now
        on and acknowledge them (once the shared HTTP frontend is open); release this host's
        acknowledgements of tokens gone, and its own tokens of orders no longer running."""
        host = self.mesh.host
        remote: dict[str, str] = {}
        own: set[str] = set()
        acked: set[str] = set()
        for rec in records:
            owner = str(rec.get("owner") or "")
            token, sep, by = str(rec.get("key") or "").partition(SEP)
            if not token:
                continue
            if sep:
                if owner == OWNER and by == host:
                    acked.add(token)
            elif owner == OWNER:
                own.add(token)
            elif owner.startswith(OWNER + SEP):
                answer = (rec.get("value") or {}).get("key_authorization")
                if isinstance(answer, str) and answer:
                    remote[token] = answer
        self.remote = remote
        edge = self.mesh.balancer.edge
        answering = edge is not None and edge.http is not None
        new = sorted(t for t in remote if t not in acked) if answering else []
        stale = ([[CHALLENGE, f"{t}{SEP}{host}"] for t in sorted(acked - remote.keys())]
                 + [[CHALLENGE, t] for t in sorted(own - self.mine)])
        try:
            if new:
                await self.mesh._call("ledger.claim", {"owner": OWNER, "claims": [
                    {"kind": CHALLENGE, "key": f"{t}{SEP}{host}", "value": {"host": host}}
                    for t in new]})
                log.info("acme challenges of other hosts answered here", tokens=new)
            if stale:
                await self.mesh._call("ledger.release", {"owner": OWNER, "keys": stale})
        except CorralError as exc:
            log.warning("routing mesh: acme challenges not acknowledged", error=exc.reason)
