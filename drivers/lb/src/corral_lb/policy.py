"""Balancing policies: each picks one backend among the eligible ones, synchronously and fast.

A policy sees only eligible backends (healthy, not draining, weight > 0) and an optional key
(the client address or a header value, for the hashing policies). ``pick`` never blocks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Protocol

from corral.errors import ManifestError
from corral_lb.backend import Backend
from corral_lb.sections import POLICY_NAMES


class Policy(Protocol):
    """Chooses the backend for one connection (L4) or one request (HTTP)."""

    name: str
    needs_key: bool  # True when the policy hashes the client address or a header

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Return one of ``backends`` (None only when it is empty)."""
        ...


class RoundRobin:
    """Each eligible backend in turn, weights ignored."""

    name = "round-robin"
    needs_key = False

    def __init__(self) -> None:
        self._next = 0

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Next backend in order."""
        if not backends:
            return None
        self._next += 1
        return backends[self._next % len(backends)]


class Weighted:
    """Smooth weighted round-robin (nginx's): proportional to weight, without bursts."""

    name = "weighted"
    needs_key = False

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Backend with the highest running credit; the winner pays the total weight."""
        if not backends:
            return None
        current = self._current
        total = 0
        best: Backend | None = None
        best_credit = 0
        for b in backends:
            credit = current.get(b.id, 0) + b.weight
            current[b.id] = credit
            total += b.weight
            if best is None or credit > best_credit:
                best, best_credit = b, credit
        assert best is not None
        current[best.id] = best_credit - total
        if len(current) > 4 * len(backends) + 16:  # forget backends long gone
            live = {b.id for b in backends}
            for stale in [k for k in current if k not in live]:
                del current[stale]
        return best


class LeastConnections:
    """Fewest active connections relative to weight; ties go to the first."""

    name = "least-conn"
    needs_key = False

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Backend minimising active / weight."""
        if not backends:
            return None
        return min(backends, key=lambda b: b.active / b.weight)


class PowerOfTwoLeastRequest:
    """Power of two choices: two random backends, the one with fewer requests in flight wins."""

    name = "p2c"
    needs_key = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random  # noqa: S311 - load spreading only

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Least outstanding (weighted) of two distinct random picks."""
        n = len(backends)
        if n == 0:
            return None
        if n == 1:
            return backends[0]
        r = self._random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        a, b = backends[i], backends[j]
        # compare outstanding/weight without division: a.o * b.w vs b.o * a.w
        return a if a.outstanding * b.weight <= b.outstanding * a.weight else b


def _hash64(data: bytes, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt[:16]).digest(), "big")


class Maglev:
    """Consistent hashing with Google's Maglev lookup table (weighted by repeated turns).

    Removing one backend remaps only the keys it held (plus ~1/M noise), whichever it is;
    the table is rebuilt only when the membership or weights change.
    """

    needs_key = True
    TABLE_SIZE = 2053  # prime, >> backends: per-backend share error ~ n / M

    def __init__(self, name: str = "hash-source") -> None:
        self.name = name
        self._signature: tuple[tuple[str, int], ...] = ()
        self._table: list[int] = []
        self._members: list[Backend] = []

    @classmethod
    def populate(cls, ids: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
        """The Maglev table: slot -> index into ``ids``, each filling by its preference list."""
        n = len(ids)
        offsets = [_hash64(i.encode(), b"offset") % size for i in ids]
        skips = [_hash64(i.encode(), b"skip") % (size - 1) + 1 for i in ids]
        nexts = [0] * n
        table = [-1] * size
        filled = 0
        max_w = max(weights)
        credit = [0] * n
        while True:
            for k in range(n):
                # weighted Maglev: a backend takes a turn only when its credit reaches max_w
                credit[k] += weights[k]
                if credit[k] < max_w:
                    continue
                credit[k] -= max_w
                c = (offsets[k] + nexts[k] * skips[k]) % size
                while table[c] >= 0:
                    nexts[k] += 1
                    c = (offsets[k] + nexts[k] * skips[k]) % size
                table[c] = k
                nexts[k] += 1
                filled += 1
                if filled == size:
                    return table

    def pick(self, backends: Sequence[Backend], key: bytes | None) -> Backend | None:
        """Backend owning the key's slot; no key hashes as the empty string."""
        if not backends:
            return None
        signature = tuple((b.id, b.weight) for b in backends)
        if signature != self._signature:
            ordered = sorted(backends, key=lambda b: b.id)
            self._table = self.populate(
                [b.id for b in ordered], [b.weight for b in ordered], self.TABLE_SIZE
            )
            self._members = ordered
            self._signature = signature
        return self._members[self._table[_hash64(key or b"") % self.TABLE_SIZE]]


def make_policy(name: str) -> Policy:
    """Build the named policy; ``ManifestError`` names the valid ones otherwise."""
    if name == "round-robin":
        return RoundRobin()
    if name == "weighted":
        return Weighted()
    if name == "least-conn":
        return LeastConnections()
    if name == "p2c":
        return PowerOfTwoLeastRequest()
    if name in ("hash-source", "hash-header"):
        return Maglev(name)
    raise ManifestError(
        [f"lb.policy: unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}"
         " or {{ exec = [...] }}"]
    )


def slot_table(backends: Sequence[Backend], slots: int = 256) -> list[Backend]:
    """``slots`` entries filled in proportion to weight (largest remainder), interleaved.

    This is the kernel plane's table: ``numgen``/``jhash mod slots`` indexes it.
    """
    live = [b for b in backends if b.weight > 0]
    if not live:
        return []
    total = sum(b.weight for b in live)
    quotas = [slots * b.weight / total for b in live]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(live)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: slots - sum(counts)]:
        counts[i] += 1
    # interleave with the smooth weighted sequence so that `numgen inc` is a weighted round-robin
    sw = Weighted()
    proxies = [Backend(id=str(i), host="", port=0, weight=c) for i, c in enumerate(counts)]
    return [live[int(sw.pick(proxies, None).id)] for _ in range(slots)]  # type: ignore[union-attr]
