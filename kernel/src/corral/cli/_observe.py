"""``corral logs``, ``corral errors``, ``corral top``: views onto the log driver's queries."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from corral.client import KernelClient, events
from corral.errors import CorralError
from corral.units import UnitError, parse_since


def _query(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return KernelClient().call("driver.query", {"capability": "log", "query": name, "args": args})


def _line(rec: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(rec, sort_keys=True)
    stream = "!" if rec.get("stream") == "stderr" else " "
    return f"{rec.get('time', '')} {rec.get('instance', '')}{stream}| {rec.get('message', '')}"


def cmd_logs(ns: argparse.Namespace) -> int:
    """An app's output: the last lines, filtered; -f follows live."""
    if ns.follow:
        asyncio.run(_follow(ns))
    else:
        _history(ns, lambda args: _query("read", args))
    return 0


def since_arg(text: str) -> str:
    """``--since``: checked here with the log driver's own reading (``corral.units.parse_since``)
    so a typo fails before the kernel is asked; the text is passed on, "now" is the driver's."""
    try:
        parse_since(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def lines_arg(text: str) -> int:
    """``-n``: how many of the last lines, at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of lines >= 1")
    return n


def grep_arg(text: str) -> str:
    """``--grep``: a regular expression (Python's ``re``), checked before the kernel is asked."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not a regular expression: {exc}") from None
    return text


def _read_args(ns: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {"app": ns.app, "limit": ns.lines, "json": True, "cursor": ""}
    if ns.since:
        args["since"] = ns.since
    if ns.grep:
        args["grep"] = ns.grep
    if ns.instance:
        args["instance"] = ns.instance
    return args


def _history(ns: argparse.Namespace, read: Callable[[dict[str, Any]], dict[str, Any]]
             ) -> tuple[int, set[tuple[str, str]]]:
    """Print the stored records page by page (``query.log.read`` with a cursor: each reply
    stays under the bus's body limit and only one is held at a time); return the newest
    timestamp and what was printed at it."""
    newest, at_newest = 0, set[tuple[str, str]]()
    args = _read_args(ns)
    while True:
        res = read(args)
        if res.get("gap"):
            print("-- older files were removed by rotation while reading; records are missing "
                  "here", file=sys.stderr)
        for rec in res.get("records", []):
            print(_line(rec, ns.json))
            t = int(rec.get("time_ns", 0))
            if t > newest:
                newest, at_newest = t, set()
            if t == newest:
                at_newest.add((str(rec.get("instance")), str(rec.get("message"))))
        sys.stdout.flush()
        if not res.get("next"):
            return newest, at_newest
        args = {**args, "cursor": res["next"]}


async def _follow(ns: argparse.Namespace) -> None:
    pattern = re.compile(ns.grep) if ns.grep else None
    stream = events(f"log.{ns.app}")
    first = asyncio.ensure_future(anext(stream))  # subscribe before reading the history
    await asyncio.sleep(0.2)  # let the subscription reach the kernel's PUB socket
    client = KernelClient()
    loop = asyncio.get_running_loop()

    def read(args: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run_coroutine_threadsafe(client.acall("driver.query", {
            "capability": "log", "query": "read", "args": args}), loop).result()

    newest, at_newest = await asyncio.to_thread(_history, ns, read)

    def fresh(rec: dict[str, Any]) -> bool:
        t = int(rec.get("time_ns", 0))
        if t < newest:
            return False  # already printed from the history
        return not (t == newest and (str(rec.get("instance")), str(rec.get("message")))
                    in at_newest)

    event = await first
    while True:
        data = event.data
        if data.get("app") == ns.app:  # prefix subscriptions also match log.<app>suffix
            for rec in data.get("records", []):
                if not fresh(rec):
                    continue
                if ns.instance and ns.instance not in (rec.get("instance"), rec.get("process")):
                    continue
                if pattern and not pattern.search(str(rec.get("message", ""))):
                    continue
                print(_line(rec, ns.json), flush=True)
            if data.get("skipped"):
                print(f"-- {data['skipped']} records skipped by the live tail's rate cap "
                      "(all are in the files: corral logs without -f)", flush=True)
        event = await anext(stream)


def cmd_errors(ns: argparse.Namespace) -> int:
    """Tracebacks grouped by fingerprint: count, first and last seen, one sample."""
    res = _query("errors", {"app": ns.app, "limit": ns.limit})
    if ns.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    for g in res.get("groups", []):
        print(f"{g.get('count', 0):>6}x  {g.get('type', '?')}  ({g.get('language', '?')})  "
              f"first {g.get('first_seen', '?')}  last {g.get('last_seen', '?')}  "
              f"[{str(g.get('fingerprint', ''))[:12]}]")
        msg = g.get("message")
        if msg:
            print(f"        {msg}")
        if ns.sample and g.get("sample"):
            for line in str(g["sample"]).splitlines():
                print(f"        | {line}")
    return 0


def cmd_top(ns: argparse.Namespace) -> int:
    """Per-instance CPU, memory, files, threads, connections, and the lb's figures of the
    instances that are backends (requests, active, 5xx, p99); refreshed until Ctrl-C."""
    clear = not ns.once and sys.stdout.isatty()
    while True:
        rows = _top_rows(ns.app)
        if ns.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
            return 0
        if clear:  # a terminal only: piped to a file or `grep`, each refresh is appended
            print("\x1b[H\x1b[2J", end="")
        print(f"{'INSTANCE':32} {'CPU%':>6} {'RSS MiB':>8} {'FILES':>6} {'THREADS':>7} "
              f"{'CONNS':>6} {'PROCS':>6} {'REQS':>8} {'ACTIVE':>6} {'5XX':>5} {'P99 ms':>7}")
        for r in rows:
            lb = r.get("lb")
            lb_cols = (f"{lb['requests']:8} {lb['active']:6} {lb['errors_5xx']:5} "
                       f"{_ms(lb.get('p99_s')):>7}" if lb else f"{'-':>8} {'-':>6} {'-':>5} "
                                                           f"{'-':>7}")
            if "pid" in r:
                print(f"{r.get('instance', ''):32} {r.get('cpu_percent', 0):6.1f} "
                      f"{r.get('rss_bytes', 0) / 2**20:8.1f} {r.get('open_files', 0):6} "
                      f"{r.get('threads', 0):7} {r.get('connections', 0):6} "
                      f"{r.get('processes', 0):6} {lb_cols}")
            else:  # a backend the log driver does not sample
                print(f"{r.get('instance', ''):32} {'-':>6} {'-':>8} {'-':>6} {'-':>7} {'-':>6} "
                      f"{'-':>6} {lb_cols}")
        sys.stdout.flush()  # piped: each refresh arrives whole, when it is made
        if ns.once:
            return 0
        time.sleep(ns.interval)


def _ms(seconds: Any) -> str:
    if seconds is None:
        return "-"
    return "inf" if seconds == float("inf") else f"{seconds * 1000:.1f}"


def _top_rows(app: str | None) -> list[dict[str, Any]]:
    """The log driver's per-instance rows, each backend's lb figures under ``lb`` (rows of
    backends the log driver does not sample carry ``instance``, ``app`` and ``lb`` only).
    Without an lb driver the rows are the log driver's alone."""
    rows: list[dict[str, Any]] = list(
        _query("top", {"app": app} if app else {}).get("instances", []))
    try:
        metrics = KernelClient().call("driver.query", {"capability": "lb", "query": "metrics",
                                                       "args": {}})
    except CorralError:
        return rows
    by_id = {str(r.get("instance")): r for r in rows}
    for svc in metrics.get("services", []):
        if app and svc.get("app") != app:
            continue
        for b in svc.get("backends", []):
            lat = b.get("latency") or {}
            figures = {"name": svc.get("name"), "requests": int(b.get("requests", 0)),
                       "active": int(b.get("active", 0)),
                       "errors_5xx": int(b.get("errors_5xx", 0)),
                       "connect_failures": int(b.get("connect_failures", 0)),
                       "p50_s": lat.get("p50"), "p99_s": lat.get("p99")}
            row = by_id.get(str(b.get("id")))
            if row is None:
                row = {"instance": str(b.get("id")), "app": svc.get("app")}
                by_id[row["instance"]] = row
                rows.append(row)
            row["lb"] = figures
    return rows


def add_parsers(sub: Any) -> None:
    """Register logs, errors and top."""
    s = sub.add_parser("logs", help=cmd_logs.__doc__)
    s.add_argument("app")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("--since", type=since_arg,
                   help="a duration back from now (10m, 1h30m) or an ISO 8601 time; "
                        "see docs/manifest.md#sizes-and-durations")
    s.add_argument("--grep", type=grep_arg, help="regular expression on the message")
    s.add_argument("--instance", help="instance id or process type")
    s.add_argument("-n", "--lines", type=lines_arg, default=200, metavar="N",
                   help="the last N lines (default 200), in order; with -f, then live")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("errors", help=cmd_errors.__doc__)
    s.add_argument("app")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--sample", action="store_true", help="print one sample trace per group")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("top", help=cmd_top.__doc__)
    s.add_argument("app", nargs="?")
    s.add_argument("--interval", type=float, default=2.0)
    s.add_argument("--once", action="store_true")
    s.add_argument("--json", action="store_true")
