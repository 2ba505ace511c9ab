"""Cron slots claimed in the kernel's ledger, so that a slot runs once in a cluster of hosts.

When several hosts share one ledger (etcd), the cron driver claims each slot there before
its run starts: a record of kind ``cron-slot`` (the cluster's, like app names), key
``<app>.<job>/<slot, UTC, YYYYMMDDTHHMMSSZ>``, owned by the app. Its value says which job and
schedule (``fingerprint``) it belongs to. Two hosts claiming one slot meet in the ledger and
the second is refused, naming the holder; the slot's records move with the app when another
host adopts it (``corral.failover``), so the adopting host sees how far the job got and never
starts a slot already started. ``corral ledger --kind cron-slot`` lists them; each job keeps
its newest ``KEEP`` records (older ones are released as new ones are claimed).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import structlog

from corral.errors import CorralError, ErrorCode
from corral_cron._job import CronJob
from corral_cron._kernel_launcher import KernelCalls
from corral_cron._store import iso, parse_iso

log = structlog.get_logger("corral.cron")

KIND = "cron-slot"
KEEP = 20  # records kept per job
PRUNE_EVERY = 10  # claims of a job between two prunings


def slot_key(job: CronJob, slot: datetime) -> str:
    """The ledger key of ``slot`` of ``job``."""
    return f"{job.key}/{slot.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


class ClusterSlots:
    """``corral_cron._scheduler.SlotLedger`` over the kernel's ledger (see the module)."""

    def __init__(self, kernel: KernelCalls) -> None:
        self.kernel = kernel
        self._claims: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def claim(self, job: CronJob, slot: datetime) -> str | None:
        """Claim the slot for the app; None if it is this host's, else the ledger's words
        naming the holder (another host's app). Other errors are raised."""
        try:
            await self.kernel.call("ledger.claim", {"owner": job.app, "claims": [{
                "kind": KIND, "key": slot_key(job, slot),
                "value": {"job": job.key, "slot": iso(slot), "fingerprint": job.fingerprint},
            }]})
        except CorralError as exc:
            if exc.code == ErrorCode.CONFLICT:
                return exc.reason
            raise
        count = self._claims[job.key] = self._claims.get(job.key, 0) + 1
        if count % PRUNE_EVERY == 0:
            task = asyncio.ensure_future(self._prune(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return None

    async def _records(self, job: CronJob) -> list[dict[str, Any]]:
        reply = await self.kernel.call("ledger.list", {"owner": job.app, "kind": KIND})
        return [r for r in reply.get("records", [])
                if str(r.get("key", "")).startswith(f"{job.key}/")]

    async def newest(self, job: CronJob) -> datetime | None:
        """The newest slot of ``job`` with its current schedule claimed for the app."""
        slots = [parse_iso(str(r["value"]["slot"])) for r in await self._records(job)
                 if (r.get("value") or {}).get("fingerprint") == job.fingerprint]
        return max(slots, default=None)

    async def _prune(self, job: CronJob) -> None:
        try:
            records = sorted(await self._records(job), key=lambda r: str(r["key"]))
            old = [r["key"] for r in records[:-KEEP]]
            if old:
                await self.kernel.call("ledger.release", {
                    "owner": job.app, "keys": [[KIND, k] for k in old]})
        except CorralError as exc:
            log.warning("old cron slot records not released", job=job.key, error=exc.reason)
