"""This kernel as a member of a cluster of hosts (an etcd ledger): the parts put together.

``ClusterMember`` runs, beside the kernel's own work, everything a host does for the others
(see ``corral.replication`` and ``corral.failover`` for the rules):

- it serves its releases to the other hosts and keeps copies of theirs (with a cluster key);
- it keeps its host lease alive five times per TTL, and fences (stops its instances)
  when it cannot and the etcd members do not prove that nobody else can go on; once the
  lease is back it forgets the apps adopted elsewhere meanwhile and starts the others again;
- it takes leadership when free, and as leader has every app of a lost host adopted by a
  live one; as any host it adopts the apps the leader places on it (``app.adopt``);
- it runs the shares of spread apps their homes place on it, and deals again the instances
  of its own spread apps when a host they run on is lost or drained, comes back, or a host
  joins that they should also run on (``corral.deploy._spread``);
- at start, before its apps are restored, it forgets those adopted elsewhere while it was
  lost (eviction).

Without ``[host] cluster_key`` a host copies no release and adopts nothing (a warning at
start says so); leases, fencing and eviction work the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from corral import failover, replication
from corral.deploy import Deployer
from corral.deploy._spread import PLACEMENT, SATELLITE, followed, split_placement_key
from corral.errors import CorralError, ErrorCode, NotFoundError, UnavailableError
from corral.forwarding import Forwarder, in_daemon_thread
from corral.host import HostConfig
from corral.hosts import ALIVE, HostRegistry, host_of
from corral.ledger import Ledger, Record
from corral.protocol._ops import AppAdopt
from corral.release import remove_tree

log = structlog.get_logger("corral.cluster")

FENCE_CHECK_S = 0.1
DRAIN_SHARES_S = 60.0
"""How long a drain waits for the homes of its shares to deal them elsewhere."""
FOLLOW_WAIT_S = 1.0
"""Placements are read again at least this often, and every tenth of the host TTL (a lost
host's share is dealt again that soon after its lease expires), and whenever one changes."""
JOIN_RETRY_S = 30.0
"""A host that joined is dealt a share of an app at most this often (a redeal that could not
give it one, e.g. a rollout that failed, is not retried every round)."""
PROBE_EVERY_S = 1.0
BEATS = 5
"""Lease renewals per TTL: a renewal is normally at most a fifth of the TTL old."""
FENCE_AFTER = 0.6
"""Fraction of the TTL without a renewal after which the members are asked whether to fence:
late enough that a renewal delayed a little never fences, early enough that the probe (a
tenth of the TTL) and the kill end well before the lease can expire (a full TTL after the
last renewal was sent)."""
Publish = Callable[[str, dict[str, Any]], None]


@dataclass
class ClusterMember:
    """One kernel's part in the cluster (see the module)."""

    shared: Ledger  # the shared ledger itself, not the host's view
    hosts: HostRegistry
    deployer: Deployer
    forwarder: Forwarder
    config: HostConfig
    home: Path
    publish: Publish
    channel: replication.Channel | None = None  # the cluster key's: also seals records
    server: replication.ReplicaServer | None = None
    replicator: replication.Replicator | None = None
    leader: failover.Failover | None = None
    fenced: list[str] | None = None
    _fenced_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _adopting: set[str] = field(default_factory=set)
    _following: set[str] = field(default_factory=set)  # shares being started/rolled/stopped
    _waiting: set[tuple[str, int]] = field(default_factory=set)  # (app, release) not copied
    _joins: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)  # -> retry at
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, shared: Ledger, hosts: HostRegistry, deployer: Deployer,
              forwarder: Forwarder, config: HostConfig, home: Path, publish: Publish
              ) -> ClusterMember:
        """The member, its release server bound already (an error names the address)."""
        member = cls(shared, hosts, deployer, forwarder, config, home, publish)
        ident = config.host
        if not ident.cluster_key or not ident.address:
            log.warning("no [host] cluster_key and address: releases are not copied between "
                        "hosts and a lost host's apps are not re-placed (docs/etcd.md)")
            return member
        channel = member.channel = replication.Channel(
            replication.load_cluster_key(ident.cluster_key))
        try:
            member.server = replication.ReplicaServer(
                (ident.address, ident.files_port), channel,
                replication.ReleaseSource(shared, home, hosts.name))
        except OSError as exc:
            raise CorralError(f"host.toml [host]: cannot serve releases on "
                              f"{ident.address}:{ident.files_port} ({exc.strerror}); set "
                              "address and files_port to this host's", code=ErrorCode.INVALID
                              ) from None
        member.replicator = replication.Replicator(shared, home, hosts.name, channel,
                                                   ident.files_port, lock=member._lock)
        member.leader = failover.Failover(shared, hosts.name, lambda: hosts.lease,
                                          member._ask)
        return member

    async def _ask(self, host: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return await self.forwarder.call(host, op, args, f"leader@{self.hosts.name}")

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve releases, copy the others', keep the lease, watch for fencing, lead."""
        if self.server is not None:
            self.server.start()
        if self.replicator is not None:
            thread = threading.Thread(target=self.replicator.run, name="corral-replicator",
                                      daemon=True)
            thread.start()
        self._tasks.append(asyncio.ensure_future(self._keep_lease()))
        self._tasks.append(asyncio.ensure_future(self._watch_fence()))
        if self.leader is not None:
            self._tasks.append(asyncio.ensure_future(self._lead()))
            self._tasks.append(asyncio.ensure_future(self._follow()))

    def stop(self) -> None:
        """Stop serving, copying and leading (the kernel then leaves: its lease revoked)."""
        for task in self._tasks:
            task.cancel()
        if self.replicator is not None:
            self.replicator.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- the lease and fencing ---------------------------------------------------------------

    async def _keep_lease(self) -> None:
        """Renew the lease every ``ttl_s / BEATS``; when it had expired (the host was lost:
        its kernel paused or cut off without fencing, say) and is registered anew, forget
        the apps adopted elsewhere meanwhile at once (``evict``)."""
        beat = self.hosts.ttl_s / BEATS
        while True:
            count = sum(len(a.instances) for a in self.deployer.apps.values())
            before = self.hosts.lease
            try:
                await asyncio.to_thread(self.hosts.keepalive, count)
            except CorralError as exc:
                log.error("host keepalive failed", error=exc.reason)
                await asyncio.sleep(min(beat, 0.5))
                continue
            if before is not None and self.hosts.lease != before and self.fenced is None:
                gone = await asyncio.to_thread(self.evict)
                if gone:
                    self.publish("host.rejoined", {"host": self.hosts.name, "evicted": gone})
            await asyncio.sleep(beat)

    async def _watch_fence(self) -> None:
        ttl = self.hosts.ttl_s
        probed = spared = 0.0
        while True:
            await asyncio.sleep(FENCE_CHECK_S)
            if self.fenced is not None:
                if self.hosts.renewed_at > self._fenced_at:
                    await self._unfence()
                continue
            silent = time.monotonic() - self.hosts.renewed_at
            if silent < ttl * FENCE_AFTER or not self.deployer.apps or \
                    time.monotonic() - probed < PROBE_EVERY_S:
                continue
            probed = time.monotonic()
            # a thread of its own: the pool's may all wait on a ledger that does not answer
            members = await in_daemon_thread(self.shared.members, min(1.0, max(0.2, ttl / 10)))
            own = self.config.host.address
            members = [(e, "no-leader" if s == "unknown" and own and
                        e.rpartition(":")[0] in (own, "127.0.0.1", "localhost") else s)
                       for e, s in members]
            if not failover.should_fence(members):
                if spared < self.hosts.renewed_at:  # once per outage
                    spared = time.monotonic()
                    log.warning("lease not renewed, but no quorum can go on without this "
                                "host, or it reaches one: apps keep running",
                                silent_s=round(silent, 1), members=members)
                continue
            self._fenced_at = time.monotonic()
            self.fenced = await self.deployer.fence()
            log.error("lease not renewed, and the cluster may go on without this host: its "
                      "instances were stopped (fenced)", silent_s=round(silent, 1),
                      apps=self.fenced, members=members)
            self.publish("host.fenced", {"host": self.hosts.name, "apps": self.fenced})

    async def _unfence(self) -> None:
        """The lease is back after a fence: forget what was adopted elsewhere, start again
        what this host still holds."""
        names, self.fenced = self.fenced or [], None
        gone = await asyncio.to_thread(self.evict)
        for name in names:
            if name in gone or await asyncio.to_thread(self.deployer.ledger.get, SATELLITE,
                                                       name) is not None:
                continue  # a spread app's share: started again by _follow, if still placed
            try:
                await self._clear_instances(name)
                await self.deployer.lifecycle.resume(name, by=f"host {self.hosts.name}")
            except CorralError as exc:
                log.error("a fenced app did not start again", app=name, error=exc.reason)
        self.publish("host.unfenced", {"host": self.hosts.name, "evicted": gone})

    async def _clear_instances(self, name: str) -> None:
        """Release the instance records a fence left behind (their processes are gone)."""
        ledger = self.deployer.ledger
        stale = [r.key for r in await asyncio.to_thread(ledger.list, owner=name,
                                                        kind="instance")]
        if stale:
            await asyncio.to_thread(ledger.release, name, [("instance", k) for k in stale])

    # -- eviction ----------------------------------------------------------------------------

    def evict(self) -> list[str]:
        """Stop and forget this host's apps whose name another host holds now (adopted
        while this host was lost): their processes killed, their records on this host
        released, their files here removed. Returns their names."""
        from corral.protocol import InstanceRecord

        launcher = self.deployer.launcher
        moved = failover.moved_away(self.shared, self.hosts.name)
        for app, records in sorted(moved.items()):
            for rec in records:
                if rec.kind != "instance" or "record" not in rec.value:
                    continue
                with _quiet():
                    irec = InstanceRecord.model_validate(rec.value["record"])
                    launcher.terminate(irec.pid, irec.start_time, 0.0)
                    launcher.reap(irec.pid)
            self.shared.release(f"{app}@{self.hosts.name}")
            self.deployer.apps.pop(app, None)
            remove_tree(self.home / "apps" / app / "releases")
            (self.home / "apps" / app / "manifest.json").unlink(missing_ok=True)
            log.warning("app adopted by another host while this one was lost: forgotten "
                        "here", app=app, holder=_holder(self.shared, app))
        return sorted(moved)

    # -- leading and adopting ----------------------------------------------------------------

    async def _lead(self) -> None:
        assert self.leader is not None
        leader = self.leader
        wait = self.hosts.ttl_s / 3
        while True:
            try:
                revision = await asyncio.to_thread(self.shared.revision)
                if await asyncio.to_thread(leader.lead):
                    for app, lost in await asyncio.to_thread(leader.orphans):
                        if app not in leader.placing and leader.due(app):
                            leader.placing.add(app)
                            self._tasks.append(asyncio.ensure_future(
                                self._place(app, lost)))
            except CorralError as exc:
                log.warning("leadership not checked", error=exc.reason)
                await asyncio.sleep(1.0)
                continue
            await in_daemon_thread(self.shared.wait_for_change, ALIVE, "", revision, wait)

    async def _place(self, app: str, lost: str) -> None:
        assert self.leader is not None
        try:
            host = await self.leader.place(app, lost)
            if host is not None:
                self.publish("app.replaced", {"app": app, "from": lost, "to": host})
        finally:
            self.leader.placing.discard(app)

    async def adopt(self, args: AppAdopt, by: str) -> dict[str, Any]:
        """``app.adopt``: take app ``args.name`` of lost host ``args.from_host`` and start
        its current release here, or change nothing and say why (see the module)."""
        name, lost, this = args.name, args.from_host, self.hosts.name
        if self.replicator is None:
            raise CorralError(f"host {this} has no cluster key: it keeps no copies of other "
                              "hosts' releases and adopts no app", code=ErrorCode.FORBIDDEN)
        if name in self._adopting:
            raise CorralError(f"app {name!r} is being adopted here already",
                              code=ErrorCode.CONFLICT)
        state = self.deployer.apps.get(name)
        if state is not None and state.home is None:
            return {"app": name, "adopted": False, "note": f"it runs on host {this}"}
        self._adopting.add(name)
        try:
            if state is not None:  # this host ran a share of it: it becomes the app's home
                await self._unfollow(name)
            return await self._adopt(name, lost, this, args.wait_s, by, args.handover)
        finally:
            self._adopting.discard(name)

    async def _adopt(self, name: str, lost: str, this: str, wait_s: float | None, by: str,
                     handover: bool) -> dict[str, Any]:
        started = time.monotonic()
        app = await asyncio.to_thread(self.shared.get, "app", name)
        number = app.value.get("release") if app is not None else None
        if app is None or number is None:
            raise NotFoundError(f"app {name!r} of host {lost} has no release to start")
        rel = await asyncio.to_thread(self.shared.get, "release", f"{name}/v{number}")
        files = str((rel.value if rel else {}).get("files") or f"v{number}")
        refs = [str(r) for r in (((rel.value if rel else {}).get("config") or {})
                                 .get("secrets") or {}).values()]
        assert self.replicator is not None
        if not self.replicator.has(name, files, refs):
            raise UnavailableError(f"release v{number} of {name!r} is not copied to host "
                                   f"{this} yet; nothing was changed")
        await asyncio.to_thread(self._lock.acquire)
        try:
            moved = await asyncio.to_thread(failover.transfer, self.shared, name, lost, this,
                                            handover=handover)
            if not moved:
                return {"app": name, "adopted": False, "note": f"host {this} holds it"}
            taken = await asyncio.to_thread(self._take_copies, name)
        finally:
            self._lock.release()
        try:
            result = await self.deployer.lifecycle.resume(name, by=by, wait_s=wait_s)
        except BaseException as exc:
            log.error("an adopted app did not start: given back", app=name, lost=lost,
                      error=str(exc))
            await asyncio.to_thread(self._give_back, name, moved, taken)
            raise
        took = time.monotonic() - started
        self.publish(f"app.{name}.adopted", {"from": lost, "release": number,
                                             "took_s": round(took, 3)})
        return {**result, "adopted": True, "from": lost, "took_s": round(took, 3)}

    # -- spread apps -------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Run the shares placed on this host, stop those no longer placed, and deal again
        the instances of the apps homed here when a host of theirs is lost or back, or one
        joins; whenever a placement changes, and at least every ``FOLLOW_WAIT_S``."""
        while True:
            try:
                revision = await asyncio.to_thread(self.shared.revision)
                if self.fenced is None:
                    await self._follow_once()
            except CorralError as exc:
                log.warning("placements not read", error=exc.reason)
                await asyncio.sleep(FOLLOW_WAIT_S)
                continue
            await in_daemon_thread(self.shared.wait_for_change, PLACEMENT, "", revision,
                                   min(FOLLOW_WAIT_S, self.hosts.ttl_s / 10))

    async def _follow_once(self) -> None:
        this = self.hosts.name
        records = await asyncio.to_thread(self.shared.list, kind=PLACEMENT)
        alive = await asyncio.to_thread(self.shared.list, kind=ALIVE)
        usable = {r.key for r in alive if not r.value.get("cordoned")}  # live, not drained
        placed: dict[str, Record] = {}
        redeal: set[str] = set()
        for rec in records:
            app, host = split_placement_key(rec.key)
            home = host_of(rec.owner, this)
            if host == this and home != this:
                placed[app] = rec
            elif home == this and host not in usable:
                redeal.add(app)  # a host running a share is lost, or drained
        now = time.monotonic()
        for rec in await asyncio.to_thread(self.deployer.ledger.list, kind="app"):
            if set(rec.value.get("holes") or ()) & usable:
                redeal.add(rec.key)  # a lost host whose place was kept is back
            joined = self.deployer.joining(rec, [r for r in alive if r.key in usable])
            if joined and self._joins.get((rec.key, tuple(joined)), 0.0) <= now:
                self._joins[(rec.key, tuple(joined))] = now + JOIN_RETRY_S
                log.info("a host joined: dealing a spread app's instances again",
                         app=rec.key, hosts=joined)
                redeal.add(rec.key)  # a host joined (or now fits) that gets a share
        busy = self._following | self._adopting
        for app, rec in sorted(placed.items()):
            state = self.deployer.apps.get(app)
            if app in busy or (state is not None and state.home is None):
                continue  # homed here (an adoption is making it so)
            if state is None or state.follows != followed(rec.value):
                self._start(app, self._follow_share(app, host_of(rec.owner, this), rec.value))
        for app, state in sorted(self.deployer.apps.items()):
            if state.home is not None and app not in placed and app not in busy:
                self._start(app, self._unfollow(app))
        for app in sorted(redeal - busy):
            state = self.deployer.apps.get(app)
            if state is not None and state.home is None and not state.deploying:
                self._start(app, self._redeal(app))

    def _start(self, app: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on ``app``'s share in the background; one at a time per app."""
        self._following.add(app)

        async def run() -> None:
            try:
                await work
            except CorralError as exc:
                log.error("a spread app's share not changed", app=app, error=exc.reason)
            finally:
                self._following.discard(app)
        self._tasks.append(asyncio.ensure_future(run()))

    async def _follow_share(self, app: str, home: str, placement: dict[str, Any]) -> None:
        """Start or roll this host's share of ``app`` (its release copied here first)."""
        number = int(placement["release"])
        rel = await asyncio.to_thread(self.shared.get, "release", f"{app}/v{number}")
        if rel is None:
            raise NotFoundError(f"release v{number} of {app!r} is not in the ledger")
        files = str(rel.value.get("files") or f"v{number}")
        refs = [str(r) for r in ((rel.value.get("config") or {}).get("secrets") or {})
                .values()]
        if self.replicator is None or not self.replicator.has(app, files, refs):
            if (app, number) not in self._waiting:
                self._waiting.add((app, number))
                log.info("a share waits for its release's copy", app=app, release=number)
            return  # the next round finds it copied
        self._waiting.discard((app, number))
        directory = await asyncio.to_thread(self._share_files, app, files)
        result = await self.deployer.follow(app, home, placement, dict(rel.value), directory)
        await asyncio.to_thread(self._prune_share_files, app, {files})
        log.info("share of a spread app running", app=app, home=home, release=number,
                 instances=[i["id"] for i in result["instances"]])
        self.publish(f"app.{app}.share", {"home": home, "release": number,
                                          "instances": [i["id"] for i in result["instances"]]})

    async def _unfollow(self, app: str) -> None:
        """Stop this host's share of ``app`` and release what it held here."""
        await self.deployer.down(app)
        await asyncio.to_thread(self._prune_share_files, app, set())
        log.info("share of a spread app stopped", app=app)

    async def _redeal(self, app: str) -> None:
        """Deal again the instances of ``app`` (homed here) after a host it spread to was
        lost or drained, came back, or a host joined: a rollout of the current release over
        the places ``choose_hosts`` picks now."""
        log.info("dealing a spread app's instances again", app=app)
        await self.deployer.lifecycle.resume(app, by=f"host {self.hosts.name}")

    def _share_files(self, app: str, files: str) -> Path:
        """``<home>/apps/<app>/share/<files>``: the release's files for this host's share,
        hard links to its copy (or to this host's own release), reachable by the app's uid
        as its releases are (``0711`` above)."""
        assert self.replicator is not None
        top = self.home / "apps" / app / "share"
        target = top / files
        if not target.is_dir():
            source = self.replicator.root(app) / files
            if not source.is_dir():  # this host's own release (it was the app's home)
                source = self.deployer.releaser.store.root(app) / files
            top.mkdir(mode=0o711, parents=True, exist_ok=True)
            incoming = top / f".incoming-{files}"
            remove_tree(incoming)
            with self.replicator.lock:
                shutil.copytree(source, incoming, symlinks=True, copy_function=os.link)
            os.replace(incoming, target)
        for path in (self.home / "apps", self.home / "apps" / app, top):
            os.chmod(path, 0o711)
        return target

    def _prune_share_files(self, app: str, keep: set[str]) -> None:
        top = self.home / "apps" / app / "share"
        for path in sorted(top.iterdir()) if top.is_dir() else []:
            if path.name not in keep:
                with _quiet():
                    remove_tree(path)
        if not keep:
            with _quiet():
                top.rmdir()

    async def drain(self, by: str) -> dict[str, Any]:
        """``hosts.drain`` on this host: mark it drained (``cordon``: nothing is placed
        here any more); hand each app homed here to the least loaded other live host its
        placement allows (that host starts it from its copies), then stop it here; and wait
        (``DRAIN_SHARES_S``) for the homes of the shares it runs to deal them to other
        hosts (their placements go, ``_follow`` stops them here). An app no host takes, or a
        share its home did not deal away in time, stays here and is listed with why."""
        if self.leader is None:
            raise CorralError(f"host {self.hosts.name} has no cluster key: no other host has "
                              "its releases to take its apps", code=ErrorCode.FORBIDDEN)
        this = self.hosts.name
        moved: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        await asyncio.to_thread(self.hosts.cordon)
        shares = {n: s.home for n, s in self.deployer.apps.items() if s.home is not None}
        for name in sorted(set(self.deployer.apps) - set(shares)):
            to, why = await self._hand_over(name, this, by)
            if to is None:
                kept.append({"app": name, "reason": why})
            else:
                moved.append({"app": name, "to": to})
        deadline = time.monotonic() + DRAIN_SHARES_S
        while any(n in self.deployer.apps for n in shares) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for name, home in sorted(shares.items()):
            if name in self.deployer.apps:
                kept.append({"app": name, "reason": f"its home, host {home}, did not deal its "
                             f"share to other hosts within {DRAIN_SHARES_S:.0f} s"})
            else:
                moved.append({"app": name, "to": home, "share": True})
        self.publish("host.drained", {"host": this, "moved": moved, "kept": kept, "by": by})
        return {"host": this, "moved": moved, "kept": kept}

    async def _hand_over(self, name: str, this: str, by: str) -> tuple[str | None, str]:
        """Hand app ``name`` to another host: (the host, "") or (None, why not)."""
        assert self.leader is not None
        why = "no other live host its [placement] allows"
        for host in await asyncio.to_thread(self.leader.candidates, this, name):
            await asyncio.to_thread(self.shared.put, f"host:{this}", failover.HANDOVER,
                                    name, {"to": host, "by": by}, lease=self.hosts.lease)
            try:
                await self.forwarder.call(host, "app.adopt", {
                    "name": name, "from_host": this, "handover": True}, f"{by}@{this}")
            except CorralError as exc:
                why = exc.reason
                continue
            finally:
                await asyncio.to_thread(self.shared.release, f"host:{this}",
                                        [(failover.HANDOVER, name)])
            await self._let_go(name)
            return host, ""
        return None, why

    async def _let_go(self, name: str) -> None:
        """After another host took app ``name`` (it serves there): stop it here, release what
        this host holds of it, and keep its releases as copies of the other host's."""
        await self.deployer.down(name)
        await asyncio.to_thread(self._keep_as_copies, name)
        # its desired config is the other host's now (its secret values stay as copies)
        (self.home / "config" / f"{name}.json").unlink(missing_ok=True)

    def _keep_as_copies(self, name: str) -> None:
        assert self.replicator is not None
        with self.replicator.lock:
            root = self.deployer.releaser.store.root(name)
            copies = self.replicator.root(name)
            copies.mkdir(mode=0o700, parents=True, exist_ok=True)
            for files in sorted(root.iterdir()) if root.is_dir() else []:
                if files.name != "logs" and not (copies / files.name).exists():
                    os.replace(files, copies / files.name)
            remove_tree(root)

    def _take_copies(self, name: str) -> list[str]:
        """Make the copies of ``name``'s releases this host's own; the names moved."""
        assert self.replicator is not None
        source = self.replicator.root(name)
        store = self.deployer.releaser.store
        root = store.prepare_root(name)
        taken = []
        for copy in sorted(source.iterdir()) if source.is_dir() else []:
            if copy.name.startswith(".") or (root / copy.name).exists():
                continue
            os.replace(copy, root / copy.name)
            taken.append(copy.name)
        return taken

    def _give_back(self, name: str, moved: list[Record], taken: list[str]) -> None:
        with self._lock:
            failover.give_back(self.shared, moved, self.hosts.name)
            assert self.replicator is not None
            source = self.replicator.root(name)
            source.mkdir(mode=0o700, parents=True, exist_ok=True)
            root = self.deployer.releaser.store.root(name)
            for files in taken:
                with _quiet():
                    os.replace(root / files, source / files)


def _holder(shared: Ledger, app: str) -> str | None:
    rec = shared.get("app", app)
    return None if rec is None else rec.owner


def _quiet() -> contextlib.suppress:
    """Suppress what a best-effort step of a clean-up may meet."""
    return contextlib.suppress(OSError, CorralError, ValueError)
