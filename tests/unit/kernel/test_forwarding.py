"""The host mail (``corral.forwarding``): two hosts' forwarders on one ledger (SQLite here; the
three-host e2e test runs them on etcd through real kernels)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from corral import forwarding
from corral.errors import CorralError, ErrorCode, NotFoundError, UnavailableError
from corral.forwarding import MAIL, REPLY, Forwarder
from corral.ledger import SqliteLedger

Calls = list[tuple[str, dict[str, Any], str]]


class Hosts:
    """h1 answers (its handler records each call), h2 asks."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.ledger = ledger
        self.calls: Calls = []
        self.leases = {h: ledger.grant_lease(60, f"host:{h}") for h in ("h1", "h2")}
        self.answer: Any = {"ok": True}
        self.h1 = Forwarder(ledger, "h1", lambda: self.leases["h1"], self.handle)
        self.h2 = Forwarder(ledger, "h2", lambda: self.leases["h2"], self.handle)

    async def handle(self, op: str, args: dict[str, Any], by: str) -> dict[str, Any]:
        self.calls.append((op, args, by))
        if isinstance(self.answer, BaseException):
            raise self.answer
        if callable(self.answer):
            return await self.answer()  # type: ignore[no-any-return]
        return dict(self.answer)


Body = Callable[[Hosts], Awaitable[None]]


def run(tmp_path: Path, body: Body) -> None:
    """Run ``body`` with h1 serving its mailbox (the suite has no async test runner)."""
    async def main() -> None:
        ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
        h = Hosts(ledger)
        serving = asyncio.ensure_future(h.h1.serve())
        try:
            await body(h)
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            ledger.close()

    asyncio.run(main())


def mail(h: Hosts) -> list[tuple[str, str]]:
    return [(r.kind, r.key) for r in h.ledger.list() if r.kind in (MAIL, REPLY)]


def test_a_request_runs_on_the_other_host_and_leaves_nothing(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        result = await hosts.h2.call("h1", "app.get", {"name": "shop"}, "root@h2")
        assert result == {"ok": True}
        assert hosts.calls == [("app.get", {"name": "shop"}, "root@h2")]
        assert mail(hosts) == []

    run(tmp_path, body)


def test_errors_come_back_with_their_code_and_the_answering_host(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        hosts.answer = NotFoundError("no app named 'shop' is deployed")
        with pytest.raises(CorralError) as err:
            await hosts.h2.call("h1", "app.down", {"name": "shop"}, "root@h2")
        assert err.value.code == NotFoundError.code
        assert err.value.reason == "no app named 'shop' is deployed (answered by host h1)"
        hosts.answer = RuntimeError("a bug")
        with pytest.raises(CorralError) as err:
            await hosts.h2.call("h1", "app.down", {"name": "shop"}, "root@h2")
        assert err.value.code == ErrorCode.INTERNAL and "RuntimeError: a bug" in err.value.reason
        assert mail(hosts) == []

    run(tmp_path, body)


def test_only_the_listed_operations_travel(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        with pytest.raises(CorralError) as err:
            await hosts.h2.call("h1", "app.config.set", {"name": "shop", "vars": {"A": "1"}},
                                "root@h2")
        assert err.value.code == ErrorCode.FORBIDDEN
        # one written by hand (a host of another version, or a forged one) is refused there
        hosts.ledger.put("host:h2", MAIL, "h1/forged", {
            "op": "keys.add", "args": {}, "by": "x", "from": "h2", "deadline": time.time() + 5},
            lease=hosts.leases["h2"])
        for _ in range(100):
            if hosts.ledger.get(REPLY, "h2/forged") is not None:
                break
            await asyncio.sleep(0.02)
        reply = hosts.ledger.get(REPLY, "h2/forged")
        assert reply is not None and reply.value["error"]["code"] == ErrorCode.FORBIDDEN
        assert hosts.calls == []

    run(tmp_path, body)


def test_no_answer_in_time_is_unavailable_and_withdrawn(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        with pytest.raises(UnavailableError,
                           match=r"host h3 did not answer app\.get within 0\.3 s"):
            await hosts.h2.call("h3", "app.get", {"name": "shop"}, "root@h2", timeout_s=0.3)
        assert mail(hosts) == []
        # an answer that comes after the asker gave up is never written
        release = asyncio.Event()

        async def slow() -> dict[str, Any]:
            await release.wait()
            return {"late": True}

        hosts.answer = slow
        with pytest.raises(UnavailableError):
            await hosts.h2.call("h1", "app.get", {"name": "shop"}, "root@h2", timeout_s=0.5)
        release.set()
        await asyncio.sleep(0.3)
        assert mail(hosts) == []

    run(tmp_path, body)


def test_a_request_past_its_deadline_is_dropped_unanswered(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        hosts.ledger.put("host:h2", MAIL, "h1/old", {
            "op": "app.get", "args": {"name": "shop"}, "by": "x", "from": "h2",
            "deadline": time.time() - 1}, lease=hosts.leases["h2"])
        for _ in range(100):
            if not mail(hosts):
                break
            await asyncio.sleep(0.02)
        assert mail(hosts) == [] and hosts.calls == []

    run(tmp_path, body)


def test_an_answer_too_large_for_the_ledger_is_an_error(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(hosts: Hosts) -> None:
        monkeypatch.setattr(forwarding, "MAX_ANSWER", 100)
        hosts.answer = {"lines": ["x" * 200]}
        with pytest.raises(CorralError, match="too large to send between hosts; run it on host h1"):
            await hosts.h2.call("h1", "driver.query", {"capability": "log", "query": "read",
                                                       "args": {"app": "shop"}}, "root@h2")

    run(tmp_path, body)


def test_a_dead_askers_request_goes_with_its_lease(tmp_path: Path) -> None:
    async def body(hosts: Hosts) -> None:
        release = asyncio.Event()

        async def slow() -> dict[str, Any]:
            await release.wait()
            return {}

        hosts.answer = slow
        asking = asyncio.ensure_future(
            hosts.h2.call("h1", "app.get", {"name": "shop"}, "root@h2", timeout_s=5))
        await asyncio.sleep(0.3)
        hosts.ledger.revoke(hosts.leases["h2"])  # h2 died: its lease is gone
        release.set()
        await asyncio.sleep(0.3)
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
        assert mail(hosts) == []

    run(tmp_path, body)

