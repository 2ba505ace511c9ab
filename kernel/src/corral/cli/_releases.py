"""``corral releases``, ``rollback``, ``config`` and ``run APP -- CMD``: the Heroku lifecycle.

Names follow Heroku's, which most users know: ``releases``, ``rollback``, ``config`` /
``config set`` / ``config unset`` and ``run`` for a one-off command in a deployed app (Heroku's
``heroku run``, Dokku's ``dokku run``). The dev loop that ran an app directory in the
foreground is ``corral dev`` (``corral run DIR`` says so).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from corral.cli import _rollout
from corral.cli._output import print_json, table
from corral.client import KernelClient

EXIT_INPUT = 2
_ENV_NAME = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"


def _rolled(ns: argparse.Namespace, res: dict[str, Any], verb: str) -> int:
    if ns.json:
        print_json(res)
        return 0
    if res.get("release") is None:
        print(f"{res['app']}: {res.get('note', 'done')}")
        return 0
    print(f"{res['app']}: v{res['release']} is live ({verb} in {res['seconds']:.2f}s)")
    return 0


def cmd_releases(ns: argparse.Namespace) -> int:
    """The app's releases, newest first: number, when, by whom, source, what changed."""
    res = KernelClient().call("app.releases", {"name": ns.app})
    if ns.json:
        print_json(res)
        return 0
    rows = []
    for r in reversed(res["releases"]):
        status = "live" if r["live"] else str(r["status"])
        if r.get("failure"):
            status += f" ({r['failure']})"
        rows.append([f"v{r['release']}", status, str(r.get("created") or "-"),
                     str(r.get("by") or "-"), str(r.get("source") or "-"),
                     ", ".join(r.get("changes") or []) or "-"])
    if not rows:
        print(f"{ns.app}: no release yet")
        return 0
    table(rows, ["RELEASE", "STATUS", "CREATED", "BY", "SOURCE", "CHANGES"])
    return 0


def cmd_rollback(ns: argparse.Namespace) -> int:
    """Roll the app back to an earlier release (default: the one before the live one):
    its code, build and config, rolled like a deploy, with no rebuild."""
    args: dict[str, Any] = {"name": ns.app, "wait_s": ns.wait}
    if ns.release is not None:
        text = ns.release.lower().removeprefix("v")
        if not text.isdigit() or int(text) < 1:
            print(f"corral rollback: {ns.release!r}: expected a release such as v3",
                  file=sys.stderr)
            return EXIT_INPUT
        args["release"] = int(text)
    res = _rollout.run(ns, ns.app, "app.rollback", args)
    return _rolled(ns, res, f"rolled back from v{res.get('rolled_back_from')}")


def _parse_assignments(items: list[str], secret: bool) -> dict[str, str] | None:
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or key[0].isdigit() or any(c not in _ENV_NAME for c in key):
            print(f"corral config set: {key or item!r} is not a valid environment variable "
                  "name (letters, digits and '_', not starting with a digit)", file=sys.stderr)
            return None
        if not sep:
            if not secret:
                print(f"corral config set: {item!r}: expected KEY=VALUE (or KEY alone with "
                      "--secret, to read the value from the terminal or stdin)",
                      file=sys.stderr)
                return None
            value = (getpass.getpass(f"{key}: ") if sys.stdin.isatty()
                     else sys.stdin.readline().rstrip("\n"))
        values[key] = value
    return values


def cmd_config(ns: argparse.Namespace) -> int:
    """Config vars: `config APP`, `config set APP K=V... [--secret]`, `config unset APP K...`."""
    words = list(ns.words)
    verb = "get"
    if words and words[0] in ("get", "set", "unset"):
        verb = words.pop(0)
    if not words:
        print(f"corral config {verb}: name the app", file=sys.stderr)
        return EXIT_INPUT
    app, rest = words[0], words[1:]
    client = KernelClient()
    if verb == "get":
        if rest:
            print("corral config: `corral config APP` lists; use `config set` / `config unset`"
                  " to change", file=sys.stderr)
            return EXIT_INPUT
        res = client.call("app.config", {"name": app})
        if ns.json:
            print_json(res)
        elif not res["config"]:
            print(f"{app}: no config vars")
        else:
            width = max(map(len, res["config"]))
            for key, value in res["config"].items():
                print(f"{key.ljust(width)}  {value}")
        return 0
    if not rest:
        print(f"corral config {verb}: name at least one {'KEY=VALUE' if verb == 'set' else 'KEY'}",
              file=sys.stderr)
        return EXIT_INPUT
    if verb == "set":
        values = _parse_assignments(rest, ns.secret)
        if values is None:
            return EXIT_INPUT
        res = _rollout.run(ns, app, "app.config.set", {
            "name": app, "vars": values, "secret": ns.secret, "wait_s": ns.wait})
        return _rolled(ns, res, f"{'secret' if ns.secret else 'config'} set")
    bad = [k for k in rest if "=" in k]
    if bad:
        print(f"corral config unset: {bad[0]!r}: name keys only (no '=')", file=sys.stderr)
        return EXIT_INPUT
    res = _rollout.run(ns, app, "app.config.unset", {"name": app, "keys": rest,
                                                     "wait_s": ns.wait})
    return _rolled(ns, res, "config unset")


def cmd_run(ns: argparse.Namespace) -> int:
    """Run a one-off command in a deployed app's release, sandbox and config (`corral run APP
    -- CMD...`), with a terminal when there is one; exits with the command's status."""
    command = list(ns.argv)
    if "--" in command:  # options may also come between APP and `--` (corral run APP -e K=V --)
        cut = command.index("--")
        extra = _run_options().parse_args(command[:cut])
        ns.env = [*(ns.env or []), *(extra.env or [])]
        ns.timeout = extra.timeout or ns.timeout
        command = command[cut + 1:]
    if not command:
        if Path(ns.app).is_dir() or ns.app in (".", ".."):
            print(f"corral run: running an app directory in the foreground is now "
                  f"`corral dev {shlex.quote(ns.app)}`; `corral run APP -- CMD` runs a one-off "
                  "command in a deployed app", file=sys.stderr)
        else:
            print("corral run: name the command: corral run APP -- CMD [ARG...]",
                  file=sys.stderr)
        return EXIT_INPUT
    from corral.cli._terminal import attach_stdio

    env: dict[str, str] = {}
    for item in ns.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"corral run: --env {item!r}: expected KEY=VALUE", file=sys.stderr)
            return EXIT_INPUT
        env[key] = value
    with attach_stdio() as (paths, tty):
        args: dict[str, Any] = {"name": ns.app, "command": command, "stdio": paths, "tty": tty,
                                "env": env}
        term = os.environ.get("TERM")
        if tty and term:
            args["term"] = term
        if ns.timeout:
            args["timeout_s"] = ns.timeout
        res = KernelClient().call("app.run", args, timeout=_rollout.NO_CLIENT_DEADLINE_S)
    if res.get("timed_out"):
        print(f"corral run: {ns.app}: the command ran out of time and was stopped",
              file=sys.stderr)
        return 124
    if res.get("signal") is not None:
        return 128 + int(res["signal"])
    return int(res.get("exit_code") or 0)


def _run_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--env", "-e", action="append", metavar="KEY=VALUE",
                   help="an extra variable for this run only")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the command after this long")


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral run APP", add_help=False)
    _run_flags(p)
    return p


def add_parsers(sub: Any) -> None:
    """``releases``, ``rollback``, ``config``, ``run``."""
    s = sub.add_parser("releases", help=cmd_releases.__doc__)
    s.add_argument("app")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("rollback", help=cmd_rollback.__doc__)
    s.add_argument("app")
    s.add_argument("release", nargs="?", help="vN (default: the release before the live one)")
    _rollout.add_flags(s)
    s = sub.add_parser("config", help=cmd_config.__doc__)
    s.add_argument("words", nargs="+", metavar="[set|unset] APP [KEY[=VALUE]...]")
    s.add_argument("--secret", action="store_true",
                   help="set: the values are secrets (stored root-only, never shown again)")
    _rollout.add_flags(s)
    s = sub.add_parser("run", help=cmd_run.__doc__)
    s.add_argument("app")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    _run_flags(s)
