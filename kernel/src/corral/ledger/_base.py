"""The ledger contract: keyed records with owners, compare-then-apply transactions, leases, changes.

The model is etcd's, kept small so an etcd backend can implement the same class later:

- a record is identified by ``(kind, key)`` and held by exactly one ``owner``;
- every transaction that changes something gets one new global ``revision``; each record
  carries the revision of its last change, and ``changes()`` replays puts and deletes in
  revision order (a bounded history: older revisions are compacted away);
- a ``Txn`` is a list of compares (etcd's *If*) and operations (etcd's *Then*), applied all or
  nothing; a failed compare or a conflict raises and writes nothing (there is no *Else*:
  callers re-read and decide);
- a lease has a TTL; records claimed under a lease vanish when it expires or is revoked, and a
  record whose lease has expired is treated as absent everywhere, before it is collected.

Owners are free-form strings. By convention an app's name (``blog``) or ``<role>:<name>`` for
anything else (``driver:net``); error messages read them as "app 'blog'" or "driver 'net'".
"""

from __future__ import annotations

import abc
import builtins
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from corral.errors import ConflictError, CorralError, ErrorCode

WAIT_POLL_S = 0.1
"""How often ``Ledger.wait_for_change`` reads the history on a backend that cannot watch."""


@dataclass(frozen=True)
class Claim:
    """One resource an owner wants: ``(kind, key)`` with a JSON object as its value."""

    kind: str
    key: str
    value: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """A held resource: ``since`` is its creation (UTC ISO), ``revision`` its last change."""

    kind: str
    key: str
    owner: str
    value: dict[str, Any]
    since: str
    revision: int
    lease: str | None = None


@dataclass(frozen=True)
class Change:
    """One put or delete at ``revision``; a delete carries the value the record had."""

    revision: int
    type: Literal["put", "delete"]
    kind: str
    key: str
    owner: str
    value: dict[str, Any]
    lease: str | None = None


@dataclass(frozen=True)
class Lease:
    """A TTL granted to ``owner``; ``expires_at`` is a Unix time in seconds."""

    id: str
    owner: str
    ttl_s: float
    expires_at: float
    granted: str


@dataclass(frozen=True)
class Compare:
    """A precondition of a ``Txn``: ``(kind, key)`` is free (``holder=None``) or held by ``holder``.

    With ``revision`` set, the held record must also be unchanged since that revision.
    """

    kind: str
    key: str
    holder: str | None
    revision: int | None = None


@dataclass(frozen=True)
class ClaimOp:
    """Create ``claim`` for ``owner``, or replace its value and lease if ``owner`` holds it."""

    owner: str
    claim: Claim
    lease: str | None = None


@dataclass(frozen=True)
class ReleaseOp:
    """Delete ``(kind, key)`` if ``owner`` holds it; a free key is a no-op, another's a conflict."""

    owner: str
    kind: str
    key: str


@dataclass(frozen=True)
class ReleaseAllOp:
    """Delete every record ``owner`` holds (only those of ``kind`` if given)."""

    owner: str
    kind: str | None = None


TxnOp = ClaimOp | ReleaseOp | ReleaseAllOp


class CompactedError(CorralError):
    """``changes(since)`` asked for revisions the bounded history no longer holds: re-list."""

    code = ErrorCode.INVALID

    def __init__(self, since: int, compacted: int) -> None:
        super().__init__(
            f"ledger changes after revision {since} are gone: history is compacted up to "
            f"revision {compacted}; re-read the ledger with list() and watch from revision()",
            retry=False,
            details={"since": since, "compacted": compacted},
        )
        self.since = since
        self.compacted = compacted


class Txn:
    """A transaction under construction: compares, then operations, applied in order by commit.

    Building a ``Txn`` touches nothing; ``Ledger.commit`` checks every compare and applies every
    operation in one atomic step, or raises and changes nothing. ``revision`` is set by commit.
    """

    def __init__(self) -> None:
        self.compares: list[Compare] = []
        self.ops: list[TxnOp] = []
        self.revision: int | None = None

    def expect_free(self, kind: str, key: str) -> Txn:
        """Require that nobody holds ``(kind, key)``."""
        self.compares.append(Compare(_name("kind", kind), _name("key", key), None))
        return self

    def expect_held(self, kind: str, key: str, owner: str, *, revision: int | None = None) -> Txn:
        """Require that ``owner`` holds ``(kind, key)`` (and, given ``revision``, unchanged)."""
        self.compares.append(
            Compare(_name("kind", kind), _name("key", key), _name("owner", owner), revision)
        )
        return self

    def claim(
        self,
        owner: str,
        kind: str,
        key: str,
        value: Mapping[str, Any] | None = None,
        *,
        lease: str | None = None,
    ) -> Txn:
        """Claim ``(kind, key)`` for ``owner`` (see ``ClaimOp``)."""
        claim = Claim(_name("kind", kind), _name("key", key), {} if value is None else value)
        self.ops.append(ClaimOp(_name("owner", owner), _checked(claim), lease))
        return self

    def release(self, owner: str, kind: str, key: str) -> Txn:
        """Release ``(kind, key)`` held by ``owner`` (see ``ReleaseOp``)."""
        self.ops.append(ReleaseOp(_name("owner", owner), _name("kind", kind), _name("key", key)))
        return self

    def release_all(self, owner: str, *, kind: str | None = None) -> Txn:
        """Release everything ``owner`` holds, or everything of ``kind`` (see ``ReleaseAllOp``)."""
        kind = None if kind is None else _name("kind", kind)
        self.ops.append(ReleaseAllOp(_name("owner", owner), kind))
        return self

    def __repr__(self) -> str:
        return f"Txn(compares={len(self.compares)}, ops={len(self.ops)}, revision={self.revision})"


class Ledger(abc.ABC):
    """Who holds what, as keyed records; one instance per process, safe to share across threads.

    Backends implement ``commit`` and the reads; ``claim``, ``release``, ``put``,
    ``transaction`` and (unless a backend batches) ``commit_many`` are defined here in terms of
    ``commit`` so every backend behaves alike. Calls from several threads are serialised.
    Every write returns the ledger revision after it; a write that changes nothing (re-claiming
    the same value, releasing a free key) creates no revision and returns the current one.
    """

    remote: bool = False
    """Whether calls go over the network (and may take seconds): callers on an event loop
    then run them in a worker thread (``GroupCommit`` does)."""

    # -- backend contract ---------------------------------------------------------------------

    @abc.abstractmethod
    def commit(self, txn: Txn) -> int:
        """Check ``txn``'s compares, apply its ops in order, atomically; return the revision.

        Raises ``ConflictError`` (nothing written) when a compare fails, when a claim meets a
        key held by another owner, or when a release names another owner's key; its message
        names kind, key, holder and since. Raises ``NotFoundError`` for a claim under a lease
        that does not exist or has expired, ``ConflictError`` for one under another's lease.
        Once it returns, the transaction survives the death (kill -9) of any process.
        """

    def commit_many(self, txns: Sequence[Txn]) -> builtins.list[int | CorralError]:
        """Commit independent transactions in order; return each one's revision or its error.

        Each ``Txn`` is all or nothing on its own; one failing (``CorralError``) does not stop
        the others; a ``Txn``'s revision is the one it would get if committed alone, in order.
        Backends override this to share one durable write among the batch (group commit): a
        kernel with several requests waiting commits them together. Any other exception
        propagates: a batching backend then writes nothing of the batch; this default keeps
        what it committed before.
        """
        results: list[int | CorralError] = []
        for txn in txns:
            try:
                results.append(self.commit(txn))
            except CorralError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def get(self, kind: str, key: str) -> Record | None:
        """Return the live record at ``(kind, key)``, or None (also when its lease expired)."""

    @abc.abstractmethod
    def list(
        self, *, owner: str | None = None, kind: str | None = None, prefix: str | None = None
    ) -> builtins.list[Record]:
        """Return live records matching every filter given (``prefix`` applies to the key).

        Ordered by kind, then key.
        """

    @abc.abstractmethod
    def revision(self) -> int:
        """Return the current revision (0 for an empty ledger that never changed)."""

    @abc.abstractmethod
    def changes(self, since_revision: int) -> builtins.list[Change]:
        """Return every change with revision > ``since_revision``, in order.

        Raises ``CompactedError`` when part of that range was compacted away.
        """

    def wait_for_change(self, kind: str, prefix: str, after_revision: int,
                        timeout_s: float) -> bool:
        """Block until a record of ``kind`` whose key starts with ``prefix`` changes after
        ``after_revision`` (True), or ``timeout_s`` passes (False). It may also return False
        early (the history was compacted, the store did not answer): callers read again
        either way. This default polls ``changes`` every ``WAIT_POLL_S``; a backend that can
        be told of changes (etcd's watch) overrides it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                found = self.changes(after_revision)
            except CompactedError:
                return False
            if any(c.kind == kind and c.key.startswith(prefix) for c in found):
                return True
            if found:
                after_revision = found[-1].revision
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(WAIT_POLL_S, left))

    @abc.abstractmethod
    def grant_lease(self, ttl_s: float, owner: str) -> str:
        """Grant a lease of ``ttl_s`` seconds (> 0) to ``owner``; return its id."""

    @abc.abstractmethod
    def keepalive(self, lease_id: str) -> Lease:
        """Push the lease's expiry to now + TTL; ``NotFoundError`` if it is gone or expired."""

    @abc.abstractmethod
    def revoke(self, lease_id: str) -> int:
        """Delete the lease and its records; return the revision. Revoking twice is a no-op."""

    @abc.abstractmethod
    def lease(self, lease_id: str) -> Lease | None:
        """Return the live lease, or None if it is unknown, revoked or expired."""

    @abc.abstractmethod
    def expire(self, now: float | None = None) -> int:
        """Delete expired leases (at Unix time ``now``, default the clock) and their records.

        Returns how many records were deleted. The kernel calls it periodically; correctness
        does not depend on it, since expired records are ignored by reads and claims.
        """

    def members(self, timeout_s: float = 1.0) -> builtins.list[tuple[str, str]]:
        """For a ledger served by several members (etcd): each member's endpoint and what it
        says of itself right now: ``leader`` (it has one: it can commit), ``no-leader``,
        ``down`` (it refused the connection) or ``unknown`` (no answer in ``timeout_s``). A
        local ledger has none: ``[]``."""
        return []

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's resources; the object is unusable afterwards."""

    # -- shared behaviour ---------------------------------------------------------------------

    def claim(self, owner: str, claims: Sequence[Claim], *, lease: str | None = None) -> int:
        """Claim every resource in ``claims`` for ``owner``, all or nothing; return the revision.

        A key the owner already holds is updated, so a rerun of the same claim is a no-op.
        """
        txn = Txn()
        for claim in claims:
            txn.claim(owner, claim.kind, claim.key, claim.value, lease=lease)
        return self.commit(txn)

    def release(self, owner: str, keys: Sequence[tuple[str, str]] | None = None) -> int:
        """Release ``keys`` (``(kind, key)`` pairs) held by ``owner``, or all of its records."""
        txn = Txn()
        if keys is None:
            txn.release_all(owner)
        else:
            for kind, key in keys:
                txn.release(owner, kind, key)
        return self.commit(txn)

    def put(
        self,
        owner: str,
        kind: str,
        key: str,
        value: Mapping[str, Any] | None = None,
        *,
        lease: str | None = None,
    ) -> int:
        """Claim one resource: ``claim(owner, [Claim(kind, key, value)])``."""
        return self.commit(Txn().claim(owner, kind, key, value, lease=lease))

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """Yield a ``Txn`` to fill; commit it when the block exits cleanly, drop it otherwise.

        The revision is on ``txn.revision`` afterwards. Nothing is locked while the block runs:
        use ``expect_free``/``expect_held`` for anything the block decided from earlier reads.
        """
        txn = Txn()
        yield txn
        self.commit(txn)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def describe_owner(owner: str) -> str:
    """Render an owner for a message: ``blog`` -> "app 'blog'", ``driver:net`` -> "driver 'net'",
    and with a host (a shared ledger, ``HostView``) ``blog@h1`` -> "app 'blog' on host h1"."""
    base, at, host = owner.rpartition("@")
    if at and base and host:
        return f"{describe_owner(base)} on host {host}"
    role, sep, name = owner.partition(":")
    return f"{role} '{name}'" if sep and role and name else f"app '{owner}'"


def describe_key(kind: str, key: str) -> str:
    """Render a resource for a message: "port 8000", "lbname 'blog'", and a per-host key of a
    shared ledger (``@h1/8000``, ``HostView``) as "port 8000 on host h1"."""
    if key.startswith("@") and "/" in key:
        host, _, local = key[1:].partition("/")
        return f"{describe_key(kind, local)} on host {host}"
    return f"{kind} {key}" if key.isdigit() else f"{kind} '{key}'"


def conflict(
    kind: str, key: str, holder: str, since: str | None, *, who: str, action: str
) -> ConflictError:
    """Build the error for ``who`` failing to ``action`` ``(kind, key)`` held by ``holder``."""
    when = f" since {since}" if since else ""
    return ConflictError(
        f"{describe_key(kind, key)} is held by {describe_owner(holder)}{when}"
        f" ({describe_owner(who)} cannot {action} it)",
        kind=kind,
        key=key,
        holder=holder,
        since=since,
    )


def encode_value(kind: str, key: str, value: Mapping[str, Any]) -> str:
    """Encode a record value as canonical JSON text (sorted keys), naming the record on error."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CorralError(
            f"value of {describe_key(kind, key)} is not JSON: {exc}",
            code=ErrorCode.INVALID,
            retry=False,
            details={"kind": kind, "key": key},
        ) from exc


def _name(what: str, text: str) -> str:
    if not isinstance(text, str) or not text:
        raise CorralError(
            f"ledger {what} must be a non-empty string, got {text!r}",
            code=ErrorCode.INVALID,
            retry=False,
        )
    return text


def _checked(claim: Claim) -> Claim:
    if not isinstance(claim.value, Mapping):
        raise CorralError(
            f"value of {describe_key(claim.kind, claim.key)} must be a JSON object, "
            f"got {type(claim.value).__name__}",
            code=ErrorCode.INVALID,
            retry=False,
            details={"kind": claim.kind, "key": claim.key},
        )
    return claim
