"""The net driver process: CDP/1 operations on top of ``HostNetwork``.

Addresses are claimed in the kernel's ledger (kind ``address``, key the instance's IPv4
address, owner the app), so they survive driver restarts and never go to two instances.
Host ports are claimed by the kernel in the deploy transaction; this driver only DNATs them.

On a ledger several hosts share (``kernel.status``: ``shared_ledger``), the driver first
claims this host's slice of the pools (``corral_net.subnets``) and hands out addresses from
it alone; every 2 s it lists the hosts' subnets, keeps a route to each other host's
(``corral_net.routes``) and lets those hosts reach the instances' granted ports (the rules'
peers). On a host of its own nothing of this happens.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Any

import structlog

from corral.errors import CorralError, ErrorCode
from corral.protocol import PlanFragment, Welcome
from corral.sdk import Driver, op, run
from corral_net import DRIVER
from corral_net.claim import HostClaim
from corral_net.config import NetConfig
from corral_net.egress import IPNetwork
from corral_net.host import HostNetwork
from corral_net.model import AppPolicy, InstanceNet, policy_from_manifest
from corral_net.netlink import Netlink
from corral_net.routes import RouteKeeper, wanted_routes
from corral_net.subnets import (
    SUBNET,
    HostIdentity,
    HostSlices,
    SubnetRecord,
    address6_beside,
    claim_record,
    claim_subnet,
    host_address,
    local_config,
    parse_records,
    peer_addresses,
)

log = structlog.get_logger("corral.net")
ADDRESS = "address"
REMOVAL_WAIT_S = 10.0  # at stop: how long stopped instances' networks may take to go
CLUSTER_REFRESH_S = 2.0  # how often the hosts' subnets are listed (routes, peers)


@dataclass
class _Cluster:
    """This host's part in a cluster: its name and subnet, the cluster's (uncut) pools, the
    routes kept to the other hosts' subnets."""

    host: str
    subnet: SubnetRecord
    pools: tuple[IPNetwork, ...]
    routes: RouteKeeper


class NetDriver(Driver):
    """Network namespaces, addresses and nftables rules for every app instance."""

    name = "net"
    capability = "net"
    description = DRIVER  # its [section]s, checked by manifest.check
    features = frozenset({"instance_addresses"})
    version = "0.1.0"

    def __init__(self) -> None:
        super().__init__()
        self._net: HostNetwork | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._claim: HostClaim | None = None
        self._welcome_seen = asyncio.Event()
        self._building = asyncio.Lock()
        self._shared: tuple[bool, str] | None = None  # (shared ledger?, this host's name)
        self._cluster: _Cluster | None = None  # on a shared ledger, once the subnet is held
        # instance -> address slot claimed in the ledger, its netns not made yet (this loop's)
        self._claiming: dict[str, int] = {}
        # instance -> (its slot, the task removing its namespace and links after its stop)
        self._removing: dict[str, tuple[int | None, asyncio.Task[None]]] = {}

    def welcomed(self, welcome: Welcome) -> None:
        """Take the host config handed over at WELCOME (the SDK calls this before it
        dispatches any request); until then nothing may touch the host's network."""
        super().welcomed(welcome)
        self._welcome_seen.set()

    @property
    def net(self) -> HostNetwork:
        """The library, once ``_network`` built it (every operation awaits that first)."""
        if self._net is None:
            raise CorralError("net: the host network is not set up yet",
                              code=ErrorCode.UNAVAILABLE, retry=True)
        return self._net

    async def _network(self) -> HostNetwork:
        """The library, built once from the config handed over at WELCOME, once this driver
        holds the host-wide claim on its table, prefixes and pools (``corral_net.claim``)
        and, on a shared ledger, this host's subnet (its pools are then that slice). A
        failure is raised to the operation that waits; the next one tries again."""
        if self._net is not None:
            return self._net
        if not self._welcome_seen.is_set():  # never the defaults in place of the host's
            raise CorralError("net: no host config yet (not welcomed)",
                              code=ErrorCode.UNAVAILABLE, retry=True)
        async with self._building:
            if self._net is None:
                self._net = await self._build()
        return self._net

    async def _build(self) -> HostNetwork:
        """Claim what ``_network`` needs and make the library: on a host of its own from
        the config as it is; on a shared ledger from this host's slices, with routes to the
        other hosts' subnets and those hosts as the rules' peers from the start (a driver
        restarted under running instances keeps letting the others' lbs in)."""
        config = NetConfig.from_mapping(self.config)
        shared, host = await self._ledger_shared()
        if self._claim is None:
            # The whole pools, not this host's slices: the routes to the other slices are
            # this driver's too, so two drivers on one host must not share them either.
            claim = HostClaim(config)
            claim.acquire()
            self._claim = claim
        if not shared:
            return HostNetwork(config)
        slices = HostSlices.of(config)
        addresses = await asyncio.to_thread(self._addresses)
        address = await host_address(self.kernel, host)
        me = HostIdentity(host, address, address6_beside(addresses, address))
        subnet, records = await claim_subnet(self.kernel, slices, me)
        local = local_config(config, subnet)
        peers = [r for r in records if not r.mine and r.host != host]
        net = HostNetwork(local, peers=peer_addresses(peers, host))
        pools: tuple[IPNetwork, ...] = (config.pool4,) if config.pool6 is None else (
            config.pool4, config.pool6)
        cluster = _Cluster(host, subnet, pools, RouteKeeper(net.netlink, pools))
        # This host forwards what the others send to its instances (and their answers).
        await asyncio.to_thread(net.netlink.enable_forwarding, ipv6=local.pool6 is not None)
        await asyncio.to_thread(self._keep_routes, cluster, net, peers, addresses)
        self._cluster = cluster
        log.info("host subnet held", host=host, pool4=str(local.pool4),
                 pool6=str(local.pool6) if local.pool6 else None, address=address,
                 peers=sorted(r.host for r in peers))
        return net

    async def _ledger_shared(self) -> tuple[bool, str]:
        """(Whether the kernel's ledger is shared by several hosts, this host's name), asked
        once. A kernel without ``kernel.status`` (a conformance stand-in) has a ledger of
        its own; any other failure is raised (the next operation asks again)."""
        if self._shared is None:
            try:
                status = await self.kernel.call("kernel.status", {})
            except CorralError as exc:
                if exc.code != ErrorCode.UNKNOWN_OPERATION:
                    raise
                status = {}
            self._shared = (bool(status.get("shared_ledger")), str(status.get("host") or ""))
        return self._shared

    @staticmethod
    def _addresses() -> dict[str, list[str]]:
        return Netlink().global_addresses()

    async def start(self) -> None:
        """Start refreshing egress names when their DNS TTLs run out, and (on a shared
        ledger) keeping the routes to the other hosts' subnets."""
        self._refresher = asyncio.create_task(self._refresh_names())
        self._keeper = asyncio.create_task(self._keep_cluster())

    async def stop(self) -> None:
        """Stop the refreshers and finish removing stopped instances' networks; rules,
        routes and namespaces of running instances stay (apps keep running)."""
        for task in (self._refresher, self._keeper):
            if task is not None:
                task.cancel()
        pending = [task for _, task in self._removing.values()]
        if pending:
            await asyncio.wait(pending, timeout=REMOVAL_WAIT_S)
        if self._claim is not None:
            self._claim.release()

    async def _refresh_names(self) -> None:
        while True:
            delay = 5.0
            if self._net is not None:
                try:
                    delay = await asyncio.to_thread(self._net.refresh_names)
                except CorralError as exc:
                    log.warning("egress name refresh failed", reason=exc.reason)
            await asyncio.sleep(min(delay, 60.0))

    # -- several hosts -----------------------------------------------------------------------
    async def _keep_cluster(self) -> None:
        """Once welcomed, on a shared ledger: hold this host's subnet (without waiting for a
        request: a host with no apps still routes to the others'), then every
        ``CLUSTER_REFRESH_S`` refresh routes and peers (``_refresh_cluster``). On a host of
        its own it ends at once. A failure is logged (once per reason) and retried."""
        await self._welcome_seen.wait()
        last = ""
        while True:
            try:
                shared, _host = await self._ledger_shared()
                if not shared:
                    return
                await self._refresh_cluster()
                last = ""
            except CorralError as exc:
                if exc.reason != last:
                    log.warning("host subnets not kept", reason=exc.reason)
                last = exc.reason
            await asyncio.sleep(CLUSTER_REFRESH_S)

    async def _refresh_cluster(self) -> None:
        """One round on a shared ledger: list the hosts' subnets, claim ours again if its
        record went, keep a route to each other host's and let exactly those hosts in."""
        net = await self._network()
        cluster = self._cluster
        if cluster is None:
            raise CorralError("net: this host's ledger is its own; it holds no subnet",
                              code=ErrorCode.INVALID)
        listed = await self.kernel.call("ledger.list", {"kind": SUBNET})
        records = parse_records(listed.get("records", []))
        await self._keep_own(cluster, records)
        peers = [r for r in records if not r.mine and r.host != cluster.host]
        addresses = await asyncio.to_thread(self._addresses)
        await asyncio.to_thread(self._keep_routes, cluster, net, peers, addresses)

    async def _keep_own(self, cluster: _Cluster, records: list[SubnetRecord]) -> None:
        """Claim this host's subnet again if its record went (the host was forgotten while
        its driver ran): its instances hold addresses in it."""
        if any(r.mine and r.cidr == cluster.subnet.cidr for r in records):
            return
        log.warning("this host's subnet record is gone; claiming it again",
                    subnet=cluster.subnet.cidr)
        await claim_record(self.kernel, cluster.subnet)

    @staticmethod
    def _keep_routes(cluster: _Cluster, net: HostNetwork, peers: list[SubnetRecord],
                     addresses: dict[str, list[str]]) -> None:
        """Routes to the ``peers``' subnets (from this host's own address, when it holds it),
        and the rules' peers: the hosts let in."""
        held = {a for found in addresses.values() for a in found}
        own = [ipaddress.ip_address(a) for a in (cluster.subnet.address,
                                                 cluster.subnet.address6) if a and a in held]
        source4 = next((a for a in own if isinstance(a, ipaddress.IPv4Address)), None)
        source6 = next((a for a in own if isinstance(a, ipaddress.IPv6Address)), None)
        cluster.routes.sync(wanted_routes(peers, ipv6=net.config.pool6 is not None,
                                          source4=source4, source6=source6))
        net.set_peers(peer_addresses(peers, cluster.host))

    # -- ledger ------------------------------------------------------------------------------
    async def _claim_slot(self, app: str, instance_id: str) -> int:
        """Claim a free address slot in the ledger for ``instance_id`` (owner: the app).

        Only this driver claims this host's pool, and its ``state.sync`` (before any
        ``instance.prepare``) released every claim it holds no instance for; so the lowest
        slot neither held nor being claimed here is free but for a race, and is claimed
        first, in one round trip. A conflict, or an instance known here or being claimed
        already, falls back to listing the pool's claims. The caller ends the claim
        (``_claiming``) once the instance holds the slot or has given it back."""
        pool = self.net.pool
        if instance_id not in self.net.state.instances and instance_id not in self._claiming:
            held = {i.addresses.instance4 for i in list(self.net.state.instances.values())}
            busy = self._busy_slots()
            guess = next((s for s in range(pool.size) if s not in busy
                          and pool.addresses(s).instance4 not in held), None)
            if guess is not None and await self._try_claim(app, instance_id, guess):
                return guess
        for _attempt in range(5):
            listed = await self.kernel.call("ledger.list", {"kind": ADDRESS})
            taken: set[int] = set()
            for record in listed.get("records", []):
                if record.get("value", {}).get("instance") == instance_id:
                    slot = pool.slot_of(record["key"])
                    if slot is not None:
                        return slot
                slot = pool.slot_of(record["key"])
                if slot is not None:
                    taken.add(slot)
            busy = self._busy_slots()
            free = next((s for s in range(pool.size) if s not in taken and s not in busy),
                        None)
            if free is None:
                raise CorralError(f"net: address pool {pool.pool4} is exhausted",
                                  code=ErrorCode.CONFLICT)
            if await self._try_claim(app, instance_id, free):
                return free
            # Someone took it between list and claim: look again.
        raise CorralError(f"net: no address slot could be claimed for {instance_id}",
                          code=ErrorCode.CONFLICT, retry=True)

    async def _try_claim(self, app: str, instance_id: str, slot: int) -> bool:
        """Claim ``slot`` for ``instance_id``, marked as being claimed (``_claiming``) from
        now until the instance holds it; False (and unmarked) if another holds it."""
        self._claiming[instance_id] = slot
        try:
            await self.kernel.call("ledger.claim", {"owner": app, "claims": [
                {"kind": ADDRESS, "key": str(self.net.pool.addresses(slot).instance4),
                 "value": {"instance": instance_id}}]})
            return True
        except BaseException as exc:
            del self._claiming[instance_id]
            if isinstance(exc, CorralError) and exc.code == ErrorCode.CONFLICT:
                return False
            raise

    def _busy_slots(self) -> set[int]:
        """Slots being claimed, or whose stopped instance's links are still being removed:
        never handed out, whatever the ledger says."""
        busy = set(self._claiming.values())
        busy.update(slot for slot, _ in self._removing.values() if slot is not None)
        return busy

    async def _release(self, app: str, addresses: list[str]) -> None:
        if addresses:
            await self.kernel.call("ledger.release", {
                "owner": app, "keys": [[ADDRESS, a] for a in addresses]})

    # -- lifecycle ---------------------------------------------------------------------------
    @op("app.attach")
    async def attach(self, args: Any) -> dict[str, Any]:
        """Grant the app its ports and egress (rules apply as instances appear)."""
        await self._network()
        policy = policy_from_manifest(args.app.name, args.app.manifest)
        await asyncio.to_thread(self.net.set_app, policy)
        return {"ports": list(policy.ports), "egress": [e.text for e in policy.egress]}

    @op("instance.prepare")
    async def prepare(self, args: Any) -> PlanFragment:
        """Claim an address, create the instance's netns and veth pair, apply rules. The
        namespace and the pair need no address: they are made while the claim (a round trip
        to the kernel's ledger) is under way, and addressed once it is granted."""
        await self._network()
        app, spec = args.app, args.instance
        removing = self._removing.get(spec.id)
        if removing is not None:  # the same instance again (a restart): its old links first
            await asyncio.wait([removing[1]])
        # an app not granted yet (a build, a one-off) gets its grant with the instance's rules
        policy = (policy_from_manifest(app.name, app.manifest)
                  if app.name not in self.net.state.apps else None)
        linking = asyncio.ensure_future(asyncio.to_thread(self.net.make_links, spec.id))
        try:
            slot = await self._claim_slot(app.name, spec.id)
        except BaseException:
            await self._drop_links(linking, spec.id)
            raise
        try:
            await linking
            instance = await asyncio.to_thread(
                self.net.prepare_instance, app.name, spec.id, port=spec.port, kind=spec.kind,
                slot=slot, policy=policy)
        except BaseException:
            await self._release(app.name, [str(self.net.pool.addresses(slot).instance4)])
            await self._drop_links(linking, spec.id)
            raise
        finally:
            self._claiming.pop(spec.id, None)
        return self.net.fragment(instance)

    async def _drop_links(self, linking: asyncio.Future[bool], instance_id: str) -> None:
        """Once ``linking`` is over (whatever its outcome), remove what it made for an
        instance whose prepare failed."""
        await asyncio.gather(linking, return_exceptions=True)
        await asyncio.to_thread(self.net.drop_links, instance_id)

    @op("instance.stopped")
    async def stopped(self, args: Any) -> dict[str, Any]:
        """Take the instance's rules out and answer; then remove its namespace and links and
        release its address, off the caller's path (a restart of the same instance, and
        every claim of an address, wait for that)."""
        await self._network()
        instance_id = args.instance_id
        known = self.net.state.instances.get(instance_id)
        try:
            await asyncio.to_thread(self.net.stop_instance, instance_id)
        finally:
            previous = self._removing.get(instance_id)
            if previous is None or previous[1].done():
                slot = (self.net.pool.slot_of(str(known.addresses.instance4))
                        if known is not None else None)
                task = asyncio.create_task(self._remove_network(args.app, instance_id, known))
                self._removing[instance_id] = (slot, task)
        return {"removed": known is not None}

    async def _remove_network(self, app: str, instance_id: str,
                              instance: InstanceNet | None) -> None:
        try:
            await asyncio.to_thread(self.net.remove_network, instance_id)
            if instance is not None:
                await self._release(app, [str(instance.addresses.instance4)])
        except Exception as exc:  # left for state.sync to collect; the driver goes on
            reason = exc.reason if isinstance(exc, CorralError) else repr(exc)
            log.warning("removing a stopped instance's network failed",
                        instance=instance_id, reason=reason)
        finally:
            entry = self._removing.get(instance_id)
            if entry is not None and entry[1] is asyncio.current_task():
                del self._removing[instance_id]

    @op("app.detach")
    async def detach(self, args: Any) -> dict[str, Any]:
        """Undo everything of the app: instances' networks, rules, address claims."""
        await self._network()
        addresses = [str(i.addresses.instance4) for i in self.net.state.instances.values()
                     if i.app == args.app]
        gone = await asyncio.to_thread(self.net.remove_app, args.app)
        await self._release(args.app, addresses)
        return {"instances": gone}

    @op("state.sync")
    async def sync(self, args: Any) -> dict[str, Any]:
        """Re-apply the desired state in one transaction, adopt live instances, GC the rest."""
        await self._network()
        policies: list[AppPolicy] = [policy_from_manifest(a.name, a.manifest) for a in args.apps]
        live = [{"id": r.spec.id, "app": r.spec.app, "port": r.spec.port, "kind": r.spec.kind}
                for r in args.instances if r.state != "exited"]
        report = await asyncio.to_thread(self.net.sync, policies, live)
        held = {str(i.addresses.instance4) for i in self.net.state.instances.values()}
        held.update(str(self.net.pool.addresses(slot).instance4)  # released once they are gone
                    for slot, _ in self._removing.values() if slot is not None)
        listed = await self.kernel.call("ledger.list", {"kind": ADDRESS})
        for record in listed.get("records", []):
            if record["key"] not in held and self.net.pool.slot_of(record["key"]) is not None:
                await self._release(record["owner"], [record["key"]])
        return report

    @op("query.net.stats")
    async def stats(self, args: Any) -> dict[str, Any]:
        """Refused attempts per app (egress and ingress), and the last apply time."""
        await self._network()
        apps = await asyncio.to_thread(self.net.stats)
        return {"apps": apps, "shown": ["refused", "refused_in"],
                "instances": len(self.net.state.instances),
                "last_apply_ms": round(self.net.last_apply_seconds * 1000, 3)}


def main() -> None:
    """Run the net driver (``python -m corral_net``)."""
    run(NetDriver)


if __name__ == "__main__":
    main()
