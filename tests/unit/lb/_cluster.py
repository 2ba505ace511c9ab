"""A fake kernel link for the lb's routing mesh: hosts sharing one ledger, on one machine.

``ClusterKernel`` serves the operations the lb calls (``kernel.status``, ``ledger.claim``,
``ledger.release``, ``ledger.list``, ``event.publish``) as a kernel on a shared ledger serves
them: through the real ``HostView`` of its host over one SQLite ledger, so owners come back
as ``app@host`` for other hosts' records and conflicts name their holder exactly as on etcd.
The values of sealed kinds (``certificate``) are sealed as the kernel seals them, with the
real ``corral.replication.Channel`` under the cluster's key, before they reach the ledger,
and opened in ``ledger.list`` answers (the lb is a driver peer); a kernel without the key
(``keyed=False``) refuses such a claim with INVALID naming ``[host] cluster_key``.
``Cluster`` writes what the other hosts' kernels and lbs would: live hosts, their backends,
their certificates and ACME challenges.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.ledger import SEALED_KINDS, Claim, HostView, SqliteLedger
from corral.protocol import AppSpec, InstanceRecord, InstanceSpec, Welcome
from corral.replication import Channel
from corral_lb.driver import LbDriver

HEALTH = {"tcp": True, "interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1}


def lb_section(name: str, frontend: int | str | None, *, mode: str = "http",
               **extra: Any) -> dict[str, Any]:
    """An app's resolved ``[lb]`` section, as the kernel hands it over."""
    return {"name": name, "frontend": frontend, "mode": mode, "plane": None,
            "health": dict(HEALTH), "idle": None, "process": "web", **extra}


def app_spec(name: str, lb: dict[str, Any]) -> AppSpec:
    """An app with ``lb`` as its ``[lb]`` section and a config var that must never leave it."""
    return AppSpec(name=name, directory="/tmp", manifest={
        "lb": lb, "env": {"SECRET": "not-for-the-ledger"}})


def instance(app: str, port: int, *, address: str = "127.0.0.1", index: int = 1
             ) -> InstanceRecord:
    """A ready instance of ``app``'s web process on ``address:port``."""
    spec = InstanceSpec(id=f"{app}.web.{index}", app=app, process="web", index=index,
                        argv=["x"], env={"SECRET": "not-for-the-ledger"}, cwd="/tmp",
                        port=port)
    return InstanceRecord(spec=spec, pid=1, start_time=0.0, state="ready", address=address)


class ClusterKernel:
    """The kernel of host ``host`` on the shared ``ledger``, as the lb's mesh calls it;
    ``channel`` seals and opens the sealed kinds (None: no cluster key on this host)."""

    def __init__(self, ledger: SqliteLedger, host: str, *, shared: bool = True,
                 channel: Channel | None = None) -> None:
        self.view = HostView(ledger, host)
        self.host = host
        self.shared = shared
        self.channel = channel
        self.calls: list[str] = []
        self.claims: list[tuple[str, str, str]] = []  # (owner, kind, key) of each claim
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.unavailable = False  # the ledger does not answer (a lost etcd quorum)
        self.seals = shared  # says which kinds it seals (False: a kernel from before sealing)

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        args = args or {}
        self.calls.append(op)
        if op == "kernel.status":
            return {"host": self.host, "shared_ledger": self.shared,
                    **({"sealed_kinds": sorted(SEALED_KINDS)} if self.seals else {})}
        if op == "event.publish":
            self.events.append((args["topic"], args["data"]))
            return {}
        if self.unavailable:
            raise CorralError("ledger unavailable: no quorum", code=ErrorCode.UNAVAILABLE)
        if op == "ledger.claim":
            claims = [Claim(c["kind"], c["key"], self._seal(c["kind"], c["key"],
                                                            c.get("value") or {}))
                      for c in args["claims"]]
            revision = self.view.claim(args["owner"], claims)
            self.claims += [(args["owner"], c.kind, c.key) for c in claims]
            return {"revision": revision}
        if op == "ledger.release":
            keys = args.get("keys")
            return {"revision": self.view.release(
                args["owner"], None if keys is None else [(k, v) for k, v in keys])}
        if op == "ledger.list":
            found = self.view.list(owner=args.get("owner"), kind=args.get("kind"))
            return {"revision": self.view.revision(), "records": [
                {"kind": r.kind, "key": r.key, "owner": r.owner, "since": r.since,
                 "revision": r.revision, "value": self._open(r.kind, r.key, r.value)}
                for r in found]}
        raise AssertionError(f"the lb called {op!r}")

    def _seal(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        if kind not in SEALED_KINDS:
            return value
        if self.channel is None:
            raise CorralError(f"a {kind} record holds a secret: it is sealed under the cluster "
                              "key, which this host has none of (set [host] cluster_key)",
                              code=ErrorCode.INVALID, retry=False)
        return self.channel.seal_record(kind, key, value)

    def _open(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        if kind not in SEALED_KINDS:
            return dict(value)
        if self.channel is None:
            return {"sealed": True}
        return self.channel.open_record(kind, key, value)


class Cluster:
    """One shared ledger and the cluster's key; what the other hosts write into it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ledger = SqliteLedger(tmp / "ledger.sqlite3")
        self.channel = Channel(os.urandom(32))

    def close(self) -> None:
        self.ledger.close()

    def kernel(self, host: str, *, keyed: bool = True) -> ClusterKernel:
        """Host ``host``'s kernel (sealing with the cluster's key, unless not ``keyed``)."""
        return ClusterKernel(self.ledger, host, channel=self.channel if keyed else None)

    def driver(self, host: str, *, shared: bool = True, keyed: bool = True
               ) -> tuple[LbDriver, ClusterKernel]:
        """An lb driver of host ``host`` (alive, address 10.0.0.<n>) and its kernel."""
        d = LbDriver()
        kernel = ClusterKernel(self.ledger, host, shared=shared,
                               channel=self.channel if keyed else None)
        d.kernel = kernel  # type: ignore[assignment]
        self.alive(host)
        return d, kernel

    def edge_driver(self, host: str, http_port: int, https_port: int, *, keyed: bool = True,
                    **config: Any) -> tuple[LbDriver, ClusterKernel]:
        """``driver`` welcomed with shared HTTP and HTTPS frontends on 127.0.0.1 (``config``:
        more of its ``[drivers.lb] config``, e.g. ``acme_directory``), its home under the
        cluster's directory."""
        d, kernel = self.driver(host, keyed=keyed)
        home = self.tmp / host
        home.mkdir(exist_ok=True)
        d.welcomed(Welcome(peer_id="lb", heartbeat_ms=1000, home=str(home), config={
            "http_port": http_port, "https_port": https_port, "edge_address": "127.0.0.1",
            **config}))
        return d, kernel

    def alive(self, host: str) -> None:
        """Host ``host``'s kernel holds its lease (its host-alive record, as hosts.py writes
        it, address 10.0.0.<n> for h<n>)."""
        self.ledger.put(f"host:{host}", "host-alive", host,
                        {"address": f"10.0.0.{host.lstrip('h')}", "pid": 1})

    def lost(self, host: str) -> None:
        """Host ``host``'s lease expired."""
        self.ledger.release(f"host:{host}", [("host-alive", host)])

    def publish(self, host: str, app: str, index: int, address: str, port: int,
                lb: dict[str, Any]) -> str:
        """What host ``host``'s lb publishes for instance ``<app>.web.<index>``; its key."""
        iid = f"{app}.web.{index}"
        key = f"{app}/{iid}@{host}"
        HostView(self.ledger, host).claim(app, [Claim("backend", key, {
            "host": host, "app": app, "instance": iid, "address": address, "port": port,
            "process": "web", "lb": lb})])
        return key

    def unpublish(self, host: str, app: str, key: str) -> None:
        """Host ``host``'s lb releases a backend record."""
        HostView(self.ledger, host).release(app, [("backend", key)])

    def backends(self, seen_from: str = "h9") -> dict[str, tuple[str, dict[str, Any]]]:
        """Every backend record, as another host lists them: key -> (owner, value)."""
        return {r.key: (r.owner, dict(r.value))
                for r in HostView(self.ledger, seen_from).list(kind="backend")}

    def frontends(self, host: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """Host ``host``'s lb-frontend records (what its mesh serves on): port -> (owner,
        value)."""
        return {r.key: (r.owner, dict(r.value))
                for r in HostView(self.ledger, host).list(kind="lb-frontend")}

    def ports(self, host: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """Host ``host``'s port records: port -> (owner, value)."""
        return {r.key: (r.owner, dict(r.value))
                for r in HostView(self.ledger, host).list(kind="port")}

    def certificate(self, host: str, app: str, value: dict[str, Any]) -> None:
        """Host ``host``'s lb publishes ``app``'s certificate (sealed by its kernel)."""
        HostView(self.ledger, host).claim(app, [Claim("certificate", app, self.channel.seal_record(
            "certificate", app, value))])

    def uncertify(self, host: str, app: str) -> None:
        """Host ``host``'s lb releases ``app``'s certificate record."""
        HostView(self.ledger, host).release(app, [("certificate", app)])

    def adopt_certificate(self, app: str, old: str, new: str) -> None:
        """The kernel of ``new`` adopting ``app`` from ``old``: the record's owner moves."""
        rec = self.ledger.get("certificate", app)
        assert rec is not None and rec.owner == f"{app}@{old}", rec
        self.ledger.release(rec.owner, [("certificate", app)])
        self.ledger.claim(f"{app}@{new}", [Claim("certificate", app, rec.value)])

    def certificates(self, seen_from: str = "h9") -> dict[str, tuple[str, dict[str, Any]]]:
        """Every certificate record as another host's lb lists it (opened): app -> (owner,
        value)."""
        return {r.key: (r.owner, self.channel.open_record("certificate", r.key, r.value))
                for r in HostView(self.ledger, seen_from).list(kind="certificate")}

    def stored(self, kind: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """What the ledger itself holds of ``kind`` (etcd's view): key -> (owner, value)."""
        return {r.key: (r.owner, dict(r.value)) for r in self.ledger.list(kind=kind)}

    def challenges(self, seen_from: str = "h9") -> dict[str, tuple[str, dict[str, Any]]]:
        """Every acme-challenge record (tokens and acknowledgements): key -> (owner, value)."""
        return {r.key: (r.owner, dict(r.value))
                for r in HostView(self.ledger, seen_from).list(kind="acme-challenge")}

    def satellite(self, host: str, app: str, home: str) -> None:
        """Host ``host``'s kernel runs a share of ``app`` for ``home`` (its satellite record,
        claimed in the deploy before app.attach)."""
        HostView(self.ledger, host).claim(app, [Claim("satellite", app, {"home": home})])
