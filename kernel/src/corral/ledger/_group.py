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
    transaction.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: list[tuple[Txn, asyncio.Future[int]]] = []
        self._scheduled = False

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
        try:
            results = self.ledger.commit_many([txn for txn, _ in batch])
        except Exception as exc:  # the backend wrote nothing of the batch
            for _txn, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_txn, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, CorralError):
                fut.set_exception(res)
            else:
                fut.set_result(res)
