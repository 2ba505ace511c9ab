"""History of any size through ``query.log.read``: pages under the bus limit, in order."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError
from corral.protocol import MAX_BODY, Reply, encode
from corral_log.reading import read_logs
from corral_log.records import encode_lines
from corral_log.service import LogService
from corral_log.sinks import RotatingFile

# 20,000 numbered lines of 200 bytes: 4 MB of JSON records, four times one CDP/1 body
WRITER = """
import sys
out = sys.stdout.buffer
for i in range(20000):
    out.write(b"line %06d " % i + b"x" * 189 + b"\\n")
out.flush()
"""


def _reply_size(result: dict[str, Any]) -> int:
    """The bytes of the REPLY body that carries ``result`` on the bus."""
    return len(encode(Reply(id=2**31, result=result))[2])


def _pages(read: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    pages = [read({**args, "cursor": ""})]
    while pages[-1].get("next"):
        pages.append(read({**args, "cursor": pages[-1]["next"]}))
        assert len(pages) < 1000, "the cursor does not advance"
    return pages


def test_twenty_thousand_lines_read_page_by_page(tmp_path: Path) -> None:
    """An app writes 20,000 lines through its FIFO; a paged read of the last 100,000 returns
    all 20,000 in order, in several replies that each fit in one CDP/1 body; the last N
    (``-n N``) are the newest N in order; the unpaged read still answers one reply, the
    newest that fit, saying how many were left out."""

    async def main() -> None:
        svc = LogService(tmp_path / "home", config={"metrics": False})
        await svc.start()
        out, _err = svc.prepare("big", "big.web.1")
        fo = os.open(out, os.O_WRONLY)
        p = subprocess.Popen([sys.executable, "-c", WRITER], stdout=fo)
        os.close(fo)
        while p.poll() is None:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        svc.stopped("big", "big.web.1")

        pages = _pages(svc.read, {"app": "big", "limit": 100_000})
        assert len(pages) >= 4
        assert all(_reply_size(pg) < MAX_BODY for pg in pages)
        nums = [int(r["message"].split()[1]) for pg in pages for r in pg["records"]]
        assert nums == list(range(20_000))

        last = _pages(svc.read, {"app": "big", "limit": 7_500})
        assert [int(r["message"].split()[1]) for pg in last for r in pg["records"]] == list(
            range(12_500, 20_000))
        raw = _pages(svc.read, {"app": "big", "limit": 100_000, "json": False,
                                "grep": r"^line \d*7 "})
        assert [int(ln.split()[4]) for pg in raw for ln in pg["lines"]] == list(
            range(7, 20_000, 10))

        one = svc.read({"app": "big", "limit": 100_000})
        assert "next" not in one and _reply_size(one) < MAX_BODY
        kept = [int(r["message"].split()[1]) for r in one["records"]]
        assert kept == list(range(20_000 - len(kept), 20_000))
        assert one["truncated"] == 20_000 - len(kept) > 0
        await svc.close()

    asyncio.run(main())


def test_a_cursor_survives_rotation_between_pages(tmp_path: Path) -> None:
    """The current file is rotated and compressed while a client pages through it: the next
    page goes on where the last one ended (a file is known by its first line, offsets are
    those of the uncompressed text), so nothing is skipped or repeated; lines written after
    the first page are not part of this read."""
    rf = RotatingFile(tmp_path / "logs" / "a" / "app.log", max_bytes=None, keep=10,
                      compress=True)
    t0 = 1_700_000_000_000_000_000

    def write(start: int, n: int) -> None:
        for i in range(start, start + n):
            rf.write(encode_lines("a.web.1", "stdout", t0 + i, [b"line %06d" % i],
                                  frozenset()))

    write(0, 3000)
    rf.rotate()
    write(3000, 3000)  # two files: a rotated .gz and the current one
    rf.wait_idle()
    args: dict[str, Any] = {"limit": 100_000, "budget": 40_000}
    pages = [read_logs(tmp_path, "a", cursor="", **args)]
    rotated = False
    while pages[-1].get("next"):
        last = int(pages[-1]["records"][-1]["message"].split()[1])
        if last > 3100 and not rotated:  # in the middle of the current file: rotate it away
            rotated = True
            rf.rotate()
            write(6000, 500)
            rf.wait_idle()
            assert not any(p.suffix != ".gz" for p in rf.rotated())
        pages.append(read_logs(tmp_path, "a", cursor=pages[-1]["next"], **args))
    nums = [int(r["message"].split()[1]) for pg in pages for r in pg["records"]]
    assert rotated and len(rf.rotated()) == 2
    assert nums == list(range(6000))  # the selection is made by the first page
    assert not any(pg.get("gap") for pg in pages)
    assert all(gzip.decompress(p.read_bytes()) for p in rf.rotated())
    rf.close()


def test_bad_cursor_grep_and_limit_are_invalid(tmp_path: Path) -> None:
    """A cursor that is not one of ours, a grep that is not a regex and a limit below 1 are
    refused as bad input (INVALID, exit 2 in the CLI), not as a driver failure."""
    for kw in ({"cursor": "not-a-cursor"}, {"grep": "("}, {"limit": 0}):
        with pytest.raises(CorralError) as exc:
            read_logs(tmp_path, "a", **kw)  # type: ignore[arg-type]
        assert exc.value.code.name == "INVALID", kw
