"""A driver counts as synced only once its current session's state.sync is answered; a late
answer to an earlier session (the driver reconnected meanwhile) changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from corral.host import HostConfig
from corral.ledger import open_ledger
from corral.supervisor import DriverSlot, Supervisor


def test_a_late_sync_of_an_old_session_does_not_unsync_the_new_one(tmp_path: Path) -> None:
    gates: dict[int, asyncio.Event] = {}

    async def on_ready(slot: DriverSlot) -> None:
        await gates[id(slot.peer)].wait()  # state.sync of the session connected last

    sup = Supervisor(HostConfig(), open_ledger("sqlite:", tmp_path), env={},
                     log_dir=tmp_path / "drivers", on_ready=on_ready)
    slot = DriverSlot("log", "log", ["x"])
    sup.slots["log"] = slot
    old: Any = SimpleNamespace(identity=b"old")
    new: Any = SimpleNamespace(identity=b"new")

    async def main() -> None:
        gates[id(old)] = asyncio.Event()
        gates[id(new)] = asyncio.Event()
        first = asyncio.ensure_future(sup.connected(slot, old))
        await asyncio.sleep(0)
        assert not slot.synced
        second = asyncio.ensure_future(sup.connected(slot, new))  # it reconnected
        await asyncio.sleep(0)
        gates[id(new)].set()
        await second
        assert slot.synced and slot.peer is new
        gates[id(old)].set()  # the old session's sync ends (times out) only now
        await first
        assert slot.synced, "a late end of the old session's sync unsynced the new one"

    asyncio.run(main())
