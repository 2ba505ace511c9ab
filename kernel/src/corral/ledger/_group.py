"""Group commit: requests that arrive together share one durable ledger write."""

from __future__ import annotations

import asyncio

from corral.errors import CorralError
from corral.ledger._base import Ledger, Txn


class GroupCommit:
    """Collect the transactions submitted during one event-loop pass; commit them together.

    Each transaction stays all-or-nothing on its own (``Ledger.commit_many``); a caller waits
    only for its own result. With one request at a time this is a plain commit; with many in
    flight (the bus drains every queued message in one wake-up) they share one SQLite
    transaction. A ``remote`` ledger (etcd) commits in a worker thread, off the event loop.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: list[tuple[Txn, asyncio.Future[int]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def commit(self, txn: Txn) -> int:
        """Commit ``txn`` with whatever else is queued now; its revision or its error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.append((txn, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # after the other requests of this pass have queued
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        if self.ledger.remote:
            # a networked ledger (etcd) may take seconds (an election, a lost quorum): the
            # kernel's loop keeps serving and heartbeating meanwhile
            task = asyncio.ensure_future(self._flush_in_thread(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            results = self.ledger.commit_many([txn for txn, _ in batch])
        except Exception as exc:  # the backend wrote nothing of the batch
            self._fail(batch, exc)
            return
        self._settle(batch, results)

    async def _flush_in_thread(self, batch: list[tuple[Txn, asyncio.Future[int]]]) -> None:
        try:
            results = await asyncio.to_thread(self.ledger.commit_many, [t for t, _ in batch])
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._settle(batch, results)

    @staticmethod
    def _fail(batch: list[tuple[Txn, asyncio.Future[int]]], exc: Exception) -> None:
        for _txn, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    @staticmethod
    def _settle(batch: list[tuple[Txn, asyncio.Future[int]]],
                results: list[int | CorralError]) -> None:
        for (_txn, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, CorralError):
                fut.set_exception(res)
            else:
                fut.set_result(res)
