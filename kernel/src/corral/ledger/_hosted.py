"""One host's view of a ledger that several hosts share (etcd): ``HostView``.

Several kernels on one etcd ledger each claim their own things; what must be unique in the
whole cluster is unique, what only means something on one host is per host:

- **Cluster-wide kinds** (``CLUSTER_KINDS``: app names, lb names, domains, app uids,
  releases, cron slots, the hosts' own records) keep their keys. Two hosts claiming one of
  them meet in the ledger and the second is refused, the error naming the holder and its
  host.
- **Every other kind** is per host (host ports, paths, instances, drivers, the net driver's
  address slots, and any kind a third-party driver claims): its key is stored as
  ``@<host>/<key>``, so port 8080 on h1 and port 8080 on h2 are two records.
- **Every owner** is stored as ``<owner>@<host>``: the app ``shop`` on h1 owns
  ``shop@h1``, so a release of everything ``shop`` holds (``release(owner)``) never takes
  another host's records, and a claim by ``shop`` on h2 of h1's app name ``shop`` is a
  conflict, not a re-claim by the same owner.

Callers see the ledger as if it were theirs alone: keys and owners come back without the
host, and reads show this host's records only (a kernel restoring its apps after a restart
must never adopt another host's), except the kinds in ``SHARED_READS`` (app uids, which a
host allocates from one range, the host records, the hosts' instance subnets and the lb
backends), which are listed for every host,
their owners keeping ``@<host>``. ``holder`` tells who holds a cluster-wide key, whichever
host it is. ``@`` appears in no app, driver or host name, so the mapping is one to one.

Messages name resources and holders through ``describe_key``/``describe_owner``, which read
both forms ("port 8080 on host h1", "app 'shop' on host h1").
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from corral.errors import CorralError
from corral.ledger._base import (
    Change,
    Claim,
    ClaimOp,
    Compare,
    Lease,
    Ledger,
    Record,
    ReleaseAllOp,
    ReleaseOp,
    Txn,
    TxnOp,
)

CLUSTER_KINDS = frozenset({"app", "lbname", "domain", "uid", "release", "cron-slot", "host",
                           "host-alive", "subnet", "backend", "placement", "certificate",
                           "acme-challenge"})
"""Kinds whose keys are unique in the whole cluster; every other kind is per host. ``subnet``:
a host's instance subnet (the net driver's, routed to by the others); ``backend``: an
instance an lb balances over (the lb driver's, so that every host's lb finds every host's);
``placement``: the share of a spread app another host runs (``corral.deploy._spread``);
``certificate``: an app's TLS certificate and key, as the lb of its home serves them (so that
every host's lb serves the app over HTTPS; sealed, see ``SEALED_KINDS``); ``acme-challenge``:
an ACME HTTP-01 token and its key authorization (so that every host's lb answers it), or a
host's acknowledgement that it does (key ``<token>@<host>``)."""

SHARED_READS = frozenset({"uid", "host", "host-alive", "subnet", "backend", "placement",
                          "certificate", "acme-challenge"})
"""Cluster-wide kinds whose records every host lists, whoever holds them."""

SEALED_KINDS: Mapping[str, str] = MappingProxyType({"certificate": "lb"})
"""Kinds whose values hold a secret (a private key) -> the capability of the one driver that
may write and read them: the kernel seals such a value under the cluster key before it
reaches the shared ledger (``corral.replication.Channel.seal_record``) and opens it only for
that driver; anyone else listing it sees ``{"sealed": true}``."""


class HostView(Ledger):
    """Host ``host``'s view of ``inner``, a ledger several hosts share (see the module)."""

    def __init__(self, inner: Ledger, host: str) -> None:
        if not host or "@" in host or "/" in host:
            raise ValueError(f"not a host name: {host!r}")
        self.inner = inner
        self.host = host
        self.remote = inner.remote
        self._suffix = f"@{host}"
        self._prefix = f"@{host}/"

    # -- the mapping ------------------------------------------------------------------------

    def _owner(self, owner: str) -> str:
        return owner + self._suffix

    def _key(self, kind: str, key: str) -> str:
        return key if kind in CLUSTER_KINDS else self._prefix + key

    def _own_owner(self, owner: str) -> str:
        """A stored owner as callers see it: this host's without the suffix, others' as is."""
        return owner[: -len(self._suffix)] if owner.endswith(self._suffix) else owner

    def _visible(self, kind: str, key: str, owner: str) -> bool:
        if kind in CLUSTER_KINDS:
            return owner.endswith(self._suffix) or kind in SHARED_READS
        return key.startswith(self._prefix)

    def _local_key(self, kind: str, key: str) -> str:
        """A stored key of a visible record as callers see it (this host's prefix off)."""
        return key if kind in CLUSTER_KINDS else key[len(self._prefix):]

    def _record(self, rec: Record) -> Record:
        return replace(rec, key=self._local_key(rec.kind, rec.key),
                       owner=self._own_owner(rec.owner))

    def _txn(self, txn: Txn) -> Txn:
        out = Txn()
        out.compares = [Compare(c.kind, self._key(c.kind, c.key),
                                None if c.holder is None else self._owner(c.holder), c.revision)
                        for c in txn.compares]
        out.ops = [self._op(op) for op in txn.ops]
        return out

    def _op(self, op: TxnOp) -> TxnOp:
        if isinstance(op, ClaimOp):
            claim = Claim(op.claim.kind, self._key(op.claim.kind, op.claim.key), op.claim.value)
            return ClaimOp(self._owner(op.owner), claim, op.lease)
        if isinstance(op, ReleaseOp):
            return ReleaseOp(self._owner(op.owner), op.kind, self._key(op.kind, op.key))
        return ReleaseAllOp(self._owner(op.owner), op.kind)

    # -- writes -----------------------------------------------------------------------------

    def commit(self, txn: Txn) -> int:
        """``inner.commit`` of ``txn`` mapped to this host (see the module)."""
        revision = self.inner.commit(self._txn(txn))
        txn.revision = revision
        return revision

    def commit_many(self, txns: Sequence[Txn]) -> builtins.list[int | CorralError]:
        """``inner.commit_many`` (its group commit) of the mapped transactions."""
        results = self.inner.commit_many([self._txn(t) for t in txns])
        for txn, result in zip(txns, results, strict=True):
            if isinstance(result, int):
                txn.revision = result
        return results

    def grant_lease(self, ttl_s: float, owner: str) -> str:
        """A lease held by ``owner`` on this host."""
        return self.inner.grant_lease(ttl_s, self._owner(owner))

    def keepalive(self, lease_id: str) -> Lease:
        """``inner.keepalive``; the lease's owner as this host's callers see it."""
        lease = self.inner.keepalive(lease_id)
        return replace(lease, owner=self._own_owner(lease.owner))

    def revoke(self, lease_id: str) -> int:
        """``inner.revoke``."""
        return self.inner.revoke(lease_id)

    def expire(self, now: float | None = None) -> int:
        """``inner.expire``."""
        return self.inner.expire(now)

    def members(self, timeout_s: float = 1.0) -> builtins.list[tuple[str, str]]:
        """``inner.members``."""
        return self.inner.members(timeout_s)

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()

    # -- reads ------------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Record | None:
        """This host's record at ``(kind, key)`` (or, for ``SHARED_READS``, anyone's)."""
        rec = self.inner.get(kind, self._key(kind, key))
        if rec is None or not self._visible(rec.kind, rec.key, rec.owner):
            return None
        return self._record(rec)

    def holder(self, kind: str, key: str) -> str | None:
        """Who holds the cluster-wide ``(kind, key)``, on any host (``owner@host``), or None."""
        if kind not in CLUSTER_KINDS:
            raise ValueError(f"{kind!r} is a per-host kind")
        rec = self.inner.get(kind, key)
        return None if rec is None else rec.owner

    def list(
        self, *, owner: str | None = None, kind: str | None = None, prefix: str | None = None
    ) -> builtins.list[Record]:
        """This host's records matching the filters (and ``SHARED_READS`` of every host)."""
        # with a kind the prefix maps to the stored keys; without one it is applied after
        stored = self._key(kind, prefix) if kind is not None and prefix is not None else None
        found = self.inner.list(owner=None if owner is None else self._owner(owner),
                                kind=kind, prefix=stored)
        out = [self._record(r) for r in found if self._visible(r.kind, r.key, r.owner)]
        if prefix is not None and kind is None:
            out = [r for r in out if r.key.startswith(prefix)]
        return out

    def revision(self) -> int:
        """``inner.revision``."""
        return self.inner.revision()

    def changes(self, since_revision: int) -> builtins.list[Change]:
        """This host's changes after ``since_revision`` (and ``SHARED_READS`` of every host)."""
        out = []
        for ch in self.inner.changes(since_revision):
            if self._visible(ch.kind, ch.key, ch.owner):
                out.append(replace(ch, key=self._local_key(ch.kind, ch.key),
                                   owner=self._own_owner(ch.owner)))
        return out

    def wait_for_change(self, kind: str, prefix: str, after_revision: int,
                        timeout_s: float) -> bool:
        """``inner.wait_for_change`` of this host's keys (``prefix`` as callers see it)."""
        return self.inner.wait_for_change(kind, self._key(kind, prefix), after_revision,
                                          timeout_s)

    def lease(self, lease_id: str) -> Lease | None:
        """``inner.lease``; the owner as this host's callers see it."""
        lease = self.inner.lease(lease_id)
        return None if lease is None else replace(lease, owner=self._own_owner(lease.owner))
