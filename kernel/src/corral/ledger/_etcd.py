"""The ledger on etcd (v3, through its HTTP/JSON gateway with ``etcd3gw``): several hosts, one
ledger, no consensus of ours.

Keyspace, small and versioned (``/corral/v1/``):

- ``r/<kind>/<key>``: a record, JSON ``{owner, value, since, lease}``; its etcd
  ``mod_revision`` is the record's revision, etcd's cluster revision the ledger's;
- ``l/<id>``: a lease's owner and TTL, attached to the etcd lease it describes (it vanishes
  with it);
- ``sync``: written by ``changes()`` to mark where the history it reads ends.

A commit reads every record its compares and operations touch (one etcd transaction of
ranges), applies the ``Txn`` to that snapshot exactly as the SQLite backend does (same
errors, same no-op rules), then writes the net puts and deletes in one etcd transaction whose
compares are the snapshot itself: each key the ``Txn`` names, and each record it deletes,
must still be absent (``create_revision == 0``) or unchanged (``mod_revision``); the other
records a ``release_all`` read are not pinned (etcd allows 128 compares per transaction).
Another host that wrote one of them in between makes the compare fail and the commit starts
again from a new read; so a multi-claim is all or nothing across the cluster and no key is
ever held by two owners. Leases are etcd's (TTL in whole seconds, rounded up): records
claimed under one vanish when it expires, by etcd, on every host at once.

Endpoints: ``etcd://h1:2379,h2:2379,h3:2379`` (``etcds://`` for TLS). A member that does not
answer is skipped for the next; when none commits (no quorum: etcd times the proposal out),
the error says so, naming each member's failure, and says whether nothing was written (the
commit failed before its write) or the write may still be applied (a member took it without
confirming it: a leader that lost its quorum may commit it once the quorum is back).
"""

from __future__ import annotations

import base64
import builtins
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from corral.errors import ConflictError, CorralError, ErrorCode, NotFoundError, UnavailableError
from corral.ledger._base import (
    Change,
    ClaimOp,
    CompactedError,
    Compare,
    Lease,
    Ledger,
    Record,
    ReleaseOp,
    Txn,
    conflict,
    describe_key,
    describe_owner,
    encode_value,
)

PREFIX = "/corral/v1/"
RECORDS = PREFIX + "r/"
LEASES = PREFIX + "l/"
SYNC = PREFIX + "sync"
MAX_RETRIES = 64
"""Commits that lose a race re-read and try again, this many times at most."""
REQUEST_TIMEOUT_S = 2.5
"""One request to one member; a commit tries the members until the ledger's timeout."""
CACHE_SIZE = 100_000
"""Keys whose last seen state a process keeps for its speculative first attempts."""
BATCH_KEYS = 100
"""At most this many keys in one batched etcd transaction (etcd refuses more than
``--max-txn-ops``, 128 by default, compares or operations in one)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def record_key(kind: str, key: str) -> str:
    """The etcd key of ``(kind, key)`` (the kind escaped so that ``/`` ends it)."""
    return f"{RECORDS}{quote(kind, safe='')}/{key}"


def _split(etcd_key: str) -> tuple[str, str]:
    kind, _, key = etcd_key[len(RECORDS):].partition("/")
    return unquote(kind), key


@dataclass
class _Row:
    owner: str
    value: str  # canonical JSON
    since: str
    lease: str | None
    revision: int  # mod_revision
    created: int  # create_revision

    def record(self, kind: str, key: str) -> Record:
        return Record(kind, key, self.owner, json.loads(self.value), self.since, self.revision,
                      self.lease)


def _row(kv: dict[str, Any]) -> _Row:
    data = json.loads(_unb64(kv.get("value", "")) or "{}")
    return _Row(str(data["owner"]), json.dumps(data["value"], sort_keys=True,
                                               separators=(",", ":")),
                str(data["since"]), data.get("lease"), int(kv.get("mod_revision", 0)),
                int(kv.get("create_revision", 0)))


def _encode_row(row: _Row) -> str:
    return json.dumps({"owner": row.owner, "value": json.loads(row.value), "since": row.since,
                       "lease": row.lease}, sort_keys=True, separators=(",", ":"))


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class EtcdLedger(Ledger):
    """``Ledger`` on an etcd v3 cluster; safe to share across threads (a connection each)."""

    remote = True

    def __init__(self, endpoints: Sequence[tuple[str, int]], *, tls: bool = False,
                 timeout: float = 12.0) -> None:
        if not endpoints:
            raise CorralError("etcd ledger: no endpoint given", code=ErrorCode.INVALID,
                              retry=False)
        self.endpoints = list(endpoints)
        self.protocol = "https" if tls else "http"
        self.timeout = timeout
        self._local = threading.local()
        self._preferred = 0  # the member that answered last
        self._cache: dict[str, _Row | None] = {}  # keys as this process last saw them
        self._cache_lock = threading.Lock()
        self._closed = False

    # -- transport ------------------------------------------------------------------------------

    def _client(self, index: int) -> Any:
        from etcd3gw.client import Etcd3Client

        clients: dict[int, Any] = self._local.__dict__.setdefault("clients", {})
        if index not in clients:
            host, port = self.endpoints[index]
            clients[index] = Etcd3Client(host=host, port=port, protocol=self.protocol,
                                         timeout=REQUEST_TIMEOUT_S, api_path="/v3/")
        return clients[index]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the v3 gateway of the first member that answers; raise UnavailableError
        when none does or when the cluster cannot commit (no quorum)."""
        from etcd3gw import exceptions

        if self._closed:
            raise CorralError("the ledger is closed", code=ErrorCode.INTERNAL, retry=False)
        errors: list[str] = []
        # A write a member took but did not confirm (timed out, lost its leader) may still be
        # applied later; the next member is safe to ask (our writes are compare-and-swap, so at
        # most one of the two applies), but if none confirms, the outcome is unknown.
        write = path == "kv/lease/revoke" or any(
            "request_put" in op or "request_delete_range" in op for op in body.get("success", []))
        unknown = False
        count = len(self.endpoints)
        deadline = time.monotonic() + self.timeout
        # every member in turn, again and again until the deadline: a leader that died is
        # replaced within an election timeout, and a member without a leader answers only when
        # its own (longer) timeout runs out, so each request gets REQUEST_TIMEOUT_S at most
        for step in range(count * 1000):
            if step and step % count == 0:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            index = (self._preferred + step) % count
            host, port = self.endpoints[index]
            client = self._client(index)
            try:
                res = client.post(client.get_url(path), data=json.dumps(body))
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as exc:
                why, refused = _failure(exc)
                errors.append(f"{host}:{port}: {why}")
                unknown = unknown or (write and not refused)
                continue
            except exceptions.Etcd3Exception as exc:
                message = str(exc.detail_text or exc)
                if "compacted" in message:
                    raise _Compacted(message) from None
                if "lease not found" in message:
                    raise _LeaseGone(message) from None
                errors.append(f"{host}:{port}: {message.strip()[:200]}")
                if isinstance(exc, exceptions.InternalServerError) or "timed out" in message \
                        or "leader" in message:
                    unknown = unknown or write
                    continue
                raise CorralError(f"etcd refused a ledger request: {message[:300]}",
                                  code=ErrorCode.INTERNAL) from None
            self._preferred = index
            return dict(res)
        errors = errors[-count:]  # the last round says it
        outcome = ("the write may still be applied (a member took it without confirming it): "
                   "re-read the ledger before retrying" if unknown else "nothing was written")
        raise UnavailableError(
            "the etcd ledger is unavailable (no member answered, or the cluster has no "
            f"quorum); {outcome}: {'; '.join(errors)}")

    def _txn(self, compares: list[dict[str, Any]], success: list[dict[str, Any]],
             failure: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"compare": compares, "success": success}
        if failure:
            body["failure"] = failure
        return self._post("kv/txn", body)

    def _range(self, key: str, *, prefix: bool = False, revision: int | None = None
               ) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end(key)
        if revision is not None:
            body["revision"] = revision
        return body

    # -- reads ----------------------------------------------------------------------------------

    def _read(self, keys: builtins.list[str], prefixes: builtins.list[str]
              ) -> tuple[dict[str, _Row | None], int]:
        """The rows at ``keys`` and under ``prefixes`` (one consistent read) and the revision."""
        ranges = [{"request_range": self._range(k)} for k in keys]
        ranges += [{"request_range": self._range(p, prefix=True)} for p in prefixes]
        res = self._txn([], ranges or [{"request_range": self._range(SYNC)}])
        rows: dict[str, _Row | None] = dict.fromkeys(keys)
        for item in res.get("responses", []):
            for kv in item.get("response_range", {}).get("kvs", []):
                name = _unb64(kv["key"])
                if name.startswith(RECORDS):  # not the sync marker (not a record, not JSON)
                    rows[name] = _row(kv)
        return rows, int(res["header"]["revision"])

    def get(self, kind: str, key: str) -> Record | None:
        """See ``Ledger.get``."""
        name = record_key(kind, key)
        rows, _ = self._read([name], [])
        row = rows.get(name)
        return None if row is None else row.record(kind, key)

    def list(
        self, *, owner: str | None = None, kind: str | None = None, prefix: str | None = None
    ) -> builtins.list[Record]:
        """See ``Ledger.list``."""
        start = RECORDS if kind is None else record_key(kind, prefix or "")
        rows, _ = self._read([], [start])
        out = []
        for name, row in rows.items():
            if row is None:
                continue
            k, key = _split(name)
            if (owner is None or row.owner == owner) and (kind is None or k == kind) and (
                    not prefix or key.startswith(prefix)):
                out.append(row.record(k, key))
        return sorted(out, key=lambda r: (r.kind, r.key))

    def revision(self) -> int:
        """See ``Ledger.revision``: etcd's revision (every key's changes count, ours and any
        other keys of the cluster; it only grows)."""
        return self._read([SYNC], [])[1]

    def changes(self, since_revision: int) -> builtins.list[Change]:
        """See ``Ledger.changes``: etcd's own history of the records (also the deletions of
        expired leases), read with a watch from ``since_revision + 1`` up to a marker this
        call writes; ``CompactedError`` when etcd compacted part of it.

        etcd compacted at revision C keeps the revisions from C on, but a delete at C has lost
        the record it deleted (that version was older than C), so the history is whole only
        after C: ``since_revision < C`` raises, with ``compacted`` C, as SQLite's does."""
        now = self.revision()
        if since_revision >= now:
            return []
        first = max(since_revision, 1)  # revision 0 would mean "the current one"
        try:
            self._post("kv/range", {**self._range(SYNC), "revision": first, "count_only": True})
        except _Compacted:
            raise CompactedError(since_revision, self._compact_revision(first)) from None
        return list(self._watch_until_marker(since_revision + 1))

    def wait_for_change(self, kind: str, prefix: str, after_revision: int,
                        timeout_s: float) -> bool:
        """See ``Ledger.wait_for_change``: one etcd watch of the key range from
        ``after_revision + 1``, so a change between the caller's read and this call is
        reported too; it ends at the first event, or when nothing came for ``timeout_s``.
        A member that does not take the watch is not retried here: after a second's pause
        this returns False and the caller reads again (through every member)."""
        import requests

        key = record_key(kind, prefix)
        body = {"create_request": {"key": _b64(key), "range_end": _range_end(key),
                                   "start_revision": after_revision + 1}}
        client = self._client(self._preferred)
        started = time.monotonic()
        try:
            with client.session.post(client.get_url("watch"), data=json.dumps(body),
                                     stream=True, timeout=(REQUEST_TIMEOUT_S, timeout_s)
                                     ) as resp:
                for line in resp.iter_lines():
                    result = json.loads(line or b"{}").get("result", {})
                    if result.get("events"):
                        return True
                    if int(result.get("compact_revision", 0) or 0) or result.get("canceled"):
                        return False
        except (requests.RequestException, ValueError):
            pass  # no answer for timeout_s (the normal end), or a member gone
        if time.monotonic() - started < min(1.0, timeout_s):
            time.sleep(min(1.0, timeout_s))  # a refused watch must not become a busy loop
        return False

    def _compact_revision(self, start: int) -> int:
        """etcd's compaction revision, as a watch from ``start`` (compacted) reports it."""
        client = self._client(self._preferred)
        body = {"create_request": {"key": _b64(SYNC), "start_revision": start}}
        with client.session.post(client.get_url("watch"), data=json.dumps(body), stream=True,
                                 timeout=self.timeout) as resp:
            for line in resp.iter_lines():
                result = json.loads(line or b"{}").get("result", {})
                compacted = int(result.get("compact_revision", 0) or 0)
                if compacted:
                    return compacted
        raise UnavailableError("the etcd watch ended before it reported the compaction")

    def _watch_until_marker(self, start: int) -> builtins.list[Change]:
        marker = f"{time.time_ns()}-{id(self)}-{threading.get_ident()}"
        client = self._client(self._preferred)
        body = {"create_request": {"key": _b64(PREFIX), "range_end": _range_end(PREFIX),
                                   "start_revision": start, "prev_kv": True}}
        out: list[Change] = []
        with client.session.post(client.get_url("watch"), data=json.dumps(body), stream=True,
                                 timeout=self.timeout) as resp:
            lines = resp.iter_lines()
            created = False
            for line in lines:
                if not line:
                    continue
                result = json.loads(line).get("result", {})
                if int(result.get("compact_revision", 0) or 0) > 0:
                    raise CompactedError(start - 1, int(result["compact_revision"]))
                if result.get("created") and not created:
                    created = True
                    self._txn([], [{"request_put": {"key": _b64(SYNC),
                                                    "value": _b64(marker)}}])
                for ev in result.get("events", []):
                    kv = ev.get("kv", {})
                    name = _unb64(kv.get("key", ""))
                    if name == SYNC:
                        if _unb64(kv.get("value", "")) == marker:
                            return out
                        continue
                    if not name.startswith(RECORDS):
                        continue
                    kind, key = _split(name)
                    rev = int(kv.get("mod_revision", 0))
                    if ev.get("type") == "DELETE":
                        prev = ev.get("prev_kv")
                        if prev is None:  # what it deleted is compacted away
                            raise CompactedError(start - 1, rev)
                        row = _row(prev)
                        out.append(Change(rev, "delete", kind, key, row.owner,
                                          json.loads(row.value), row.lease))
                    else:
                        row = _row(kv)
                        out.append(Change(rev, "put", kind, key, row.owner,
                                          json.loads(row.value), row.lease))
        raise UnavailableError("the etcd watch ended before the history was read")

    # -- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl_s: float, owner: str) -> str:
        """See ``Ledger.grant_lease``: an etcd lease of ``ceil(ttl_s)`` seconds."""
        if not isinstance(ttl_s, int | float) or not ttl_s > 0:
            raise CorralError(f"lease TTL must be > 0 seconds, got {ttl_s!r}",
                              code=ErrorCode.INVALID, retry=False)
        if not isinstance(owner, str) or not owner:
            raise CorralError(f"lease owner must be a non-empty string, got {owner!r}",
                              code=ErrorCode.INVALID, retry=False)
        res = self._post("lease/grant", {"TTL": max(1, math.ceil(ttl_s))})
        lease_id = format(int(res["ID"]), "x")
        meta = json.dumps({"owner": owner, "ttl_s": float(ttl_s), "granted": _iso(time.time())})
        self._txn([], [{"request_put": {"key": _b64(LEASES + lease_id), "value": _b64(meta),
                                        "lease": int(res["ID"])}}])
        return lease_id

    def _lease_meta(self, lease_id: str) -> dict[str, Any] | None:
        rows = self._post("kv/range", self._range(LEASES + lease_id)).get("kvs", [])
        return json.loads(_unb64(rows[0]["value"])) if rows else None

    def keepalive(self, lease_id: str) -> Lease:
        """See ``Ledger.keepalive``."""
        lid = _lease_int(lease_id)
        meta = self._lease_meta(lease_id)
        try:
            res = self._post("lease/keepalive", {"ID": lid})
        except _LeaseGone:
            res = {}
        ttl = int((res.get("result") or {}).get("TTL", -1) or -1)
        if meta is None or ttl <= 0:
            raise NotFoundError(f"lease {lease_id} does not exist or has expired")
        return Lease(lease_id, str(meta["owner"]), float(meta["ttl_s"]), time.time() + ttl,
                     str(meta["granted"]))

    def revoke(self, lease_id: str) -> int:
        """See ``Ledger.revoke``."""
        try:
            res = self._post("kv/lease/revoke", {"ID": _lease_int(lease_id)})
        except _LeaseGone:
            return self.revision()
        return int(res["header"]["revision"])

    def lease(self, lease_id: str) -> Lease | None:
        """See ``Ledger.lease``."""
        try:
            lid = _lease_int(lease_id)
        except NotFoundError:
            return None
        try:
            res = self._post("kv/lease/timetolive", {"ID": lid})
        except _LeaseGone:
            return None
        ttl = int(res.get("TTL", -1))
        meta = self._lease_meta(lease_id)
        if ttl <= 0 or meta is None:
            return None
        return Lease(lease_id, str(meta["owner"]), float(meta["ttl_s"]), time.time() + ttl,
                     str(meta["granted"]))

    def expire(self, now: float | None = None) -> int:
        """See ``Ledger.expire``: etcd expires leases and their records itself; nothing to do."""
        return 0

    def members(self, timeout_s: float = 1.0) -> builtins.list[tuple[str, str]]:
        """See ``Ledger.members``: each member's ``/health`` asked at once (etcd answers
        ``{"health": "true"}`` only while it has a leader)."""
        import requests

        out: list[tuple[str, str]] = [("", "unknown")] * len(self.endpoints)

        def probe(index: int) -> None:
            host, port = self.endpoints[index]
            endpoint = f"{host}:{port}"
            try:
                resp = requests.get(f"{self.protocol}://{endpoint}/health", timeout=timeout_s,
                                    proxies={"http": "", "https": ""})
                healthy = str(resp.json().get("health")) == "true"
                out[index] = (endpoint, "leader" if healthy else "no-leader")
            except requests.ConnectionError as exc:
                refused = "refused" in str(exc).lower()
                out[index] = (endpoint, "down" if refused else "unknown")
            except (requests.RequestException, ValueError):
                out[index] = (endpoint, "unknown")

        threads = [threading.Thread(target=probe, args=(i,), daemon=True)
                   for i in range(len(self.endpoints))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 1.0)
        return [(e or "{}:{}".format(*self.endpoints[i]), state)
                for i, (e, state) in enumerate(out)]

    def close(self) -> None:
        """Close the connections of the calling thread (others close with their threads)."""
        for client in self._local.__dict__.get("clients", {}).values():
            client.session.close()
        self._closed = True

    # -- writes ---------------------------------------------------------------------------------

    def commit(self, txn: Txn) -> int:
        """See ``Ledger.commit``: optimistic, compare-and-swap on every key it read.

        The first attempt is speculative: it assumes the keys are as this process last saw
        them (absent when never seen) and sends the writes with those assumptions as compares
        and, as the transaction's *else*, a read of the same keys; so a claim of a free key,
        or the release of a key this process claimed, takes one round trip. A guess that was
        wrong never refuses anything: the read that came back is applied instead, exactly as
        if it had been made first. ``release_all`` always reads first."""
        named = _named(txn)
        keys = sorted(named)
        whole = any(not isinstance(op, ClaimOp | ReleaseOp) for op in txn.ops)
        leases = {op.lease for op in txn.ops if isinstance(op, ClaimOp) and op.lease}
        lease_owners = {lid: self._live_lease_owner(lid) for lid in sorted(leases)}
        snapshot: tuple[dict[str, _Row | None], int] | None = None
        guess = None if whole else self._guess(keys)
        for _ in range(MAX_RETRIES):
            speculative = snapshot is None and guess is not None
            if speculative:
                assert guess is not None
                rows, revision = guess, 0
                guess = None
            elif snapshot is not None:
                rows, revision = snapshot
                snapshot = None
            else:
                rows, revision = self._read(keys, [RECORDS] if whole else [])
                self._remember(rows)
            state = dict(rows)
            try:
                _apply(state, txn, lease_owners, time.time())
            except CorralError:
                if speculative:
                    continue  # decided on what etcd holds, never on a guess
                raise
            writes = _writes(state, rows)
            if not writes:
                if speculative:
                    continue  # "nothing to do" is decided on what etcd holds too
                txn.revision = revision
                return revision
            compares = [_compare(name, before) for name, before in rows.items()
                        # one read by a release_all and left alone needs no pinning
                        if name in named or state.get(name) is not before]
            failure = [{"request_range": self._range(k)} for k in keys] if speculative else []
            try:
                res = self._txn(compares, writes, failure)
            except _LeaseGone:  # expired between the check and the write; nothing written
                raise NotFoundError(
                    f"lease {', '.join(sorted(leases))} does not exist or has expired "
                    "(it expired while the claim was committed)") from None
            if res.get("succeeded"):
                txn.revision = int(res["header"]["revision"])
                self._remember({name: None if row is None else _Row(
                    row.owner, row.value, row.since, row.lease, txn.revision,
                    row.created or txn.revision) for name, row in state.items()
                    if name in named or row is None})
                return txn.revision
            if speculative:  # the else branch read the keys, atomically: go on from there
                fresh: dict[str, _Row | None] = dict.fromkeys(keys)
                for item in res.get("responses", []):
                    for kv in item.get("response_range", {}).get("kvs", []):
                        fresh[_unb64(kv["key"])] = _row(kv)
                self._remember(fresh)
                snapshot = (fresh, int(res["header"]["revision"]))
        raise UnavailableError(f"the ledger transaction lost {MAX_RETRIES} races in a row to "
                               "other writers; try again")

    def commit_many(self, txns: Sequence[Txn]) -> builtins.list[int | CorralError]:
        """See ``Ledger.commit_many``: group commit, one etcd transaction for many.

        The longest run of transactions at the front that name disjoint keys, hold no lease
        and release nothing wholesale goes out as one etcd transaction, built as each one's
        speculative first attempt would be (``commit``) and comparing every key any of them
        named: one round trip, one revision, for all of them. When a guess was wrong
        (etcd's *else* branch read the keys) or one of them would be refused or change
        nothing on its guess, the run is committed one by one instead, each deciding on what
        etcd holds, exactly as ``commit`` does; so are the transactions after the run.
        """
        results: list[int | CorralError] = []
        pending = list(txns)
        while pending:
            run, keys = self._batchable_run(pending)
            done = self._commit_together(run, keys) if len(run) > 1 else None
            if done is None:
                run = run or pending[:1]
                done = super().commit_many(run)
            results.extend(done)
            pending = pending[len(run):]
        return results

    @staticmethod
    def _batchable_run(txns: builtins.list[Txn]) -> tuple[builtins.list[Txn], builtins.list[str]]:
        run: list[Txn] = []
        taken: set[str] = set()
        for txn in txns:
            if any(not isinstance(op, ClaimOp | ReleaseOp)
                   or (isinstance(op, ClaimOp) and op.lease) for op in txn.ops):
                break
            mine = _named(txn)
            if not mine or mine & taken or len(taken) + len(mine) > BATCH_KEYS:
                break
            run.append(txn)
            taken |= mine
        return run, sorted(taken)

    def _commit_together(self, run: builtins.list[Txn], keys: builtins.list[str]
                         ) -> builtins.list[int | CorralError] | None:
        """One etcd transaction for ``run`` (disjoint keys), or None when it did not go
        through (nothing written; what etcd holds is remembered for the fallback)."""
        guess = self._guess(keys)
        now = time.time()
        compares: list[dict[str, Any]] = []
        writes: list[dict[str, Any]] = []
        states: list[dict[str, _Row | None]] = []
        for txn in run:
            named = sorted(_named(txn))
            state = {k: guess[k] for k in named}
            try:
                _apply(state, txn, {}, now)
            except CorralError:
                return None  # decided on what etcd holds, never on a guess
            mine = _writes(state, guess)
            if not mine:
                return None  # "nothing to do" is decided on what etcd holds too
            writes += mine
            compares += [_compare(k, guess[k]) for k in named]
            states.append(state)
        res = self._txn(compares, writes, [{"request_range": self._range(k)} for k in keys])
        if not res.get("succeeded"):
            fresh: dict[str, _Row | None] = dict.fromkeys(keys)
            for item in res.get("responses", []):
                for kv in item.get("response_range", {}).get("kvs", []):
                    fresh[_unb64(kv["key"])] = _row(kv)
            self._remember(fresh)
            return None
        revision = int(res["header"]["revision"])
        for txn, state in zip(run, states, strict=True):
            txn.revision = revision
            self._remember({name: None if row is None else _Row(
                row.owner, row.value, row.since, row.lease, revision, row.created or revision)
                for name, row in state.items()})
        return [revision] * len(run)

    def _guess(self, keys: builtins.list[str]) -> dict[str, _Row | None]:
        """The keys as this process last saw them (absent when never seen)."""
        with self._cache_lock:
            return {k: self._cache.get(k) for k in keys}

    def _remember(self, rows: dict[str, _Row | None]) -> None:
        with self._cache_lock:
            if len(self._cache) > CACHE_SIZE:
                self._cache.clear()
            for name, row in rows.items():
                if name.startswith(RECORDS):
                    self._cache[name] = row

    def _live_lease_owner(self, lease_id: str) -> str | None:
        lease = self.lease(lease_id)
        return None if lease is None else lease.owner


class _Compacted(Exception):
    pass


def _failure(exc: Exception) -> tuple[str, bool]:
    """Why a member did not serve a request, in a few words, and whether it surely never got
    it (connection refused): etcd's own error when it answered 503 or 504 (no leader, request
    timed out: no quorum), else how the connection failed."""
    text = str(getattr(exc, "detail_text", None) or exc)
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"]), False
    if "refused" in text.lower():
        return "unreachable (connection refused)", True
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "unreachable (no answer in time)", False
    return f"unreachable ({text.strip()[-120:] or type(exc).__name__})", False


class _LeaseGone(Exception):
    pass


def _lease_int(lease_id: str) -> int:
    try:
        return int(lease_id, 16)
    except (TypeError, ValueError):
        raise NotFoundError(f"lease {lease_id} does not exist or has expired") from None


# -- the transaction, applied to a snapshot (the SQLite backend's rules) -------------------------


def _named(txn: Txn) -> set[str]:
    """The record keys a transaction of claims, releases and compares names."""
    return ({record_key(c.kind, c.key) for c in txn.compares}
            | {record_key(op.claim.kind, op.claim.key) for op in txn.ops
               if isinstance(op, ClaimOp)}
            | {record_key(op.kind, op.key) for op in txn.ops if isinstance(op, ReleaseOp)})


def _writes(state: dict[str, _Row | None], before: dict[str, _Row | None]
            ) -> list[dict[str, Any]]:
    """The etcd operations that turn ``before`` into ``state``."""
    writes: list[dict[str, Any]] = []
    for name, row in state.items():
        was = before.get(name)
        if row is None and was is not None:
            writes.append({"request_delete_range": {"key": _b64(name)}})
        elif row is not None and (was is None or _encode_row(row) != _encode_row(was)):
            put: dict[str, Any] = {"key": _b64(name), "value": _b64(_encode_row(row))}
            if row.lease:
                put["lease"] = int(row.lease, 16)
            writes.append({"request_put": put})
    return writes


def _compare(name: str, before: _Row | None) -> dict[str, Any]:
    """etcd's compare that ``name`` is still as ``before`` (absent: never created)."""
    if before is None:
        return {"key": _b64(name), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
    return {"key": _b64(name), "target": "MOD", "result": "EQUAL",
            "mod_revision": before.revision}


def _apply(state: dict[str, _Row | None], txn: Txn, lease_owners: dict[str, str | None],
           now: float) -> None:
    for compare in txn.compares:
        _check(state, compare)
    for op in txn.ops:
        if isinstance(op, ClaimOp):
            kind, key = op.claim.kind, op.claim.key
            text = encode_value(kind, key, op.claim.value)
            if op.lease is not None:
                owner = lease_owners.get(op.lease)
                if owner is None:
                    raise NotFoundError(f"lease {op.lease} does not exist or has expired "
                                        f"(claiming {describe_key(kind, key)})")
                if owner != op.owner:
                    raise ConflictError(
                        f"lease {op.lease} belongs to {describe_owner(owner)}; "
                        f"{describe_owner(op.owner)} cannot claim under it",
                        kind="lease", key=op.lease, holder=owner)
            name = record_key(kind, key)
            row = state.get(name)
            if row is None:
                state[name] = _Row(op.owner, text, _iso(now), op.lease, 0, 0)
            elif row.owner != op.owner:
                raise conflict(kind, key, row.owner, row.since, who=op.owner, action="claim")
            elif row.value != text or row.lease != op.lease:
                state[name] = _Row(op.owner, text, row.since, op.lease, row.revision,
                                   row.created)
        elif isinstance(op, ReleaseOp):
            name = record_key(op.kind, op.key)
            row = state.get(name)
            if row is None:
                continue
            if row.owner != op.owner:
                raise conflict(op.kind, op.key, row.owner, row.since, who=op.owner,
                               action="release")
            state[name] = None
        else:
            for name, row in builtins.list(state.items()):
                if row is not None and row.owner == op.owner and (
                        op.kind is None or _split(name)[0] == op.kind):
                    state[name] = None


def _check(state: dict[str, _Row | None], compare: Compare) -> None:
    row = state.get(record_key(compare.kind, compare.key))
    what = describe_key(compare.kind, compare.key)
    expected = "free" if compare.holder is None else f"held by {describe_owner(compare.holder)}"
    if row is None:
        if compare.holder is None:
            return
        problem, holder, since = "it is free", "", None
    else:
        holder, since = row.owner, row.since
        if compare.holder == holder and compare.revision in (None, row.revision):
            return
        if compare.holder == holder:
            problem = f"it changed at revision {row.revision} (expected {compare.revision})"
        else:
            problem = f"it is held by {describe_owner(holder)} since {since}"
    raise ConflictError(f"expected {what} to be {expected}, but {problem}", kind=compare.kind,
                        key=compare.key, holder=holder, since=since)
