"""The hosts a ledger serves: each kernel registers its host under a lease it keeps alive.

Two records per host, owned by ``host:<name>``:

- ``host/<name>``: who the host is (address, when it joined, when it was last seen), kept
  after the host goes, so ``corral hosts`` can say "lost since";
- ``host-alive/<name>``: claimed under a lease of ``host_ttl_s``, refreshed every third of
  it with the host's figures (instances, CPUs, memory free). When the kernel stops cleanly it
  revokes the lease; when the host dies the lease expires and the record vanishes (on etcd,
  for every host at once).

Several hosts live on one ledger (etcd) at once: each kernel sees it through its host's
``HostView`` (app names, lb names, domains and uids unique in the cluster; host ports,
instances and what drivers hold, per host), and these records are the cluster's, written
through the shared ledger itself (owner ``host:<name>``, no view). What is not there yet
(placing one app's instances across hosts, re-placing a lost host's): docs/etcd.md.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import psutil
import structlog

from corral.errors import ConflictError, CorralError, NotFoundError
from corral.ledger import Ledger, Txn

log = structlog.get_logger("corral.hosts")

HOST = "host"
ALIVE = "host-alive"
APP = "app"
SUBNET = "subnet"
FORGET_BATCH = 64  # records released per transaction (etcd allows 128 operations in one)


def host_name(configured: str | None) -> str:
    """This host's name: the configured one, else the system's first label made a DNS label
    (lowercase; anything else than letters, digits and '-' becomes '-')."""
    if configured:
        return configured
    import re

    label = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().split(".")[0].lower())
    return label.strip("-")[:63].strip("-") or "localhost"


@dataclass
class HostRegistry:
    """This kernel's registration of its host in the ledger."""

    ledger: Ledger
    name: str
    address: str | None
    ttl_s: float
    labels: tuple[str, ...] = ()
    lease: str | None = None
    token: str = ""
    renewed_at: float = 0.0
    """``time.monotonic()`` when the last successful renewal (or registration) was sent:
    the lease runs at least ``ttl_s`` from then."""
    cordoned: bool = False
    """Drained (``corral hosts drain``): no app, share or adoption is placed here any more,
    until the kernel restarts; its alive record says so (``cordoned``)."""
    _instances: int = 0

    @property
    def owner(self) -> str:
        """The ledger owner of this host's records."""
        return f"host:{self.name}"

    def register(self, instances: int = 0) -> None:
        """Claim this host's records under a new lease. On a local ledger (SQLite) another
        live host is refused (ConflictError). A live record of this host's name
        left by a kernel of this address (one killed, its lease not yet expired) is replaced;
        one of another address is another machine using the same name: refused
        (ConflictError), since two kernels under one name would take each other's records."""
        if not self.ledger.remote:
            # a local file (SQLite) is one host's: kernels sharing it would see each other's
            # records as their own (only a networked ledger is seen through host views)
            for rec in self.ledger.list(kind=ALIVE):
                if rec.key != self.name:
                    raise ConflictError(
                        f"this ledger is in use by host {rec.key!r} (alive, kernel pid "
                        f"{rec.value.get('pid')}); a local ledger serves one host, several "
                        "hosts share an etcd ledger (see docs/etcd.md)", kind=ALIVE,
                        key=rec.key, holder=rec.owner, since=rec.since)
        alive = self.ledger.get(ALIVE, self.name)
        theirs = alive.value.get("address") if alive is not None else None
        if alive is not None and theirs and self.address and theirs != self.address:
            raise ConflictError(
                f"host name {self.name!r} is in use by the kernel at {theirs} (alive, kernel "
                f"pid {alive.value.get('pid')}); give this host another [host] name",
                kind=ALIVE, key=self.name, holder=alive.owner, since=alive.since)
        self.token = secrets.token_hex(8)
        sent = time.monotonic()
        self.lease = self.ledger.grant_lease(self.ttl_s, self.owner)
        now = time.time()
        known = self.ledger.get(HOST, self.name)
        joined = (known.value.get("joined") if known else None) or now
        txn = Txn()
        txn.claim(self.owner, HOST, self.name, {"address": self.address, "joined": joined,
                                                "last_seen": now})
        txn.claim(self.owner, ALIVE, self.name, self._figures(instances), lease=self.lease)
        self.ledger.commit(txn)
        self.renewed_at = sent
        log.info("host registered", host=self.name, ttl_s=self.ttl_s)

    def _figures(self, instances: int) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        self._instances = instances
        return {"pid": os.getpid(), "token": self.token, "address": self.address,
                "labels": list(self.labels), "cordoned": self.cordoned,
                "instances": instances, "cpus": os.cpu_count() or 1,
                "memory_total": int(mem.total), "memory_available": int(mem.available),
                "load1": round(os.getloadavg()[0], 2), "seen": time.time()}

    def keepalive(self, instances: int = 0) -> None:
        """Keep the lease alive and refresh the figures; register again if it was lost."""
        if self.lease is None:
            self.register(instances)
            return
        sent = time.monotonic()
        try:
            self.ledger.keepalive(self.lease)
            self.renewed_at = sent
        except NotFoundError:
            log.warning("host lease lost; registering again", host=self.name)
            self.register(instances)
            return
        txn = Txn()
        txn.claim(self.owner, ALIVE, self.name, self._figures(instances), lease=self.lease)
        known = self.ledger.get(HOST, self.name)
        value = dict(known.value) if known else {"address": self.address,
                                                 "joined": time.time()}
        value["last_seen"] = time.time()
        txn.claim(self.owner, HOST, self.name, value)
        self.ledger.commit(txn)

    def cordon(self) -> None:
        """Mark this host drained now, in its alive record (``cordoned``): the hosts deal
        it no share and adopt nothing onto it any more (a new lease keeps the mark)."""
        self.cordoned = True
        if self.lease is not None:
            self.ledger.commit(Txn().claim(self.owner, ALIVE, self.name,
                                           self._figures(self._instances), lease=self.lease))

    def leave(self) -> None:
        """Revoke the lease: the host is gone at once (a clean stop)."""
        if self.lease is not None:
            try:
                self.ledger.revoke(self.lease)
            except CorralError as exc:
                log.warning("host lease not revoked", host=self.name, error=str(exc))
            self.lease = None


def host_of(owner: str, this: str) -> str:
    """The host an owner's records belong to: ``shop@h1`` is h1's; an owner without a host
    (a local ledger's) is ``this`` host's."""
    base, at, host = owner.rpartition("@")
    return host if at and base and host else this


def list_hosts(ledger: Ledger, this: str) -> list[dict[str, Any]]:
    """Every host the ledger knows: its state (``ready``, or ``lost`` since its last sign of
    life), address, the apps deployed on it, its instance subnets (the net driver's, routed
    to by the other hosts), instances and free capacity. ``ledger``: the
    shared ledger itself, not a host's view; ``this``: the asking kernel's host."""
    alive = {r.key: r for r in ledger.list(kind=ALIVE)}
    leading = ledger.get("leader", "cluster")
    apps: dict[str, list[str]] = {}
    for app in ledger.list(kind=APP):
        apps.setdefault(host_of(app.owner, this), []).append(app.key)
    subnets: dict[str, list[str]] = {}  # the net driver's instance subnets, one per host
    for sub in ledger.list(kind=SUBNET):
        subnets.setdefault(host_of(sub.owner, this), []).append(sub.key)
    out = []
    for rec in ledger.list(kind=HOST):
        live = alive.get(rec.key)
        row: dict[str, Any] = {"name": rec.key, "address": rec.value.get("address"),
                               "joined": rec.value.get("joined"),
                               "last_seen": rec.value.get("last_seen"),
                               "apps": sorted(apps.get(rec.key, [])),
                               "subnets": sorted(subnets.get(rec.key, [])),
                               "leader": leading is not None
                               and leading.owner == f"host:{rec.key}"}
        if live is not None:
            row.update(state="ready", **{k: live.value.get(k) for k in (
                "pid", "instances", "cpus", "memory_total", "memory_available", "load1")},
                cordoned=bool(live.value.get("cordoned")),
                labels=list(live.value.get("labels") or []))
        else:
            row.update(state="lost", lost_since=rec.value.get("last_seen"))
        out.append(row)
    return out


def forget_host(ledger: Ledger, name: str, this: str) -> dict[str, Any]:
    """Release everything host ``name`` holds in the shared ``ledger`` (its apps' names, lb
    names, domains, uids and releases; its ports, paths, instances and driver records; its
    own host record), so that other hosts may take its apps' names. For a host lost for
    good: refused (ConflictError) while it is alive, and for ``this`` host. Released in
    batches, each all or nothing, each record only if the lost host's owner still holds it;
    a rerun after an interruption finishes the job. Returns what went, by kind."""
    if name == this:
        raise ConflictError(f"host {name!r} is this host; forget it from another host",
                            kind=HOST, key=name, holder=f"host:{name}")
    alive = ledger.get(ALIVE, name)
    if alive is not None:
        raise ConflictError(
            f"host {name!r} is alive (kernel pid {alive.value.get('pid')}, last seen "
            f"{time.ctime(float(alive.value.get('seen') or 0))}); only a lost host can be "
            "forgotten", kind=ALIVE, key=name, holder=alive.owner, since=alive.since)
    known = ledger.get(HOST, name)
    held = [r for r in ledger.list() if r.kind not in (HOST, ALIVE) and (
        host_of(r.owner, "") == name or r.key.startswith(f"@{name}/"))]
    if known is None and not held:
        raise NotFoundError(f"the ledger knows no host named {name!r}")
    gone: dict[str, int] = {}
    for start in range(0, len(held), FORGET_BATCH):
        txn = Txn()
        for rec in held[start:start + FORGET_BATCH]:
            txn.release(rec.owner, rec.kind, rec.key)
            gone[rec.kind] = gone.get(rec.kind, 0) + 1
        ledger.commit(txn)
    if known is not None:
        ledger.release(known.owner, [(HOST, name)])
    log.warning("host forgotten", host=name, released=gone)
    return {"host": name, "released": gone}
