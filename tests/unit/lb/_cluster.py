"""A fake kernel link for the lb's routing mesh: hosts sharing one ledger, on one machine.

``ClusterKernel`` serves the operations the lb calls (``kernel.status``, ``ledger.claim``,
``ledger.release``, ``ledger.list``, ``event.publish``) as a kernel on a shared ledger serves
them: through the real ``HostView`` of its host over one SQLite ledger, so owners come back
as ``app@host`` for other hosts' records and conflicts name their holder exactly as on etcd.
``Cluster`` writes what the other hosts' kernels and lbs would: live hosts, their backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.ledger import Claim, HostView, SqliteLedger
from corral.protocol import AppSpec, InstanceRecord, InstanceSpec
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
    """The kernel of host ``host`` on the shared ``ledger``, as the lb's mesh calls it."""

    def __init__(self, ledger: SqliteLedger, host: str, *, shared: bool = True) -> None:
        self.view = HostView(ledger, host)
        self.host = host
        self.shared = shared
        self.calls: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.unavailable = False  # the ledger does not answer (a lost etcd quorum)

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        args = args or {}
        self.calls.append(op)
        if op == "kernel.status":
            return {"host": self.host, "shared_ledger": self.shared}
        if op == "event.publish":
            self.events.append((args["topic"], args["data"]))
            return {}
        if self.unavailable:
            raise CorralError("ledger unavailable: no quorum", code=ErrorCode.UNAVAILABLE)
        if op == "ledger.claim":
            claims = [Claim(c["kind"], c["key"], c.get("value") or {}) for c in args["claims"]]
            return {"revision": self.view.claim(args["owner"], claims)}
        if op == "ledger.release":
            keys = args.get("keys")
            return {"revision": self.view.release(
                args["owner"], None if keys is None else [(k, v) for k, v in keys])}
        if op == "ledger.list":
            found = self.view.list(owner=args.get("owner"), kind=args.get("kind"))
            return {"revision": self.view.revision(), "records": [
                {"kind": r.kind, "key": r.key, "owner": r.owner, "since": r.since,
                 "revision": r.revision, "value": r.value} for r in found]}
        raise AssertionError(f"the lb called {op!r}")


class Cluster:
    """One shared ledger; what the other hosts write into it."""

    def __init__(self, tmp: Path) -> None:
        self.ledger = SqliteLedger(tmp / "ledger.sqlite3")

    def close(self) -> None:
        self.ledger.close()

    def driver(self, host: str, *, shared: bool = True) -> tuple[LbDriver, ClusterKernel]:
        """An lb driver of host ``host`` (alive, address 10.0.0.<n>) and its kernel."""
        d = LbDriver()
        kernel = ClusterKernel(self.ledger, host, shared=shared)
        d.kernel = kernel  # type: ignore[assignment]
        self.alive(host)
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
