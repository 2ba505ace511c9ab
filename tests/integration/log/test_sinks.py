"""Each sink against a real receiver started by the test; outages lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from corral_log.records import Chunk, Record
from corral_log.service import LogService
from corral_log.sinks import JournaldSink, LokiSink, SyslogSink, build_sink, parse_sinks
from corral_log.testing import JournalReceiver, LokiReceiver, SyslogReceiver

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>\S+) "
    rb"(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>\[corral@32473 [^\]]*\]) (?P<msg>.*)$",
    re.S,
)


def recs(n: int, stream: str = "stdout") -> Chunk:
    return Chunk.of(
        [
            Record("shop", "shop.web.1", stream, 1_700_000_000_000_001_000 + i, f'hello {i} "q"')
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("kind", ["udp", "tcp", "unix"])
def test_syslog_rfc5424(kind: str, tmp_path: Path) -> None:
    """Messages arrive as RFC 5424 (PRI from facility and stream, µs UTC time, app name,
    instance as PROCID, stream as MSGID, structured data), de-framed for TCP (RFC 6587)."""
    rx = SyslogReceiver(kind, str(tmp_path / "log.sock")).start()
    sink = SyslogSink("s", rx.address, facility="local3", hostname="h1")
    try:
        sink(recs(3))
        sink(recs(1, stream="stderr"))
        got = rx.wait_for(4)
    finally:
        sink.close()
        rx.stop()
    assert len(got) == 4
    matches = [RFC5424.match(g) for g in got]
    m = [x for x in matches if x is not None]
    assert len(m) == 4, got
    assert int(m[0]["pri"]) == 19 * 8 + 6 and int(m[3]["pri"]) == 19 * 8 + 3
    assert m[0]["ts"] == b"2023-11-14T22:13:20.000001Z"
    assert (m[0]["host"], m[0]["app"], m[0]["procid"], m[0]["msgid"]) == (
        b"h1",
        b"shop",
        b"shop.web.1",
        b"stdout",
    )
    assert m[0]["sd"] == b'[corral@32473 instance="shop.web.1" process="web"]'
    assert [x["msg"] for x in m[:3]] == [b'hello 0 "q"', b'hello 1 "q"', b'hello 2 "q"']


RFC3164 = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (?P<host>\S+) "
    rb"(?P<tag>[^\s\[\]:]{1,32})\[(?P<pid>[^\]\s]+)\]: (?P<msg>.*)$",
    re.S,
)


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_syslog_rfc3164_when_the_manifest_asks(kind: str, tmp_path: Path) -> None:
    """``format = "rfc3164"`` in a manifest's sink: a real receiver gets BSD syslog messages
    (``<PRI>Mmm dd hh:mm:ss host tag[pid]: msg``, day padded with a space, UTC), not 5424."""
    rx = SyslogReceiver(kind).start()
    (spec,) = parse_sinks([{"type": "syslog", "address": rx.address, "format": "rfc3164",
                            "facility": "local3", "hostname": "h1"}])
    sink = build_sink(spec)
    may_3 = 1_714_705_445_000_000_000  # 2024-05-03T03:04:05Z: a one-digit day
    try:
        sink(Chunk.of([Record("shop", "shop.web.1", "stdout", may_3 + i, f"hello {i}")
                       for i in range(3)]))
        sink(Chunk.of([Record("shop", "shop.web.1", "stderr", may_3, "it broke")]))
        got = rx.wait_for(4)
    finally:
        sink.close()
        rx.stop()
    assert len(got) == 4, got
    m = [RFC3164.match(g) for g in got]
    assert all(x is not None for x in m), got
    parsed = [x for x in m if x is not None]
    assert not any(g.startswith(b"<155>1 ") or b"corral@32473" in g for g in got)
    assert [int(x["pri"]) for x in parsed] == [19 * 8 + 6] * 3 + [19 * 8 + 3]
    assert parsed[0]["ts"] == b"May  3 03:04:05"
    assert time.strptime(parsed[0]["ts"].decode(), "%b %d %H:%M:%S")[1:6] == (5, 3, 3, 4, 5)
    assert {(x["host"], x["tag"], x["pid"]) for x in parsed} == {(b"h1", b"shop", b"shop.web.1")}
    assert [x["msg"] for x in parsed] == [b"hello 0", b"hello 1", b"hello 2", b"it broke"]


def test_journald_native_protocol(tmp_path: Path) -> None:
    """Entries reach a journal socket as native-protocol fields, multi-line values framed."""
    rx = JournalReceiver(str(tmp_path / "journal.sock"))
    rx.start()
    sink = JournaldSink("j", socket_path=rx.path or "")
    try:
        sink(Chunk.of([Record("shop", "shop.web.1", "stderr", 7, "line one\nline two")]))
        rx.wait_for(1)
    finally:
        sink.close()
        rx.stop()
    (e,) = rx.entries()
    assert e["MESSAGE"] == "line one\nline two"
    assert e["PRIORITY"] == "3" and e["SYSLOG_IDENTIFIER"] == "shop"
    assert e["CORRAL_INSTANCE"] == "shop.web.1" and e["CORRAL_PROCESS"] == "web"


def test_loki_push_format() -> None:
    """A chunk becomes one push: streams labelled app/process/instance/stream, values as
    [ns timestamp string, line] in order."""
    rx = LokiReceiver().start()
    sink = LokiSink("l", rx.url, labels={"host": "h1"})
    try:
        chunk = Chunk.of(
            [
                Record("shop", "shop.web.1", "stdout", 10, "a"),
                Record("shop", "shop.worker.1", "stderr", 11, "b"),
                Record("shop", "shop.web.1", "stdout", 12, "c"),
            ]
        )
        sink(chunk)
    finally:
        sink.close()
        rx.stop()
    (push,) = rx.pushes
    streams = {s["stream"]["instance"]: s for s in push["streams"]}
    assert streams["shop.web.1"]["stream"] == {
        "host": "h1",
        "app": "shop",
        "process": "web",
        "instance": "shop.web.1",
        "stream": "stdout",
    }
    assert streams["shop.web.1"]["values"] == [["10", "a"], ["12", "c"]]
    assert streams["shop.worker.1"]["values"] == [["11", "b"]]


# ---- through the whole service: FIFO -> spool -> sink ------------------------------------------

WRITER = "import sys\nfor i in range(int(sys.argv[1]), int(sys.argv[2])): print(f'n={i}')\n"


async def _write_lines(svc: LogService, app: str, iid: str, lo: int, hi: int) -> None:
    out, _ = svc.prepare(app, iid)
    fd = os.open(out, os.O_WRONLY)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(lo), str(hi)], stdout=fd)
    os.close(fd)
    while p.poll() is None:
        await asyncio.sleep(0.01)
    assert p.returncode == 0
    await asyncio.sleep(0.05)


def _numbers(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for ln in lines if (m := re.search(r"n=(\d+)$", ln))]


async def _until(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("kind", ["tcp", "unix", "http"])
def test_outage_and_recovery_lose_nothing(kind: str, tmp_path: Path) -> None:
    """Stop the receiver, write N lines, restart it: all N arrive, in order, and the outage
    shows in stats while it lasts."""

    async def main() -> None:
        if kind == "http":
            rx: Any = LokiReceiver().start()
            spec = {"type": "http", "url": rx.url, "linger": "50ms", "name": "s"}

            def got() -> list[str]:
                return [v for _, _, v in rx.lines()]
        else:
            rx = SyslogReceiver(kind, str(tmp_path / "log.sock")).start()
            spec = {"type": "syslog", "address": rx.address, "name": "s"}

            def got() -> list[str]:
                return [m.decode() for m in rx.messages]

        svc = LogService(tmp_path / "home", config={"metrics": False, "keepers": False})
        await svc.start()
        svc.attach("shop", {"logs": {"sinks": [spec]}})
        runner = svc.apps["shop"].runners["s"]
        await _write_lines(svc, "shop", "shop.web.1", 0, 100)
        await _until(lambda: _numbers(got()) == list(range(100)))
        rx.stop()
        n = 3000
        await _write_lines(svc, "shop", "shop.web.2", 100, 100 + n)
        await _until(lambda: not runner.stats.up)
        assert svc.stats()["apps"]["shop"]["sinks"]["s"]["spooled_bytes"] > 0
        rx.start()
        await _until(lambda: _numbers(got())[-1:] == [100 + n - 1], timeout=30)
        assert _numbers(got()) == list(range(100 + n))  # nothing lost, nothing reordered
        await _until(lambda: runner.stats.up and runner.spool.pending_bytes == 0)
        st = svc.stats()["apps"]["shop"]["sinks"]["s"]
        assert st["dropped_lines"] == 0 and st["spooled_bytes"] == 0
        notes = svc.read({"app": "shop", "instance": "corral-log"})["records"]
        assert any("down, spooling" in r["message"] for r in notes)
        await svc.close()
        rx.stop()

    asyncio.run(main())


def test_spool_full_drops_are_counted_and_announced(tmp_path: Path) -> None:
    """With the receiver down and a tiny spool, overflow is dropped, counted in stats,
    persisted, and written as a record into the app's log."""

    async def main() -> None:
        rx = LokiReceiver().start()
        rx.stop()
        svc = LogService(tmp_path / "home", config={"metrics": False, "keepers": False})
        await svc.start()
        svc.attach(
            "shop",
            {"logs": {"sinks": [{"type": "http", "url": rx.url, "spool": "4KiB", "name": "loki"}]}},
        )
        await _write_lines(svc, "shop", "shop.web.1", 0, 2000)
        st = svc.stats()
        dropped = st["apps"]["shop"]["sinks"]["loki"]["dropped_lines"]
        assert dropped > 0 and st["dropped_lines"] == dropped
        notes = svc.read({"app": "shop", "grep": "spool full"})["records"]
        assert notes and notes[0]["stream"] == "corral"
        # the default sink has every line regardless
        assert _numbers(
            [r["message"] for r in svc.read({"app": "shop", "limit": 5000})["records"]]
        ) == list(range(2000))
        await svc.close()
        saved = json.loads((tmp_path / "home/spool/shop/loki/stats.json").read_text())
        assert saved["dropped_lines"] == dropped

    asyncio.run(main())


def test_rejected_push_is_counted(tmp_path: Path) -> None:
    """A receiver answering 400 does not stall the sink: lines are counted as rejected."""

    async def main() -> None:
        rx = LokiReceiver(status=400).start()
        svc = LogService(tmp_path / "home", config={"metrics": False, "keepers": False})
        await svc.start()
        svc.attach("shop", {"logs": {"sinks": [{"type": "http", "url": rx.url, "name": "l"}]}})
        await _write_lines(svc, "shop", "shop.web.1", 0, 50)
        runner = svc.apps["shop"].runners["l"]
        await _until(lambda: runner.stats.rejected_lines >= 50)
        await svc.close()
        rx.stop()

    asyncio.run(main())


def test_journald_absent_is_skipped_with_a_notice(tmp_path: Path) -> None:
    """A journald sink on a host without the journal socket is skipped and says so."""

    async def main() -> None:
        svc = LogService(tmp_path / "home", config={"metrics": False})
        await svc.start()
        svc.attach(
            "shop", {"logs": {"sinks": [{"type": "journald", "socket": str(tmp_path / "none")}]}}
        )
        st = svc.stats()["apps"]["shop"]
        assert "journald-1" in st["skipped_sinks"] and st["sinks"] == {}
        assert svc.read({"app": "shop", "grep": "no journald"})["records"]
        await svc.close()

    asyncio.run(main())


def test_user_file_sink_from_manifest(tmp_path: Path) -> None:
    """A declared file sink (relative path, JSON format) receives every record."""

    async def main() -> None:
        svc = LogService(tmp_path / "home", config={"metrics": False, "keepers": False})
        await svc.start()
        svc.attach(
            "shop",
            {
                "logs": {
                    "sinks": [
                        {
                            "type": "file",
                            "path": "out/shop.jsonl",
                            "format": "json",
                            "rotate": "1MiB",
                        }
                    ]
                }
            },
            str(tmp_path),
        )
        await _write_lines(svc, "shop", "shop.web.1", 0, 300)
        runner = svc.apps["shop"].runners["file-1"]
        await _until(lambda: runner.stats.delivered_lines >= 300)
        rows = [json.loads(x) for x in (tmp_path / "out/shop.jsonl").read_text().splitlines()]
        assert _numbers([r["message"] for r in rows]) == list(range(300))
        assert rows[0]["app"] == "shop" and rows[0]["instance"] == "shop.web.1"
        await svc.close()

    asyncio.run(main())
