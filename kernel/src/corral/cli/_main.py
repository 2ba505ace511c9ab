"""``corral``: check, schema, run, up, down, ps, ledger, drivers, daemon, and driver queries.

Exit codes: 0 success; 1 the operation failed; 2 bad input (manifest, flags); 3 the kernel is
not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from corral import __version__
from corral.cli import (
    _certs,
    _completion,
    _cron,
    _host,
    _init,
    _keys,
    _observe,
    _releases,
    _remote,
    _rollout,
)
from corral.cli._output import print_json, table
from corral.errors import CorralError, ErrorCode, ManifestError

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_UNAVAILABLE = 3


def _manifest_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", nargs="?", default=".", help="app directory (holds corral.toml)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="override a manifest value, e.g. ports.http=9000 (repeatable)")
    p.add_argument("--offset", type=int, default=0, metavar="N",
                   help="add N to every port (run copies side by side)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the app (repeatable)")


def _client() -> Any:
    from corral.client import KernelClient

    return KernelClient()


# ---- commands ----------------------------------------------------------------------------------


def _kernel_running() -> bool:
    """Whether a kernel answers on this host (its bus socket exists)."""
    from corral.host import bus_endpoint

    endpoint = os.environ.get("CORRAL_BUS") or bus_endpoint()
    return not endpoint.startswith("ipc://") or os.path.exists(endpoint.removeprefix("ipc://"))


def cmd_check(ns: argparse.Namespace) -> int:
    """Validate corral.toml (and a Procfile), every section by the driver that owns it, and
    print the resolved manifest (--json: it, or the problems, as JSON)."""
    from corral import manifest

    directory = Path(ns.directory).resolve()
    res: dict[str, Any] | None = None
    if _kernel_running():  # the running drivers check their sections (manifest.check)
        try:
            res = _client().call("app.check", {"directory": str(directory), "set": ns.set_,
                                               "offset": ns.offset, "env": ns.env}, timeout=60)
        except CorralError as exc:
            # a socket left by a kernel that is gone: check as when none runs
            if exc.code != ErrorCode.UNAVAILABLE or "driver" in exc.details:
                raise
    if res is not None:
        problems = list(res.get("problems") or [])
        resolved_json = res.get("manifest")
    else:  # the installed drivers' section modules, in this process
        try:
            resolved_json = manifest.load(directory, set_=ns.set_, offset=ns.offset,
                                          env=ns.env).as_json()
            problems = []
        except ManifestError as exc:
            problems = exc.problems
    if problems:
        if ns.json:
            print_json({"problems": problems})
        else:
            for problem in problems:
                print(f"corral: {problem}", file=sys.stderr)
        return EXIT_INPUT
    print_json(resolved_json)
    return 0


def cmd_schema(ns: argparse.Namespace) -> int:
    """Print the manifest's JSON Schema."""
    from corral import manifest

    print_json(manifest.schema())
    return 0


def cmd_dev(ns: argparse.Namespace) -> int:
    """Run an app directory in the foreground with the environment it has in production (the
    dev loop; `corral run APP -- CMD` is a one-off command in a deployed app)."""
    from corral.devloop import run_foreground

    return run_foreground(Path(ns.directory), set_=ns.set_, offset=ns.offset, env=ns.env)


def cmd_up(ns: argparse.Namespace) -> int:
    """Deploy an app through the kernel."""
    from corral import manifest

    if ns.directory == "-" or ns.name:
        print("corral up: a source on stdin (- --name APP) is what the remote CLI sends over "
              "SSH; on the host, give the directory", file=sys.stderr)
        return EXIT_INPUT
    directory = Path(ns.directory).resolve()
    # fail fast (exit 2) on the kernel's own sections, and know the app's name to follow its
    # events; the kernel has every other section checked by its owner before it claims
    draft = manifest.read(directory, set_=ns.set_, offset=ns.offset, env=ns.env)
    draft.problems.raise_if_any()
    res = _rollout.run(ns, draft.app, "app.deploy", {
        "directory": str(directory), "set": ns.set_, "offset": ns.offset, "env": ns.env,
        "wait_s": ns.wait, "reset_overrides": ns.reset_overrides})
    return deployed(ns, res, "up")


def deployed(ns: argparse.Namespace, res: dict[str, Any], verb: str) -> int:
    """Print a deploy's result (``app.deploy``, ``app.scale``): JSON, or a line and a table."""
    if ns.json:
        print_json(res)
        return 0
    release = f"v{res['release']} live, " if res.get("release") else ""
    if res.get("unchanged"):
        print(f"{res['app']}: unchanged: {release}source, manifest and config are as deployed "
              f"(generation {res['generation']}, {res['seconds']:.2f}s)")
    else:
        print(f"{res['app']}: {release}generation {res['generation']} {verb} in "
              f"{res['seconds']:.2f}s")
    if res.get("confined") is False:
        print(f"{res['app']}: WARNING: instances run unconfined (no sandbox driver on this host;"
              " host config unconfined = true)")
    _instances(res["instances"])
    return 0


def _instances(instances: list[dict[str, Any]]) -> None:
    rows = [[i["id"], str(i["pid"]), i["state"],
             f"{i['address']}:{i['port']}" if i.get("port") else "-", str(i.get("restarts", 0))]
            for i in instances]
    table(rows, ["INSTANCE", "PID", "STATE", "LISTEN", "RESTARTS"])


def cmd_scale(ns: argparse.Namespace) -> int:
    """Set how many instances of each named process run (web=3 worker=2)."""
    counts: dict[str, int] = {}
    for item in ns.counts:
        process, sep, value = item.partition("=")
        if not sep or not process or not value.isdigit():
            print(f"corral scale: {item!r}: expected PROCESS=N with N >= 0 (e.g. web=3)",
                  file=sys.stderr)
            return EXIT_INPUT
        counts[process] = int(value)
    res = _rollout.run(ns, ns.app, "app.scale", {"name": ns.app, "counts": counts,
                                                 "wait_s": ns.wait})
    return deployed(ns, res, "scaled")


def cmd_restart(ns: argparse.Namespace) -> int:
    """Replace an app's instances (or one process's) with fresh ones, rolled like a deploy."""
    args: dict[str, Any] = {"name": ns.app, "wait_s": ns.wait}
    if ns.process:
        args["process"] = ns.process
    res = _rollout.run(ns, ns.app, "app.restart", args)
    return deployed(ns, res, "restarted")


def cmd_down(ns: argparse.Namespace) -> int:
    """Stop an app (or --all apps) and release everything it holds (--purge: and forget its
    releases, config and secrets)."""
    if ns.all == bool(ns.app):
        print("corral down: name one app, or --all", file=sys.stderr)
        return EXIT_INPUT
    client = _client()
    names = ([a["app"] for a in client.call("app.ps")["apps"]] if ns.all else [ns.app])
    results, failed = [], 0
    for name in names:
        try:
            res = client.call("app.down", {"name": name, "purge": ns.purge}, timeout=120)
        except CorralError as exc:
            if not ns.all:
                raise
            failed += 1
            res = {"app": name, "error": exc.reason}
        results.append(res)
        if not ns.json:
            purged = "; releases, config and secrets forgotten" if res.get("purged") else ""
            print(f"{name}: " + (f"down ({res['stopped']} instance(s) stopped{purged})"
                                 if "error" not in res else f"not taken down: {res['error']}"))
    if ns.json:
        print_json(results if ns.all else results[0])
    return EXIT_FAILED if failed else 0


def cmd_ps(ns: argparse.Namespace) -> int:
    """Apps and their instances (on several hosts: every host's, with a HOST column)."""
    res = _client().call("app.ps")
    for miss in res.get("unanswered", []):
        print(f"corral ps: host {miss['host']} did not answer: {miss['reason']}",
              file=sys.stderr)
    if ns.json:
        print_json(res["apps"])
        return 0
    several = len({app.get("host") for app in res["apps"]}) > 1 or bool(res.get("unanswered"))
    rows = []
    for app in res["apps"]:
        extra = []
        for driver, figures in sorted(app.get("drivers", {}).items()):
            # the figures each driver says are worth a glance (refused connections, dropped
            # lines...: ``shown`` in its stats); the rest is in --json
            shown = app.get("shown", {}).get(driver, [])
            extra += [f"{driver}.{k}={figures[k]}" for k in shown if k in figures]
        if app.get("confined") is False:
            extra.insert(0, "UNCONFINED")
        for i in app["instances"] or [{"id": "-", "pid": "-", "state": "no instances",
                                       "address": "", "port": None}]:
            state = i["state"] + (" (waiting for a driver)" if i.get("waiting") else "")
            rows.append([*([str(app.get("host"))] if several else []), app["app"], i["id"],
                         str(i["pid"]), state,
                         f"{i['address']}:{i['port']}" if i.get("port") else "-",
                         " ".join(extra)])
    table(rows, [*(["HOST"] if several else []), "APP", "INSTANCE", "PID", "STATE", "LISTEN",
                 "DRIVERS"])
    return 0


def cmd_ledger(ns: argparse.Namespace) -> int:
    """What the ledger holds."""
    res = _client().call("ledger.list", {"owner": ns.owner, "kind": ns.kind})
    if ns.json:
        print_json(res)
        return 0
    rows = [[r["kind"], r["key"], r["owner"], r["since"], str(r["revision"])]
            for r in res["records"]]
    table(rows, ["KIND", "KEY", "OWNER", "SINCE", "REV"])
    return 0


def cmd_drivers(ns: argparse.Namespace) -> int:
    """Drivers and their state; `drivers restart NAME` starts one again (also a failed one)."""
    if ns.action == "restart":
        if not ns.name:
            print("corral drivers restart: name the driver (see `corral drivers`)",
                  file=sys.stderr)
            return EXIT_INPUT
        res = _client().call("driver.restart", {"name": ns.name})
        if ns.json:
            print_json(res["driver"])
        else:
            print(f"{ns.name}: restarting (was {res['driver']['state']})")
        return 0
    res = _client().call("drivers.list")
    if ns.json:
        print_json(res["drivers"])
        return 0
    rows = [[d["name"], d["capability"], d["state"], str(d["pid"] or "-"), str(d["restarts"]),
             d["reason"]] for d in res["drivers"]]
    table(rows, ["DRIVER", "CAPABILITY", "STATE", "PID", "RESTARTS", "REASON"])
    return 0


def cmd_hosts(ns: argparse.Namespace) -> int:
    """The hosts of this kernel's ledger: ready, or lost since when; apps, instances, free
    capacity. `corral hosts forget NAME`: release all a lost host holds in the ledger.
    `corral hosts key`: print a new cluster key (for [host] cluster_key on every host).
    `corral hosts drain NAME`: move every app of a host to the others."""
    import time as _time

    if ns.action == "key":
        from corral.replication import new_cluster_key

        sys.stdout.write(new_cluster_key())
        return 0
    if ns.action == "drain":
        if not ns.name:
            print("corral hosts drain: name the host (see `corral hosts`)", file=sys.stderr)
            return EXIT_INPUT
        res = _client().call("hosts.drain", {"name": ns.name}, timeout=600.0)
        if ns.json:
            print_json(res)
            return 0
        for m in res["moved"]:
            if m.get("share"):
                print(f"{m['app']}: its share here dealt to other hosts by its home, host "
                      f"{m['to']}")
            else:
                print(f"{m['app']}: moved to host {m['to']}")
        for k in res["kept"]:
            print(f"{k['app']}: stays on host {res['host']}: {k['reason']}", file=sys.stderr)
        print(f"host {res['host']} drained: {len(res['moved'])} app(s) moved, "
              f"{len(res['kept'])} kept")
        return 1 if res["kept"] else 0
    if ns.action == "forget":
        if not ns.name:
            print("corral hosts forget: name the lost host (see `corral hosts`)",
                  file=sys.stderr)
            return EXIT_INPUT
        res = _client().call("hosts.forget", {"name": ns.name})
        if ns.json:
            print_json(res)
            return 0
        released = ", ".join(f"{n} {kind}" for kind, n in sorted(res["released"].items()))
        print(f"host {res['host']} forgotten; released {released or 'nothing else'}")
        return 0
    res = _client().call("hosts.list")
    if ns.json:
        print_json(res["hosts"])
        return 0

    def when(t: Any) -> str:
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(float(t))) if t else "-"

    rows = []
    for h in res["hosts"]:
        state = "ready" if h["state"] == "ready" else f"lost since {when(h.get('lost_since'))}"
        state += " (drained)" if h.get("cordoned") else ""
        free = (f"{h['cpus']} cpu, {int(h['memory_available']) >> 20} MiB free"
                if h["state"] == "ready" else "-")
        me = " (this host)" if h["name"] == res.get("this") else ""
        me += " (leader)" if h.get("leader") else ""
        rows.append([h["name"] + me, state, h.get("address") or "-",
                     ",".join(h.get("subnets") or []) or "-",
                     ",".join(h.get("labels") or []) or "-",
                     ",".join(h.get("apps") or []) or "-", str(h.get("instances", "-")), free])
    table(rows, ["HOST", "STATE", "ADDRESS", "SUBNET", "LABELS", "APPS", "INSTANCES",
                 "CAPACITY"])
    return 0


def cmd_daemon(ns: argparse.Namespace) -> int:
    """Run the kernel in the foreground (same as corrald)."""
    # A fresh interpreter in this process (same pid, for systemd): the CLI has imported
    # asyncio and with it OpenSSL, which corrald keeps out of its address space.
    argv = [sys.executable, "-m", "corral.daemon", *(["--stop-drivers"] if ns.stop_drivers
                                                      else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # noqa: S606 - our own interpreter, a fixed argv


def cmd_query(ns: argparse.Namespace) -> int:
    """Ask a driver a capability-specific question through the kernel."""
    try:
        args = json.loads(ns.args) if ns.args else {}
    except ValueError as exc:
        print(f"corral query: ARGS is not JSON ({exc}); e.g. '{{\"app\": \"shop\"}}'",
              file=sys.stderr)
        return EXIT_INPUT
    if not isinstance(args, dict):
        print("corral query: ARGS must be a JSON object, e.g. '{\"app\": \"shop\"}'",
              file=sys.stderr)
        return EXIT_INPUT
    res = _client().call("driver.query", {"capability": ns.capability, "query": ns.query,
                                          "args": args})
    print_json(res)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check,
    "schema": cmd_schema,
    "dev": cmd_dev,
    "certs": _certs.cmd_certs,
    "init": _init.cmd_init,
    "run": _releases.cmd_run,
    "releases": _releases.cmd_releases,
    "rollback": _releases.cmd_rollback,
    "config": _releases.cmd_config,
    "up": cmd_up,
    "down": cmd_down,
    "scale": cmd_scale,
    "restart": cmd_restart,
    "ps": cmd_ps,
    "ledger": cmd_ledger,
    "drivers": cmd_drivers,
    "hosts": cmd_hosts,
    "daemon": cmd_daemon,
    "query": cmd_query,
    "logs": _observe.cmd_logs,
    "errors": _observe.cmd_errors,
    "top": _observe.cmd_top,
    "cron": _cron.cmd_cron,
    "events": _rollout.cmd_events,
    "host": _host.cmd_host,
    "completion": _completion.cmd_completion,
    "keys": _keys.cmd_keys,
    "branch": _keys.cmd_branch,
    "remote": _remote.cmd_remote,
}


def parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per entry of COMMANDS)."""
    p = argparse.ArgumentParser(prog="corral", description="self-hosted, container-free apps")
    p.add_argument("--version", action="version", version=f"corral {__version__}")
    p.add_argument("--remote", metavar="TARGET",
                   help="run the command on a host over SSH: corral@HOST, ssh://corral@HOST:"
                   "PORT or a saved remote (corral remote add); default $CORRAL_REMOTE")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("check", help=cmd_check.__doc__)
    _manifest_flags(s)
    s.add_argument("--json", action="store_true",
                   help="print the resolved manifest, or {\"problems\": [...]}, as JSON")
    sub.add_parser("schema", help=cmd_schema.__doc__)
    s = sub.add_parser("dev", help=cmd_dev.__doc__)
    _manifest_flags(s)
    s = sub.add_parser("up", help=cmd_up.__doc__)
    _manifest_flags(s)
    _rollout.add_flags(s)
    s.add_argument("--reset-overrides", action="store_true",
                   help="forget the --set/--env/--offset given to earlier `corral up`s (they "
                   "are kept and applied again otherwise)")
    s.add_argument("--name", help=argparse.SUPPRESS)  # over SSH: `up - --name APP`
    s = sub.add_parser("down", help=cmd_down.__doc__)
    s.add_argument("app", nargs="?")
    s.add_argument("--all", action="store_true", help="every deployed app")
    s.add_argument("--purge", action="store_true",
                   help="also forget its releases, config vars, secrets and build cache "
                   "(kept for the next `corral up` otherwise)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("scale", help=cmd_scale.__doc__)
    s.add_argument("app")
    s.add_argument("counts", nargs="+", metavar="PROCESS=N")
    _rollout.add_flags(s)
    s = sub.add_parser("restart", help=cmd_restart.__doc__)
    s.add_argument("app")
    s.add_argument("process", nargs="?", help="only this process's instances")
    _rollout.add_flags(s)
    s = sub.add_parser("ps", help=cmd_ps.__doc__)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("drivers", help=cmd_drivers.__doc__)
    s.add_argument("action", nargs="?", choices=["restart"], help="restart NAME")
    s.add_argument("name", nargs="?", help="the driver to restart")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("hosts", help=cmd_hosts.__doc__)
    s.add_argument("action", nargs="?", choices=["forget", "key", "drain"],
                   help="forget NAME; drain NAME; key: print a new cluster key")
    s.add_argument("name", nargs="?", help="the host to forget (lost) or drain")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("ledger", help=cmd_ledger.__doc__)
    s.add_argument("--owner")
    s.add_argument("--kind")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("daemon", help=cmd_daemon.__doc__)
    s.add_argument("--stop-drivers", action="store_true")
    s = sub.add_parser("query", help=cmd_query.__doc__)
    s.add_argument("capability")
    s.add_argument("query")
    s.add_argument("args", nargs="?", help="JSON object")
    _observe.add_parsers(sub)
    _cron.add_parsers(sub)
    _rollout.add_parsers(sub)
    _host.add_parsers(sub)
    _releases.add_parsers(sub)
    _init.add_parsers(sub)
    _certs.add_parsers(sub)
    _keys.add_parsers(sub)
    _remote.add_parsers(sub)
    _completion.add_parsers(sub, parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; map errors to exit codes with a clear message on stderr.

    A reader that goes away (``corral logs APP | head``) ends the command quietly with 141
    (128 + SIGPIPE), the status git, seq or cat have when a signal ends them there."""
    args = list(sys.argv[1:] if argv is None else argv)
    target, args = _remote.split_remote(args)
    ns = parser().parse_args(args)
    if target is not None:
        return _remote.forward(target, args, ns)
    return run_command(ns, COMMANDS[ns.command])


def run_command(ns: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run a parsed command; map errors to exit codes with a clear message on stderr."""
    try:
        code = command(ns)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # what is still buffered for the gone reader must not be flushed again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"corral: {problem}", file=sys.stderr)
        return EXIT_INPUT
    except CorralError as exc:
        print(f"corral {ns.command}: {exc.reason}", file=sys.stderr)
        if exc.code == ErrorCode.UNAVAILABLE and "driver" not in exc.details:
            return EXIT_UNAVAILABLE
        if exc.code in (ErrorCode.INVALID,):
            return EXIT_INPUT
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
