"""``corral keys add|ls|rm|whoami`` (who may come in over SSH) and ``corral branch``.

``keys add NAME FILE --app A`` (repeatable) or ``--admin``: FILE is an OpenSSH public key
(``-``: read from stdin, as the remote CLI sends it). The first key made creates the SSH
account (``[ssh] user``, default ``corral``); git remotes then read ``corral@HOST:APP``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from corral.cli._output import print_json, table
from corral.client import KernelClient

EXIT_INPUT = 2
MAX_KEY_FILE = 16384


def _read_key(file: str) -> str:
    if file == "-":
        return sys.stdin.read(MAX_KEY_FILE + 1)[:MAX_KEY_FILE + 1]
    return Path(file).expanduser().read_text()[:MAX_KEY_FILE + 1]


def cmd_keys(ns: argparse.Namespace) -> int:
    """SSH keys allowed to push and to run corral commands remotely: add, ls, rm, whoami."""
    client = KernelClient()
    action = ns.keys_command or "ls"
    if action == "add":
        try:
            text = _read_key(ns.file)
        except OSError as exc:
            print(f"corral keys add: {ns.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_INPUT
        res = client.call("keys.add", {"name": ns.name, "key": text, "apps": ns.apps or [],
                                       "admin": ns.admin})
        if ns.json:
            print_json(res)
            return 0
        key = res["key"]
        scope = "admin" if key["admin"] else "apps " + ", ".join(key["apps"])
        print(f"{key['name']}: {key['fingerprint']} may push and act on {scope}")
        print(f"  git remote add prod {res['user']}@HOST:APP   (then: git push prod main)")
        print(f"  corral --remote {res['user']}@HOST ps")
        return 0
    if action == "rm":
        res = client.call("keys.remove", {"name": ns.name})
        print_json(res) if ns.json else print(f"{ns.name}: removed")
        return 0
    if action == "whoami":
        res = client.call("keys.whoami")
        print_json(res)
        return 0
    res = client.call("keys.list")
    if ns.json:
        print_json(res["keys"])
        return 0
    rows = [[k["name"], k["type"], k["fingerprint"],
             "admin" if k["admin"] else ",".join(k["apps"]),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(k["added"])), k["by"]]
            for k in res["keys"]]
    table(rows, ["NAME", "TYPE", "FINGERPRINT", "SCOPE", "ADDED", "BY"])
    return 0


def cmd_branch(ns: argparse.Namespace) -> int:
    """The branch whose `git push` deploys the app (default main); with BRANCH, set it."""
    args: dict[str, Any] = {"name": ns.app}
    if ns.branch:
        args["branch"] = ns.branch
    res = KernelClient().call("app.branch", args)
    print(f"{res['app']}: pushes to {res['branch']} deploy")
    return 0


def add_parsers(sub: Any) -> None:
    """Register keys and branch."""
    s = sub.add_parser("keys", help=cmd_keys.__doc__)
    s.add_argument("--json", action="store_true")
    k = s.add_subparsers(dest="keys_command", metavar="ACTION")
    a = k.add_parser("add", help="allow a public key in: --app APP (repeatable) or --admin")
    a.add_argument("name", help="the key's name (recorded on what it deploys)")
    a.add_argument("file", help="the public key file (e.g. ~/.ssh/id_ed25519.pub), - for stdin")
    a.add_argument("--app", dest="apps", action="append", metavar="APP",
                   help="an app the key may push to and act on (repeatable)")
    a.add_argument("--admin", action="store_true", help="every app, and admin commands")
    a.add_argument("--json", action="store_true")
    k.add_parser("ls", help="the keys and their scope").add_argument("--json",
                                                                       action="store_true")
    r = k.add_parser("rm", help="remove a key")
    r.add_argument("name")
    r.add_argument("--json", action="store_true")
    k.add_parser("whoami", help="the key this connection speaks for, and its scope")
    s = sub.add_parser("branch", help=cmd_branch.__doc__)
    s.add_argument("app")
    s.add_argument("branch", nargs="?")
