"""Random claim/release/lease sequences against a plain in-memory model of the ledger."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from corral.errors import ConflictError, NotFoundError
from corral.ledger import Claim, SqliteLedger, Txn

OWNERS = st.sampled_from(["blog", "shop", "driver:net"])
KINDS = st.sampled_from(["port", "app"])
KEYS = st.sampled_from(["1", "2", "3"])
RESOURCES = st.tuples(KINDS, KEYS)
VALUES = st.integers(0, 2)


@dataclass
class Held:
    owner: str
    value: dict[str, Any]
    lease: str | None


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class LedgerModel(RuleBasedStateMachine):
    """The model: a dict of held resources and a dict of leases; expiry is "expires <= now"."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-model-"))
        self.clock = Clock()
        self.ledger = SqliteLedger(self.dir / "ledger.sqlite3", clock=self.clock, history=10**6)
        self.held: dict[tuple[str, str], Held] = {}
        self.lease_table: dict[str, tuple[str, float, float]] = {}  # id -> owner, ttl, expiry
        self.last_revision = 0

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers --------------------------------------------------------------------------

    def lease_live(self, lease: str | None) -> bool:
        if lease is None:
            return True
        entry = self.lease_table.get(lease)
        return entry is not None and entry[2] > self.clock.now

    def live(self) -> dict[tuple[str, str], Held]:
        return {k: h for k, h in self.held.items() if self.lease_live(h.lease)}

    # -- rules ----------------------------------------------------------------------------------

    @rule(
        owner=OWNERS,
        items=st.lists(st.tuples(RESOURCES, VALUES), min_size=1, max_size=4),
        lease=st.none() | leases,
        foreign=st.integers(0, 4),
    )
    def claim_some(
        self,
        owner: str,
        items: list[tuple[tuple[str, str], int]],
        lease: str | None,
        foreign: int,
    ) -> None:
        if lease is not None and foreign and lease in self.lease_table:
            owner = self.lease_table[lease][0]  # mostly claim under one's own lease
        self.claim(owner, items, lease)

    def predict(
        self, owner: str, items: list[tuple[tuple[str, str], int]], lease: str | None
    ) -> tuple[str, str, str] | None:
        """Apply a claim to the model; return what it must fail on (kind, key, holder), if any.

        ``("lease", id, "")`` stands for a lease that is gone (NotFoundError).
        """
        live = self.live()
        if lease is not None and not self.lease_live(lease):
            return ("lease", lease, "")
        if lease is not None and self.lease_table[lease][0] != owner:
            return ("lease", lease, self.lease_table[lease][0])
        for kind, key in (resource for resource, _ in items):
            if (kind, key) in live and live[kind, key].owner != owner:
                return (kind, key, live[kind, key].owner)
        for (kind, key), v in items:
            self.held[kind, key] = Held(owner, {"v": v}, lease)
        return None

    @staticmethod
    def check(outcome: int | Exception | None, expected: tuple[str, str, str] | None) -> None:
        """Compare a claim's outcome (revision or error) with the model's prediction."""
        if expected is None:
            assert isinstance(outcome, int), f"expected success, got {outcome!r}"
        elif expected[2] == "":
            assert isinstance(outcome, NotFoundError), f"expected NotFoundError, got {outcome!r}"
        else:
            assert isinstance(outcome, ConflictError), f"expected {expected}, got {outcome!r}"
            assert (outcome.kind, outcome.key, outcome.holder) == expected

    def claim(
        self, owner: str, items: list[tuple[tuple[str, str], int]], lease: str | None
    ) -> None:
        """Claim ``items`` in the ledger and check the outcome against the model."""
        expected = self.predict(owner, items, lease)
        claims = [Claim(kind, key, {"v": v}) for (kind, key), v in items]
        outcome: int | Exception
        try:
            outcome = self.ledger.claim(owner, claims, lease=lease)
        except (ConflictError, NotFoundError) as err:
            outcome = err
        self.check(outcome, expected)

    @rule(
        batch=st.lists(
            st.tuples(OWNERS, st.lists(st.tuples(RESOURCES, VALUES), min_size=1, max_size=3)),
            min_size=1,
            max_size=5,
        )
    )
    def claim_batch(self, batch: list[tuple[str, list[tuple[tuple[str, str], int]]]]) -> None:
        """commit_many: each claim succeeds or fails as if committed alone, in order."""
        expected = [self.predict(owner, items, None) for owner, items in batch]
        txns = []
        for owner, items in batch:
            txn = Txn()
            for (kind, key), v in items:
                txn.claim(owner, kind, key, {"v": v})
            txns.append(txn)
        for outcome, want in zip(self.ledger.commit_many(txns), expected, strict=True):
            self.check(outcome, want)

    @precondition(lambda self: any(self.lease_live(lease) for lease in self.lease_table))
    @rule(data=st.data(), items=st.lists(st.tuples(RESOURCES, VALUES), min_size=1, max_size=2))
    def claim_leased(self, data: st.DataObject, items: list[tuple[tuple[str, str], int]]) -> None:
        """Claim under a live lease of the claimer's own, so that leased records are common."""
        lease = data.draw(st.sampled_from([k for k in self.lease_table if self.lease_live(k)]))
        self.claim(self.lease_table[lease][0], items, lease)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), owner=OWNERS)
    def contend(self, data: st.DataObject, owner: str) -> None:
        """Claim something already held (maybe under a lapsed lease): the interesting case."""
        resource = data.draw(st.sampled_from(sorted(self.held)))
        self.claim(owner, [(resource, 9)], None)

    @rule(owner=OWNERS, resources=st.lists(RESOURCES, max_size=3))
    def release(self, owner: str, resources: list[tuple[str, str]]) -> None:
        live = self.live()
        others = [r for r in resources if r in live and live[r].owner != owner]
        if others:
            try:
                self.ledger.release(owner, resources)
            except ConflictError as err:
                assert (err.kind, err.key) == others[0]
                assert err.holder == live[others[0]].owner
                return
            raise AssertionError("release of another's key succeeded")
        self.ledger.release(owner, resources)
        for r in resources:
            self.held.pop(r, None)

    @rule(owner=OWNERS)
    def release_all(self, owner: str) -> None:
        self.ledger.release(owner)
        self.held = {k: h for k, h in self.held.items() if h.owner != owner}

    @rule(target=leases, owner=OWNERS, ttl=st.sampled_from([1.0, 5.0, 10.0]))
    def grant(self, owner: str, ttl: float) -> str:
        lease = self.ledger.grant_lease(ttl, owner)
        self.lease_table[lease] = (owner, ttl, self.clock.now + ttl)
        return lease

    @rule(lease=leases)
    def keepalive(self, lease: str) -> None:
        if self.lease_live(lease):
            owner, ttl, _ = self.lease_table[lease]
            assert self.ledger.keepalive(lease).expires_at == self.clock.now + ttl
            self.lease_table[lease] = (owner, ttl, self.clock.now + ttl)
        else:
            try:
                self.ledger.keepalive(lease)
            except NotFoundError:
                return
            raise AssertionError("keepalive of a dead lease succeeded")

    @rule(lease=leases)
    def revoke(self, lease: str) -> None:
        self.ledger.revoke(lease)
        self.lease_table.pop(lease, None)
        self.held = {k: h for k, h in self.held.items() if h.lease != lease}

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: bool(self.lease_table))
    @rule()
    def expire(self) -> None:
        before = self.ledger.revision()
        count = self.ledger.expire()
        # What is left to collect depends on what claims collected lazily; check that
        # expire() reports what it logged, and logged only records of dead leases.
        deleted = self.ledger.changes(before)
        assert len(deleted) == count
        assert all(c.type == "delete" and not self.lease_live(c.lease) for c in deleted)
        self.held = self.live()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def records_match_the_model(self) -> None:
        got = {(r.kind, r.key): Held(r.owner, r.value, r.lease) for r in self.ledger.list()}
        assert got == self.live()

    @invariant()
    def changes_replay_to_the_records(self) -> None:
        revision = self.ledger.revision()
        assert revision >= self.last_revision
        self.last_revision = revision
        state: dict[tuple[str, str], Held] = {}
        seen = 0
        for change in self.ledger.changes(0):
            assert change.revision >= seen
            seen = change.revision
            if change.type == "put":
                state[change.kind, change.key] = Held(change.owner, change.value, change.lease)
            else:
                assert state.pop((change.kind, change.key)).owner == change.owner
        assert seen == revision
        live = {k: h for k, h in state.items() if self.lease_live(h.lease)}
        assert live == self.live()


# Shrinking a failing run can take minutes (each step is a real SQLite transaction).
TestLedgerModel = pytest.mark.timeout(900)(LedgerModel.TestCase)
TestLedgerModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
