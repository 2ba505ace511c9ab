"""``corral certs [APP] [--json]``: the HTTPS certificates of the apps' domains.

Asked of the lb driver (``query.lb.certs``): each certificate, the domains it covers, its
issuer, when it expires, and its state: valid, pending (being ordered: the domain is served
over HTTP meanwhile) or failing (with the last error and when it is tried again).
"""

from __future__ import annotations

import argparse
from typing import Any

from corral.cli._output import print_json, table
from corral.client import KernelClient


def certificates(app: str | None = None) -> list[dict[str, Any]]:
    """The certificates the lb driver holds (of one app, or all)."""
    args = {"app": app} if app else {}
    res = KernelClient().call("driver.query", {"capability": "lb", "query": "certs",
                                               "args": args})
    return list(res.get("certs") or [])


def cmd_certs(ns: argparse.Namespace) -> int:
    """HTTPS certificates: domains, issuer, expiry, state (valid / pending / failing)."""
    certs = certificates(ns.app)
    if ns.json:
        print_json(certs)
        return 0
    if not certs:
        print("no certificates" + (f" for {ns.app}" if ns.app else "")
              + " (an app gets one with [lb] domains and tls)")
        return 0
    rows = []
    for c in certs:
        state = str(c.get("state") or "-")
        if c.get("last_error") and state != "valid":
            state += f": {c['last_error']}"
        rows.append([str(c.get("app") or "-"), ", ".join(c.get("domains") or []),
                     str(c.get("issuer") or "-"), str(c.get("not_after") or "-"), state])
    table(rows, ["APP", "DOMAINS", "ISSUER", "EXPIRES", "STATE"])
    return 0


def add_parsers(sub: Any) -> None:
    """``certs``."""
    s = sub.add_parser("certs", help=cmd_certs.__doc__)
    s.add_argument("app", nargs="?", help="one app's certificates")
    s.add_argument("--json", action="store_true")
