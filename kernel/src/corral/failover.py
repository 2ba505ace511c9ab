"""A lost host's apps started again on the others: leadership, adoption, eviction, fencing.

On an etcd ledger each app runs on the host that deployed it. When that host is lost (its
lease expired: ``host-alive/<name>`` gone), its apps move to the hosts still alive:

- **Leadership.** One kernel at a time leads: it holds ``leader/cluster`` under its host
  lease (compare-and-create, so a leader that dies frees it with its lease and the next
  kernel to look takes it). Every kernel watches the hosts' lease records (an etcd watch)
  and tries to lead whenever one changes; the leader then places each app of every lost
  host on a live one its ``[placement]`` allows (the host with the fewest apps first; host
  names and labels, ``[host] labels``), by asking that host to adopt it
  (``app.adopt`` through the host mail, ``corral.forwarding``). One that refuses (it lacks
  the release: not copied yet) is skipped for the next.
- **Adoption** (``transfer``, run by the adopting host): in one ledger transaction, only
  while the lost host is still lost and every record is as read, the app's cluster-wide
  records (name, uid, lb names, domains, releases) pass from ``<app>@<lost>`` to
  ``<app>@<this>``; the release copies (``corral.replication``) become the host's own
  releases; the current release starts with its config, as a rollback would. A start that
  fails gives everything back (``give_back``) and the leader tries another host.
- **Drain** (``corral hosts drain NAME``): a live host hands each of its apps to another the
  same way, one at a time; it writes ``handover/<app>`` (naming the receiving host) under
  its own lease first, which is what lets the receiving host take the records of a host
  that is alive; once the app serves there, the host stops its own instances.
- **Eviction** (``moved_away``): a kernel that starts, or gets its lease back, stops and
  forgets every app of its own whose name another host holds now: it was lost meanwhile and
  its apps were adopted. It rejoins with the apps it still holds.
- **Fencing** (``should_fence``): a kernel that has not renewed its lease for 60 % of its
  TTL asks every etcd member whether it has a leader. When none it reaches has one and the
  members it cannot reach are a majority (a quorum may go on among them, and re-place this
  host's apps), it stops its instances before its lease can expire, so an app never runs on
  two hosts longer than the TTL: a host cut off from the others stops its apps, while a
  cluster that lost its quorum everywhere (members down: no leader could re-place
  anything) keeps serving, and so does a host that still reaches a member with a leader
  (its renewal is only late).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from corral.errors import ConflictError, CorralError, NotFoundError
from corral.ledger import Ledger, Record, Txn
from corral.ledger._hosted import CLUSTER_KINDS

log = structlog.get_logger("corral.failover")

LEADER = "leader"
HANDOVER = "handover"
LEADER_KEY = "cluster"
ALIVE = "host-alive"
HOST = "host"
APP = "app"
PLACEMENT = "placement"  # corral.deploy._spread's (a spread app's share on another host)
RETRY_MAX_S = 30.0
MOVED = frozenset(CLUSTER_KINDS - {HOST, ALIVE, "subnet", "backend"})
"""The kinds an adoption moves: app names, lb names, domains, uids, releases, cron slots (a
lost host's subnet stays its own; its lb backends are dead instances, left to lapse)."""

Ask = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Runs an operation on another host: (host, operation, arguments) -> its result."""


def _split(owner: str) -> tuple[str, str]:
    base, at, host = owner.rpartition("@")
    return (base, host) if at else (owner, "")


def app_records(shared: Ledger, app: str, host: str) -> list[Record]:
    """The cluster-wide records app ``app`` of ``host`` holds (its own and its releases)."""
    found = shared.list(owner=f"{app}@{host}") + shared.list(owner=f"releases:{app}@{host}")
    return [r for r in found if r.kind in MOVED]


def transfer(shared: Ledger, app: str, lost: str, this: str, *, handover: bool = False
             ) -> list[Record]:
    """Move app ``app``'s cluster-wide records from host ``lost`` to host ``this``, all at
    once, only while ``lost`` is lost (or, with ``handover``, while ``lost`` hands the app to
    ``this``: its ``handover/<app>`` record, held under its lease, says so) and nothing of
    them changed meanwhile; return what was moved (the records as they were).
    ``ConflictError`` names what stood in the way."""
    txn = Txn()
    if handover:
        given = shared.get(HANDOVER, app)
        if given is None or given.owner != f"host:{lost}" or given.value.get("to") != this:
            raise ConflictError(f"host {lost!r} is not handing app {app!r} over to host "
                                f"{this!r}", kind=HANDOVER, key=app,
                                holder=given.owner if given else "")
        txn.expect_held(HANDOVER, app, given.owner, revision=given.revision)
    elif shared.get(ALIVE, lost) is not None:
        raise ConflictError(f"host {lost!r} is alive: its app {app!r} stays there",
                            kind=ALIVE, key=lost, holder=f"host:{lost}")
    else:
        txn.expect_free(ALIVE, lost)
    records = app_records(shared, app, lost)
    if not any(r.kind == APP and r.key == app for r in records):
        holder = shared.get(APP, app)
        if holder is not None and holder.owner == f"{app}@{this}":
            return []
        raise NotFoundError(f"host {lost!r} holds no app {app!r}"
                            + (f" (it is held by {holder.owner})" if holder else ""))
    for rec in records:
        base, _host = _split(rec.owner)
        txn.expect_held(rec.kind, rec.key, rec.owner, revision=rec.revision)
        txn.release(rec.owner, rec.kind, rec.key)
        txn.claim(f"{base}@{this}", rec.kind, rec.key, rec.value)
    shared.commit(txn)
    log.warning("app handed over" if handover else "app adopted from a lost host", app=app,
                source=lost, records=len(records))
    return records


def give_back(shared: Ledger, moved: list[Record], this: str) -> None:
    """Undo ``transfer``: each moved record back to its owner on the lost host, as long as
    this host still holds it (its value as this host left it), or as it was if it is gone
    (a failed start released it); one another owner took meanwhile stays theirs."""
    txn = Txn()
    for rec in moved:
        base, _host = _split(rec.owner)
        now = shared.get(rec.kind, rec.key)
        if now is None:  # released by the failed start: back as it was
            txn.expect_free(rec.kind, rec.key)
            txn.claim(rec.owner, rec.kind, rec.key, rec.value)
            continue
        if now.owner != f"{base}@{this}":
            continue
        txn.expect_held(rec.kind, rec.key, now.owner, revision=now.revision)
        txn.release(now.owner, rec.kind, rec.key)
        txn.claim(rec.owner, rec.kind, rec.key, now.value)
    if txn.ops:
        shared.commit(txn)


def moved_away(shared: Ledger, this: str) -> dict[str, list[Record]]:
    """This host's own records of apps whose name another host holds now (adopted while
    this host was lost), by app: what a returning host stops and forgets; not those of a
    spread app's share that the app's holder placed on this host."""
    prefix = f"@{this}/"
    mine: dict[str, list[Record]] = {}
    for rec in shared.list():
        base, host = _split(rec.owner)
        if host == this and rec.key.startswith(prefix) and ":" not in base:
            mine.setdefault(base, []).append(rec)
    out: dict[str, list[Record]] = {}
    for app, records in mine.items():
        holder = shared.get(APP, app)
        if holder is not None and holder.owner != f"{app}@{this}":
            share = shared.get(PLACEMENT, f"{app}/{this}")
            if share is not None and share.owner == holder.owner:
                continue  # a share of a spread app its home placed here: not moved away
            out[app] = records
    return out


def should_fence(members: list[tuple[str, str]]) -> bool:
    """Whether a host that cannot renew its lease must stop its instances, given what each
    etcd member answered it (``leader``, ``no-leader``, ``down`` or ``unknown``).

    A member with a leader is a way to the quorum: the renewal goes through soon, and if the
    lease was lost meanwhile the host learns it at once and forgets its adopted apps: no.
    Otherwise this host is cut off from every quorum, and one can exist elsewhere only
    among the members it cannot reach (``unknown``; those that refuse connections are down,
    and those without a leader are in none): yes when they are a majority. No member known:
    yes (nothing proves the others cannot go on)."""
    if not members:
        return True
    if any(state == "leader" for _endpoint, state in members):
        return False
    unreachable = sum(1 for _endpoint, state in members if state == "unknown")
    return unreachable >= len(members) // 2 + 1


@dataclass
class Failover:
    """The leader's side: who leads, which apps are orphaned, and their placement."""

    shared: Ledger
    this: str
    lease: Callable[[], str | None]
    ask: Ask
    placing: set[str] = field(default_factory=set)
    failed: dict[str, tuple[int, float]] = field(default_factory=dict)
    """App -> (placements failed in a row, ``time.monotonic()`` before which it waits)."""
    placed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def owner(self) -> str:
        """The owner of the leadership record."""
        return f"host:{self.this}"

    def lead(self) -> bool:
        """Take leadership if it is free; True if this host leads (now or already)."""
        lease = self.lease()
        if lease is None:
            return False
        rec = self.shared.get(LEADER, LEADER_KEY)
        if rec is not None:
            return rec.owner == self.owner
        try:
            self.shared.commit(Txn().expect_free(LEADER, LEADER_KEY).claim(
                self.owner, LEADER, LEADER_KEY, {"since": time.time()}, lease=lease))
        except (ConflictError, NotFoundError):  # another took it first; or no lease now
            return False
        log.info("leading the cluster", host=self.this)
        return True

    def orphans(self) -> list[tuple[str, str]]:
        """(app, lost host) of every app whose host is lost, in name order."""
        alive = {r.key for r in self.shared.list(kind=ALIVE)}
        out = []
        for rec in self.shared.list(kind=APP):
            _base, host = _split(rec.owner)
            if host and host not in alive:
                out.append((rec.key, host))
        return sorted(out)

    def candidates(self, lost: str, app: str | None = None) -> list[str]:
        """Live hosts to place ``app`` on, those its ``[placement]`` allows and not drained
        (``cordoned``), the least loaded first (apps, then instances)."""
        from corral.manifest import PlacementSection

        alive = {r.key: r.value for r in self.shared.list(kind=ALIVE)}
        rec = self.shared.get(APP, app) if app is not None else None
        raw = ((rec.value.get("spec") or {}).get("manifest") or {}).get("placement") \
            if rec is not None else None
        placement = PlacementSection.model_validate(raw or {})
        alive = {h: v for h, v in alive.items() if not v.get("cordoned")
                 and placement.allows(h, list(v.get("labels") or []))}
        load: dict[str, int] = dict.fromkeys(alive, 0)
        for rec in self.shared.list(kind=APP):
            _base, host = _split(rec.owner)
            if host in load:
                load[host] += 1
        return sorted((h for h in alive if h != lost),
                      key=lambda h: (load[h], int(alive[h].get("instances") or 0), h))

    def due(self, app: str) -> bool:
        """Whether ``app`` may be placed now (one that no host took waits, doubling up to
        ``RETRY_MAX_S``)."""
        return time.monotonic() >= self.failed.get(app, (0, 0.0))[1]

    async def place(self, app: str, lost: str) -> str | None:
        """Ask the live hosts in turn to adopt ``app``; the one that did, or None (then the
        app waits before it is placed again)."""
        host = await self._place(app, lost)
        if host is None:
            tries = self.failed.get(app, (0, 0.0))[0] + 1
            self.failed[app] = (tries, time.monotonic() + min(RETRY_MAX_S, 0.5 * 2 ** tries))
        else:
            self.failed.pop(app, None)
        return host

    async def _place(self, app: str, lost: str) -> str | None:
        hosts = self.candidates(lost, app)
        if not hosts:
            log.warning("app not adopted: no live host its [placement] allows", app=app,
                        lost=lost)
        for host in hosts:
            started = time.monotonic()
            try:
                await self.ask(host, "app.adopt", {"name": app, "from_host": lost})
            except CorralError as exc:
                log.warning("app not adopted", app=app, lost=lost, host=host,
                            error=exc.reason)
                continue
            self.placed.append({"app": app, "from": lost, "to": host, "at": time.time(),
                                "took_s": round(time.monotonic() - started, 3)})
            log.warning("app re-placed", app=app, lost=lost, host=host)
            return host
        return None
