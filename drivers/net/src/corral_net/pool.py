"""Address pool: each instance gets slot N, a point-to-point /30 (v4) and /126 (v6) pair.

Slot N covers pool4 + 4N .. + 4N + 3 and pool6 + 4N .. + 4N + 3. The host side of the
instance's veth pair holds ``+1`` (the gateway), the instance holds ``+2``. No bridge: one
veth pair per instance keeps the rules per interface and needs no bridge netfilter.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from typing import Protocol

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral_net.config import NetConfig


@dataclass(frozen=True)
class SlotAddresses:
    """The four addresses of one slot (v6 ones are None when IPv6 is off)."""

    slot: int
    gateway4: ipaddress.IPv4Address
    instance4: ipaddress.IPv4Address
    gateway6: ipaddress.IPv6Address | None
    instance6: ipaddress.IPv6Address | None
    prefixlen4: int = 30
    prefixlen6: int = 126


class AddressPool:
    """Maps slots to addresses and back, within the configured pools."""

    def __init__(self, config: NetConfig) -> None:
        self.pool4 = config.pool4
        self.pool6 = config.pool6
        size = self.pool4.num_addresses // 4
        if self.pool6 is not None:
            size = min(size, self.pool6.num_addresses // 4)
        self.size = size

    def addresses(self, slot: int) -> SlotAddresses:
        """Return the addresses of ``slot``; raise if it lies outside the pool."""
        if not 0 <= slot < self.size:
            raise CorralError(f"address slot {slot} outside the pool {self.pool4} "
                              f"({self.size} slots)", code=ErrorCode.INVALID)
        base4 = self.pool4.network_address + 4 * slot
        gw6 = inst6 = None
        if self.pool6 is not None:
            base6 = self.pool6.network_address + 4 * slot
            gw6, inst6 = base6 + 1, base6 + 2
        return SlotAddresses(slot, base4 + 1, base4 + 2, gw6, inst6)

    def slot_of(self, address: str) -> int | None:
        """Return the slot holding ``address`` (gateway or instance side), None if foreign."""
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net in (self.pool4, self.pool6):
            if net is not None and addr.version == net.version and addr in net:
                slot = (int(addr) - int(net.network_address)) // 4
                return slot if slot < self.size else None
        return None


class SlotAllocator(Protocol):
    """Who holds which slot. The SDK-backed version claims ``address`` in the ledger."""

    def claim(self, instance_id: str) -> int:
        """Give ``instance_id`` a free slot (the same one again if it already holds one)."""
        ...

    def release(self, instance_id: str) -> None:
        """Free the slot of ``instance_id``; no error if it holds none."""
        ...

    def adopt(self, instance_id: str, slot: int) -> None:
        """Record that ``instance_id`` holds ``slot`` (after a restart, from the host)."""
        ...


class LocalSlotAllocator:
    """In-process allocator for standalone use and tests (the kernel ledger is the real one)."""

    def __init__(self, pool: AddressPool) -> None:
        self._pool = pool
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def claim(self, instance_id: str) -> int:
        """Give ``instance_id`` the lowest free slot."""
        with self._lock:
            if instance_id in self._held:
                return self._held[instance_id]
            taken = set(self._held.values())
            for slot in range(self._pool.size):
                if slot not in taken:
                    self._held[instance_id] = slot
                    return slot
        raise CorralError(f"address pool {self._pool.pool4} exhausted ({self._pool.size} slots)",
                          code=ErrorCode.CONFLICT)

    def release(self, instance_id: str) -> None:
        """Free the slot of ``instance_id``."""
        with self._lock:
            self._held.pop(instance_id, None)

    def adopt(self, instance_id: str, slot: int) -> None:
        """Record an existing holding; conflicting holders are an error."""
        with self._lock:
            for other, held in self._held.items():
                if held == slot and other != instance_id:
                    raise CorralError(f"slot {slot} is held by {other!r}, not {instance_id!r}",
                                      code=ErrorCode.CONFLICT)
            self._held[instance_id] = slot

    def holder(self, slot: int) -> str:
        """Return who holds ``slot``."""
        with self._lock:
            for instance_id, held in self._held.items():
                if held == slot:
                    return instance_id
        raise NotFoundError(f"slot {slot} is free")
