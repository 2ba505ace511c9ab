"""The net driver's library: per-instance namespaces and the app rules, kept in one place.

``HostNetwork`` holds the desired state (apps, instances, resolved names) and after every
change rebuilds corral's nftables tables in one atomic transaction. It is synchronous and
thread-safe; the driver calls it from a worker thread.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.protocol import PlanFragment
from corral_net.config import NetConfig, instance_names
from corral_net.egress import NameResolver
from corral_net.model import AppPolicy, DesiredState, InstanceNet
from corral_net.netlink import NETNS_DIR, Netlink
from corral_net.nft import Nftables
from corral_net.pool import AddressPool, LocalSlotAllocator, SlotAddresses, SlotAllocator
from corral_net.ruleset import build, refused_counter, refused_in_counter, table_names


class HostNetwork:
    """Creates instance networks, enforces app grants with nftables, and undoes both exactly."""

    def __init__(self, config: NetConfig, *, allocator: SlotAllocator | None = None,
                 resolver: NameResolver | None = None, nft: Nftables | None = None,
                 netlink: Netlink | None = None, peers: Sequence[str] | None = None) -> None:
        """``peers``: None on a host of its own; on a shared ledger, the other hosts'
        addresses (``set_peers``), ``()`` while none is known."""
        self.config = config
        self.pool = AddressPool(config)
        self.allocator: SlotAllocator = allocator or LocalSlotAllocator(self.pool)
        self.resolver = resolver or NameResolver(
            config.resolvers, fallback_ttl=config.dns_fallback_ttl, min_ttl=config.dns_min_ttl)
        self.nft = nft or Nftables()
        self.netlink = netlink or Netlink()
        self.state = DesiredState(peers=None if peers is None else _peer_set(peers))
        self._expiry: dict[str, float] = {}  # name -> monotonic time its answer runs out
        self._lock = threading.RLock()
        self._existing: dict[tuple[str, str], list[dict[str, Any]] | None] | None = None
        self.last_apply_seconds = 0.0
        # instances whose namespace and links are made (make_links) but not addressed yet
        self._linked: set[str] = set()

    # -- apps -------------------------------------------------------------------------------
    def set_app(self, policy: AppPolicy) -> None:
        """Grant ``policy`` (new app or changed manifest) and apply it atomically."""
        with self._lock:
            previous = self.state.apps.get(policy.name)
            self.state.apps[policy.name] = policy
            try:
                self._resolve(policy, force=False)
                self.apply()
            except Exception:
                if previous is None:
                    self.state.apps.pop(policy.name, None)
                else:
                    self.state.apps[policy.name] = previous
                raise

    def remove_app(self, name: str) -> list[str]:
        """Undo everything of app ``name``: its instances' networks and its rules."""
        with self._lock:
            gone = [i.id for i in self.state.instances.values() if i.app == name]
            for instance_id in gone:
                self._teardown_instance(instance_id)
            self.state.apps.pop(name, None)
            self.apply()
            return gone

    def set_peers(self, peers: Sequence[str]) -> bool:
        """On a shared ledger: let the hosts at ``peers`` reach the instances' addresses (on
        their granted ports), and no other host; re-apply the rules when that changed and
        instances are known (with none, there are no rules to change, and a driver restarted
        under running instances must not apply before ``sync`` adopted them: the batch would
        delete their rules). Returns whether the peers changed. Refused (CorralError) on a
        host of its own."""
        with self._lock:
            if self.state.peers is None:
                raise CorralError("net: peer hosts on a host whose ledger is its own",
                                  code=ErrorCode.INVALID)
            wanted = _peer_set(peers)
            if wanted == self.state.peers:
                return False
            previous, self.state.peers = self.state.peers, wanted
            if self.state.instances:
                try:
                    self.apply()
                except Exception:
                    self.state.peers = previous
                    raise
            return True

    # -- instances --------------------------------------------------------------------------
    def prepare_instance(self, app: str, instance_id: str, *, port: int | None = None,
                         kind: str = "instance", slot: int | None = None,
                         policy: AppPolicy | None = None) -> InstanceNet:
        """Create the instance's netns, veth pair, addresses and routes, then apply the rules.
        ``policy``: the app's grant when the app is not known yet, applied in the same nft
        transaction as the instance's rules (and dropped again if the instance fails)."""
        with self._lock:
            existing = self.state.instances.get(instance_id)
            if existing is not None:
                return existing
            granted = policy is not None and policy.name not in self.state.apps
            if granted:
                assert policy is not None
                self._resolve(policy, force=False)
                self.state.apps[policy.name] = policy
            try:
                return self._prepare_instance(app, instance_id, port=port, kind=kind, slot=slot)
            except Exception:
                if granted:
                    assert policy is not None
                    self.state.apps.pop(policy.name, None)
                raise

    def make_links(self, instance_id: str) -> bool:
        """Create the namespace and veth pair of ``instance_id`` ahead of its address, so
        that the driver claims the address meanwhile; ``prepare_instance`` addresses them
        (``drop_links`` removes them if it never comes). False when the instance has them
        already. Until then ``sync`` keeps them: they are not a crash's leftovers."""
        with self._lock:
            if instance_id in self.state.instances or instance_id in self._linked:
                return False
            self.netlink.create_links(*instance_names(self.config, instance_id))
            self._linked.add(instance_id)
            return True

    def drop_links(self, instance_id: str) -> None:
        """Remove what ``make_links`` made for an instance that was not prepared after all;
        nothing when there is nothing of it, or when it is prepared."""
        with self._lock:
            if instance_id in self._linked:
                self._linked.discard(instance_id)
                self.netlink.remove_instance(*instance_names(self.config, instance_id))

    def _prepare_instance(self, app: str, instance_id: str, *, port: int | None,
                          kind: str, slot: int | None) -> InstanceNet:
        with self._lock:
            ns_name, link = instance_names(self.config, instance_id)
            if slot is None:
                slot = self.allocator.claim(instance_id)
            else:  # claimed elsewhere (the kernel's ledger): keep the local view in step
                self.allocator.adopt(instance_id, slot)
            linked = instance_id in self._linked
            self._linked.discard(instance_id)
            try:
                addrs = self.pool.addresses(slot)
                self.netlink.enable_forwarding(ipv6=self.config.pool6 is not None)
                if linked:
                    try:
                        self.netlink.address_links(ns_name, link, addrs)
                    except Exception:
                        self.netlink.remove_instance(ns_name, link)
                        raise
                else:
                    self.netlink.create_instance(ns_name, link, addrs)
                instance = InstanceNet(instance_id, app, ns_name, link, addrs, port, kind)
                self.state.instances[instance_id] = instance
                try:
                    self.apply()
                except Exception:
                    del self.state.instances[instance_id]
                    self.netlink.remove_instance(ns_name, link)
                    raise
            except Exception:
                self.allocator.release(instance_id)
                raise
            return instance

    def stop_instance(self, instance_id: str) -> InstanceNet | None:
        """Take the instance's rules out (one nft transaction) and forget it: what it was, or
        None (idempotent). Its namespace and links stay, and its slot stays taken, until
        ``remove_network``: deleting a link waits for the kernel's RCU grace periods (tens of
        milliseconds), which the caller keeps off the path of whoever waits for the stop."""
        with self._lock:
            instance = self.state.instances.pop(instance_id, None)
            self.apply()
            return instance

    def remove_network(self, instance_id: str) -> None:
        """Remove the namespace and links of a stopped instance (absent parts are fine), then
        free its slot."""
        ns_name, link = instance_names(self.config, instance_id)
        try:
            self.netlink.remove_instance(ns_name, link)
        finally:
            self.allocator.release(instance_id)

    def _teardown_instance(self, instance_id: str) -> None:
        ns_name, link = instance_names(self.config, instance_id)
        self.state.instances.pop(instance_id, None)
        self.netlink.remove_instance(ns_name, link)
        self.allocator.release(instance_id)

    @staticmethod
    def fragment(instance: InstanceNet) -> PlanFragment:
        """The PlanFragment an instance launches with: join its netns, know its address."""
        env = {"CORRAL_ADDRESS": str(instance.addresses.instance4)}
        if instance.addresses.instance6 is not None:
            env["CORRAL_ADDRESS6"] = str(instance.addresses.instance6)
        return PlanFragment(netns=str(NETNS_DIR / instance.netns),
                            address=str(instance.addresses.instance4), env=env)

    # -- reconciliation ---------------------------------------------------------------------
    def sync(
        self, apps: Iterable[AppPolicy], instances: Iterable[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Make the host match the given apps and running instances; GC everything else.

        ``instances`` items carry ``id``, ``app`` and optionally ``port``, ``kind``. Existing
        namespaces are adopted (their slot read back from the host link); missing ones are
        reported, since a running process cannot be moved into a new namespace.
        """
        with self._lock:
            self.state.apps = {a.name: a for a in apps}
            wanted = {str(i["id"]): i for i in instances}
            present = self.netlink.links(self.config.link_prefix)
            adopted, missing = [], []
            for instance_id, info in wanted.items():
                if instance_id in self.state.instances:
                    continue
                ns_name, link = instance_names(self.config, instance_id)
                slots = [self.pool.slot_of(a) for a in present.get(link, [])]
                slot = next((s for s in slots if s is not None), None)
                if slot is None or not (NETNS_DIR / ns_name).exists():
                    missing.append(instance_id)
                    continue
                self.allocator.adopt(instance_id, slot)
                self.state.instances[instance_id] = InstanceNet(
                    instance_id, str(info["app"]), ns_name, link, self.pool.addresses(slot),
                    info.get("port"), str(info.get("kind", "instance")))
                adopted.append(instance_id)
            removed = [i for i in self.state.instances if i not in wanted]
            for instance_id in removed:
                self._teardown_instance(instance_id)
            # Leftovers of a crash: namespaces and links we own that nobody wants (those made
            # ahead of an address by a prepare in progress are wanted).
            ahead = [instance_names(self.config, i) for i in self._linked]
            keep_ns = {i.netns for i in self.state.instances.values()} | {n for n, _ in ahead}
            keep_links = {i.link for i in self.state.instances.values()} | {k for _, k in ahead}
            for ns_name in self.netlink.namespaces(self.config.netns_prefix):
                if ns_name not in keep_ns:
                    self.netlink.remove_instance(ns_name, "")
                    removed.append(ns_name)
            for link in self.netlink.links(self.config.link_prefix):
                if link not in keep_links:
                    self.netlink.remove_instance("", link)
            for app in self.state.apps.values():
                self._resolve(app, force=True)
            self._existing = None  # re-read the tables: someone may have touched them
            self.apply()
            return {"adopted": adopted, "missing": missing, "removed": removed}

    # -- DNS --------------------------------------------------------------------------------
    def _resolve(self, app: AppPolicy, *, force: bool) -> None:
        now = time.monotonic()
        for entry in app.egress:
            if entry.name is None:
                continue
            stale = self._expiry.get(entry.name, 0) <= now
            if force or stale or entry.name not in self.state.resolved:
                answer = self.resolver.resolve(entry.name)
                self.state.resolved[entry.name] = answer.addresses
                self._expiry[entry.name] = answer.expires

    def refresh_names(self) -> float:
        """Re-resolve expired names, re-apply if any answer changed; return seconds to next."""
        with self._lock:
            now = time.monotonic()
            changed = False
            wanted = {e.name for a in self.state.apps.values() for e in a.egress if e.name}
            for name in list(self.state.resolved):
                if name not in wanted:
                    self.state.resolved.pop(name)
                    self._expiry.pop(name, None)
            for name in wanted:
                if self._expiry.get(name, 0) <= now:
                    answer = self.resolver.resolve(name)
                    if set(answer.addresses) != set(self.state.resolved.get(name, ())):
                        changed = True
                    self.state.resolved[name] = answer.addresses
                    self._expiry[name] = answer.expires
            if changed:
                self.apply()
            upcoming = [t - time.monotonic() for t in self._expiry.values()]
            return max(min(upcoming, default=60.0), self.config.dns_min_ttl)

    # -- rules ------------------------------------------------------------------------------
    def apply(self) -> None:
        """Rebuild corral's tables from the desired state in one nft transaction."""
        with self._lock:
            started = time.perf_counter()
            # Listing a table makes libnftables fetch every rule in it (slow with many apps);
            # only this process writes corral's tables, so after the first listing the
            # objects left by the last successful batch are known without asking.
            existing = self._existing
            if existing is None:
                existing = {(f, n): self.nft.list_table(f, n) for f, n in table_names(self.config)}
            commands = build(self.config, self.state, existing)
            try:
                self.nft.apply(commands, what=f"corral tables ({len(self.state.apps)} apps, "
                                              f"{len(self.state.instances)} instances)")
            except Exception:
                self._existing = None
                raise
            self._existing = _objects_after(commands, table_names(self.config))
            self.last_apply_seconds = time.perf_counter() - started

    def stats(self) -> dict[str, dict[str, int]]:
        """Per app: refused outgoing attempts and refused incoming ones (packets)."""
        with self._lock:
            counters = self.nft.counters("inet", self.config.table)
            report: dict[str, dict[str, int]] = {}
            for app in self.state.apps.values():
                out = counters.get(refused_counter(app), (0, 0))
                inc = counters.get(refused_in_counter(app), (0, 0))
                report[app.name] = {"refused": out[0], "refused_bytes": out[1],
                                    "refused_in": inc[0], "refused_in_bytes": inc[1]}
            return report

    def addresses_of(self, instance_id: str) -> SlotAddresses:
        """Addresses of a prepared instance."""
        instance = self.state.instances.get(instance_id)
        if instance is None:
            raise CorralError(f"net: instance {instance_id!r} has no network here",
                              code=ErrorCode.UNKNOWN_OPERATION)
        return instance.addresses


def _peer_set(peers: Iterable[str]) -> tuple[str, ...]:
    """Peer addresses, each once, in a stable order (the rules do not change with the
    order the ledger lists them in); CorralError naming one that is no address."""
    try:
        found = {ipaddress.ip_address(p) for p in peers}
    except ValueError as exc:
        raise CorralError(f"net: peer host address: {exc}", code=ErrorCode.INVALID) from exc
    return tuple(str(a) for a in sorted(found, key=lambda a: (a.version, int(a))))


def _objects_after(commands: list[dict[str, Any]], tables: list[tuple[str, str]]
                   ) -> dict[tuple[str, str], list[dict[str, Any]] | None]:
    """The chains and counters corral's tables hold once ``commands`` committed."""
    after: dict[tuple[str, str], list[dict[str, Any]] | None] = {t: None for t in tables}
    for command in commands:
        for verb, body in command.items():
            for kind, spec in body.items():
                if verb != "add" or kind not in ("table", "chain", "counter"):
                    continue
                key = (spec["family"], spec["name"] if kind == "table" else spec["table"])
                objects = after.get(key)
                if objects is None:
                    after[key] = objects = []
                if kind != "table":
                    objects.append({kind: {"name": spec["name"]}})
    return after
