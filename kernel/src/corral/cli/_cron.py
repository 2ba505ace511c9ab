"""``corral cron ls|next|runs|run|show``: the cron driver's queries, printed for people."""

from __future__ import annotations

import argparse
import json
from typing import Any

from corral.client import KernelClient


def _query(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return KernelClient().call("driver.query", {"capability": "cron", "query": name,
                                                "args": args}, timeout=60)


def cmd_cron(ns: argparse.Namespace) -> int:
    """Scheduled jobs: list, preview, history, manual run, environment."""
    args: dict[str, Any] = {}
    if getattr(ns, "job", None):
        args["job"] = ns.job
    if ns.cron_command == "next":
        args["n"] = ns.n
        if ns.from_:
            args["from"] = ns.from_
    if ns.cron_command == "runs":
        args["limit"] = ns.limit
    res = _query(ns.cron_command, args)
    if ns.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    show = {"ls": _ls, "next": _next, "runs": _runs, "run": _run, "show": _show}
    show[ns.cron_command](res)
    return 0


def _ls(res: dict[str, Any]) -> None:
    print(f"{'JOB':28} {'SCHEDULE':16} {'ZONE':18} {'NEXT (zone)':27} {'NEXT (UTC)':22} LAST")
    for j in res.get("jobs", []):
        last = j.get("last") or {}
        result = last.get("state", "-")
        if last.get("exit_code") is not None:
            result += f" (exit {last['exit_code']})"
        print(f"{j['job']:28} {j['schedule']:16} {j['timezone']:18} "
              f"{j.get('next_local') or '-':27} {j.get('next_utc') or '-':22} {result}")
    sched = res.get("scheduler")
    if sched != "ok":
        print(f"scheduler: {sched}")


def _next(res: dict[str, Any]) -> None:
    print(f"{res['job']}: {res['schedule']} ({res['kind']}) in {res['timezone']}, "
          f"jitter {res['jitter']}")
    for r in res.get("runs", []):
        print(f"  {r['local']:27}  {r['utc']}")
    for w in res.get("warnings", []):
        print(f"warning: {w if isinstance(w, str) else json.dumps(w)}")


def _runs(res: dict[str, Any]) -> None:
    print(f"{'SLOT':22} {'STARTED':22} {'STATE':12} {'REASON':10} {'EXIT':5} NOTE")
    for r in res.get("runs", []):
        code = r.get("exit_code")
        sig = r.get("signal")
        ex = str(code) if code is not None else (f"sig{sig}" if sig else "-")
        print(f"{r.get('slot') or '-':22} {r.get('started_at') or '-':22} "
              f"{r.get('state', ''):12} {r.get('reason', ''):10} {ex:5} {r.get('note') or ''}")


def _run(res: dict[str, Any]) -> None:
    print(f"{res['job']}: manual run started: {json.dumps(res.get('run'))}")


def _show(res: dict[str, Any]) -> None:
    for k, v in res.items():
        print(f"{k:20} {v if isinstance(v, str) else json.dumps(v)}")


def add_parsers(sub: Any) -> None:
    """Register ``corral cron``."""
    p = sub.add_parser("cron", help=cmd_cron.__doc__)
    csub = p.add_subparsers(dest="cron_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("ls", help="every job, its next run in its zone and UTC, last result")
    s.add_argument("--json", action="store_true")
    s = csub.add_parser("next", help="the next runs of JOB, with DST and rule warnings")
    s.add_argument("job")
    s.add_argument("-n", type=int, default=10)
    s.add_argument("--from", dest="from_", metavar="TIME",
                   help="preview from this ISO 8601 time: with Z or an offset (+02:00) that "
                   "instant; without one, a wall-clock time in the job's zone (the zone "
                   "shown first)")
    s.add_argument("--json", action="store_true")
    s = csub.add_parser("runs", help="the run history of JOB")
    s.add_argument("job")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s = csub.add_parser("run", help="run JOB now (recorded as manual)")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")
    s = csub.add_parser("show", help="the environment and sandbox JOB runs in")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")
