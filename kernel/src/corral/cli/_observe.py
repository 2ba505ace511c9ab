"""``corral logs``, ``corral errors``, ``corral top``: views onto the log driver's queries.

On hosts sharing a ledger, an app spread over several hosts (``[placement] spread``) has
its instances' logs, errors and figures on each of them: each view asks every host that runs
the app (its home and the hosts of its shares, ``app.get``'s ``hosts``) and merges the
answers (``merge_records``, ``merge_error_groups``); ``--host`` asks one host only. An app
on one host is asked as before (the kernel routes the query to the app's host)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from corral.client import KernelClient, events
from corral.errors import CorralError
from corral.units import UnitError, parse_since

T = TypeVar("T")
FOLLOW_POLL_S = 1.0
"""How often ``logs -f`` of an app on several hosts asks each host for what is new."""


def _query(name: str, args: dict[str, Any], host: str | None = None,
           capability: str = "log") -> dict[str, Any]:
    body: dict[str, Any] = {"capability": capability, "query": name, "args": args}
    if host is not None:
        body["host"] = host
    return KernelClient().call("driver.query", body)


def hosts_of(app: str | None, only: str | None = None) -> list[str | None]:
    """The hosts to ask about ``app``: ``only`` (``--host``); else, when the app runs on
    more than one, each of them (``app.get``: its home first); else ``[None]``: the kernel
    picks (this host when the app runs here, else the app's home)."""
    if only:
        return [only]
    if not app:
        return [None]
    try:
        hosts = [str(h) for h in KernelClient().call("app.get", {"name": app}).get("hosts") or []]
    except CorralError:
        return [None]  # no such app (the query says so), or an older kernel
    return [*hosts] if len(hosts) > 1 else [None]


def _each(hosts: list[str], ask: Callable[[str], T]) -> dict[str, T]:
    """``ask(host)`` for each host; a host that does not answer (lost, no such driver) is
    said on stderr and left out, so that the others' answers are still shown."""
    out: dict[str, T] = {}
    for host in hosts:
        try:
            out[host] = ask(host)
        except CorralError as exc:
            print(f"-- host {host} did not answer: {exc.reason}", file=sys.stderr)
    return out


def _line(rec: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(rec, sort_keys=True)
    stream = "!" if rec.get("stream") == "stderr" else " "
    where = f"{rec.get('instance', '')}@{rec['host']}" if rec.get("host") else \
        rec.get("instance", "")
    return f"{rec.get('time', '')} {where}{stream}| {rec.get('message', '')}"


def merge_records(by_host: dict[str, list[dict[str, Any]]], last: int) -> list[dict[str, Any]]:
    """The records several hosts answered, each marked with its ``host``, in time order
    (``time_ns``; a tie in the order of the hosts), the ``last`` newest of them."""
    merged = [{**rec, "host": host} for host, recs in by_host.items() for rec in recs]
    merged.sort(key=lambda r: int(r.get("time_ns", 0)))  # stable: ties keep host order
    return merged[-last:] if last > 0 else []


def merge_error_groups(by_host: dict[str, list[dict[str, Any]]], limit: int
                       ) -> list[dict[str, Any]]:
    """Error groups several hosts answered, one per fingerprint: counts added, the earliest
    first seen, the latest last seen (its sample and message), and the ``hosts`` where it
    was seen; the most frequent first (then the latest), ``limit`` of them."""
    groups: dict[str, dict[str, Any]] = {}
    for host, found in by_host.items():
        for g in found:
            fp = str(g.get("fingerprint", ""))
            have = groups.get(fp)
            if have is None:
                groups[fp] = {**g, "hosts": [host]}
                continue
            have["count"] = int(have.get("count", 0)) + int(g.get("count", 0))
            have["hosts"].append(host)
            if str(g.get("first_seen", "")) < str(have.get("first_seen", "")):
                have["first_seen"] = g.get("first_seen")
            if str(g.get("last_seen", "")) > str(have.get("last_seen", "")):
                have.update({k: g[k] for k in ("last_seen", "sample", "message") if k in g})
    ordered = sorted(groups.values(), key=lambda g: str(g.get("last_seen", "")), reverse=True)
    ordered.sort(key=lambda g: int(g.get("count", 0)), reverse=True)
    return ordered[:limit]


def cmd_logs(ns: argparse.Namespace) -> int:
    """An app's output: the last lines, filtered; -f follows live."""
    hosts = hosts_of(ns.app, ns.host)
    if hosts != [None]:
        _hosts_logs(ns, [str(h) for h in hosts])
    elif ns.follow:
        asyncio.run(_follow(ns))
    else:
        _history(ns, lambda args: _query("read", args))
    return 0


def _read_all(args: dict[str, Any], host: str) -> list[dict[str, Any]]:
    """Every page of one host's ``query.log.read`` answer to ``args``."""
    out: list[dict[str, Any]] = []
    while True:
        res = _query("read", args, host)
        if res.get("gap"):
            print(f"-- host {host}: older files were removed by rotation while reading; "
                  "records are missing here", file=sys.stderr)
        out.extend(res.get("records", []))
        if not res.get("next"):
            return out
        args = {**args, "cursor": res["next"]}


def _hosts_logs(ns: argparse.Namespace, hosts: list[str]) -> None:
    """``logs`` of an app on several hosts: the last lines of all of them, merged in time
    order; with -f, each host asked every ``FOLLOW_POLL_S`` for what came since the newest
    record it gave (each host's own clock: one host's late record is never dropped because
    another's was newer)."""
    args = _read_args(ns)
    answered = _each(hosts, lambda h: _read_all(args, h))
    for rec in merge_records(answered, ns.lines):
        print(_line(rec, ns.json))
    sys.stdout.flush()
    if not ns.follow:
        return
    tails = {h: _Tail(answered.get(h, [])) for h in hosts}
    while True:
        time.sleep(FOLLOW_POLL_S)
        fresh = _each(hosts, lambda h: tails[h].fresh(_read_all(tails[h].since(args), h)))
        for rec in merge_records(fresh, 100_000):
            print(_line(rec, ns.json), flush=True)


class _Tail:
    """What ``logs -f`` printed of one host: its newest record's time and the records at
    that time (asked again from a millisecond before it, so none is missed or repeated)."""

    def __init__(self, shown: list[dict[str, Any]]) -> None:
        self.newest = max((int(r.get("time_ns", 0)) for r in shown), default=time.time_ns())
        self.at_newest = {_ident(r) for r in shown if int(r.get("time_ns", 0)) == self.newest}

    def since(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**args, "since": self.newest / 1e9 - 0.001, "limit": 100_000, "cursor": ""}

    def fresh(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rec in sorted(records, key=lambda r: int(r.get("time_ns", 0))):
            t = int(rec.get("time_ns", 0))
            if t < self.newest or (t == self.newest and _ident(rec) in self.at_newest):
                continue
            if t > self.newest:
                self.newest, self.at_newest = t, set()
            self.at_newest.add(_ident(rec))
            out.append(rec)
        return out


def _ident(rec: dict[str, Any]) -> tuple[str, str, str]:
    return (str(rec.get("time_ns")), str(rec.get("instance")), str(rec.get("message")))


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
    hosts = hosts_of(ns.app, ns.host)
    if hosts == [None]:
        res = _query("errors", {"app": ns.app, "limit": ns.limit})
    else:
        res = {"groups": merge_error_groups(_each(
            [str(h) for h in hosts],
            lambda h: list(_query("errors", {"app": ns.app, "limit": ns.limit}, h)
                           .get("groups", []))), ns.limit)}
    if ns.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    for g in res.get("groups", []):
        on = f"  on {','.join(g['hosts'])}" if g.get("hosts") else ""
        print(f"{g.get('count', 0):>6}x  {g.get('type', '?')}  ({g.get('language', '?')})  "
              f"first {g.get('first_seen', '?')}  last {g.get('last_seen', '?')}  "
              f"[{str(g.get('fingerprint', ''))[:12]}]{on}")
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
    hosts = hosts_of(ns.app, ns.host)
    while True:
        rows = _top_rows(ns.app) if hosts == [None] else [
            row for found in _each([str(h) for h in hosts],
                                   lambda h: _top_rows(ns.app, h)).values() for row in found]
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
            where = f"{r.get('instance', '')}@{r['host']}" if r.get("host") else \
                r.get("instance", "")
            if "pid" in r:
                print(f"{where:32} {r.get('cpu_percent', 0):6.1f} "
                      f"{r.get('rss_bytes', 0) / 2**20:8.1f} {r.get('open_files', 0):6} "
                      f"{r.get('threads', 0):7} {r.get('connections', 0):6} "
                      f"{r.get('processes', 0):6} {lb_cols}")
            else:  # a backend the log driver does not sample
                print(f"{where:32} {'-':>6} {'-':>8} {'-':>6} {'-':>7} {'-':>6} "
                      f"{'-':>6} {lb_cols}")
        sys.stdout.flush()  # piped: each refresh arrives whole, when it is made
        if ns.once:
            return 0
        time.sleep(ns.interval)


def _ms(seconds: Any) -> str:
    if seconds is None:
        return "-"
    return "inf" if seconds == float("inf") else f"{seconds * 1000:.1f}"


def _top_rows(app: str | None, host: str | None = None) -> list[dict[str, Any]]:
    """The log driver's per-instance rows, each backend's lb figures under ``lb`` (rows of
    backends the log driver does not sample carry ``instance``, ``app`` and ``lb`` only).
    Without an lb driver the rows are the log driver's alone. Asked of ``host``: that
    host's rows, each marked with it, and its lb's figures of its own instances only (the
    backends it balances over on other hosts are theirs to show)."""
    rows: list[dict[str, Any]] = [
        {**r, "host": host} if host else r
        for r in _query("top", {"app": app} if app else {}, host).get("instances", [])]
    try:
        metrics = _query("metrics", {}, host, capability="lb")
    except CorralError:
        return rows
    by_id = {str(r.get("instance")): r for r in rows}
    for svc in metrics.get("services", []):
        if app and svc.get("app") != app:
            continue
        for b in svc.get("backends", []):
            if host and "@" in str(b.get("id")):
                continue  # another host's instance (the routing mesh)
            lat = b.get("latency") or {}
            figures = {"name": svc.get("name"), "requests": int(b.get("requests", 0)),
                       "active": int(b.get("active", 0)),
                       "errors_5xx": int(b.get("errors_5xx", 0)),
                       "connect_failures": int(b.get("connect_failures", 0)),
                       "p50_s": lat.get("p50"), "p99_s": lat.get("p99")}
            row = by_id.get(str(b.get("id")))
            if row is None:
                row = {"instance": str(b.get("id")), "app": svc.get("app"),
                       **({"host": host} if host else {})}
                by_id[row["instance"]] = row
                rows.append(row)
            row["lb"] = figures
    return rows


HOST_HELP = ("hosts sharing a ledger: ask this host only (default: every host the app "
             "runs on)")


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
    s.add_argument("--host", help=HOST_HELP)
    s = sub.add_parser("errors", help=cmd_errors.__doc__)
    s.add_argument("app")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--sample", action="store_true", help="print one sample trace per group")
    s.add_argument("--json", action="store_true")
    s.add_argument("--host", help=HOST_HELP)
    s = sub.add_parser("top", help=cmd_top.__doc__)
    s.add_argument("app", nargs="?")
    s.add_argument("--interval", type=float, default=2.0)
    s.add_argument("--once", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--host", help=HOST_HELP)
