"""What an SSH key may ask of the kernel: one table, checked before every remote request.

Remote peers (role ``remote``: the gateway, acting for the key named in its HELLO) may send
the operations of ``KERNEL_OPS["remote"]`` only. Each is then checked here against the
key's scope, by an explicit table (an operation missing from it is refused, so a new
operation is closed to remote keys until someone decides):

- ``ADMIN``: admin keys only (keys, the ledger, drivers, the kernel's figures);
- ``APP``: the app named in the arguments must be one of the key's (admin keys: any app);
- ``ANY``: every key (``app.ps`` answers with the key's own apps only, ``keys.whoami``);
- ``driver.query``: only the queries of ``QUERIES``, each with its own rule.

Remote deploys take an uploaded source only, never a directory of the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.remote._keys import Key

ADMIN = "admin"
APP = "app"
ANY = "any"

RULES: dict[str, str] = {
    "app.deploy": APP, "app.down": APP, "app.scale": APP, "app.get": APP,
    "app.restart": APP, "app.releases": APP, "app.rollback": APP, "app.config": APP,
    "app.config.set": APP, "app.config.unset": APP, "app.run": APP, "app.branch": APP,
    "app.ps": ANY, "keys.whoami": ANY, "driver.query": ANY,
    "keys.add": ADMIN, "keys.list": ADMIN, "keys.remove": ADMIN, "ledger.list": ADMIN,
    "drivers.list": ADMIN, "driver.restart": ADMIN, "kernel.status": ADMIN,
    "hosts.list": ADMIN, "hosts.forget": ADMIN, "hosts.drain": ADMIN,
}


def _forbidden(text: str) -> CorralError:
    return CorralError(text, code=ErrorCode.FORBIDDEN)


def _app_arg(key: Key, args: dict[str, Any]) -> None:
    app = args.get("app")
    if not isinstance(app, str) or not key.may(app):
        raise _forbidden(f"key {key.name!r} may not read {app or 'every app'!r}: name one of "
                         f"its apps ({', '.join(key.apps)})")


def _job_arg(key: Key, args: dict[str, Any]) -> None:
    job = str(args.get("job", ""))
    app = job.split(".", 1)[0] if "." in job else ""
    if not key.may(app):
        raise _forbidden(f"key {key.name!r} may not act on cron job {job!r}: write "
                         f"<app>.<job> with one of its apps ({', '.join(key.apps)})")


def _any(key: Key, args: dict[str, Any]) -> None:
    return None


Check = Callable[[Key, dict[str, Any]], None]
Filter = Callable[[Key, dict[str, Any]], dict[str, Any]]


def _services(key: Key, res: dict[str, Any]) -> dict[str, Any]:
    # the host's shared frontends (``edge``) and any other host-wide figure stay out
    return {"services": [s for s in res.get("services", []) if key.may(str(s.get("app", "")))]}


def _jobs(key: Key, res: dict[str, Any]) -> dict[str, Any]:
    return {**res, "jobs": [j for j in res.get("jobs", [])
                            if key.may(str(j.get("job", "")).split(".", 1)[0])]}


def _certs(key: Key, res: dict[str, Any]) -> dict[str, Any]:
    return {**res, "certs": [c for c in res.get("certs", []) if key.may(str(c.get("app", "")))]}


def _unchanged(key: Key, res: dict[str, Any]) -> dict[str, Any]:
    return res


QUERIES: dict[tuple[str, str], tuple[Check, Filter]] = {
    ("log", "read"): (_app_arg, _unchanged),
    ("log", "errors"): (_app_arg, _unchanged),
    ("log", "top"): (_app_arg, _unchanged),
    ("lb", "metrics"): (_any, _services),
    ("lb", "certs"): (_any, _certs),
    ("lb", "renew"): (_app_arg, _unchanged),
    ("cron", "ls"): (_any, _jobs),
    ("cron", "next"): (_job_arg, _unchanged),
    ("cron", "runs"): (_job_arg, _unchanged),
    ("cron", "run"): (_job_arg, _unchanged),
    ("cron", "show"): (_job_arg, _unchanged),
}
"""The driver queries a scoped key may send, each with its check and its answer's filter."""


def authorize(key: Key, op: str, args: Any) -> Filter:
    """Refuse (FORBIDDEN) what ``key`` may not ask; return the filter for the answer."""
    rule = RULES.get(op)
    if rule is None:
        raise _forbidden(f"{op} is not allowed over SSH")
    if op == "app.deploy" and getattr(args, "directory", None):
        raise _forbidden("a remote deploy sends its source (an upload), never a host directory")
    if key.admin:
        return _unchanged
    if rule == ADMIN:
        raise _forbidden(f"{op} needs an admin key; key {key.name!r} is scoped to "
                         f"{', '.join(key.apps)}")
    if rule == APP:
        name = str(getattr(args, "name", "") or "")
        if not key.may(name):
            raise _forbidden(f"key {key.name!r} may not act on app {name!r} (it may on "
                             f"{', '.join(key.apps)})")
        return _unchanged
    if op == "app.ps":
        return lambda k, res: {**res, "apps": [a for a in res.get("apps", [])
                                               if k.may(str(a.get("app", "")))]}
    if op == "driver.query":
        entry = QUERIES.get((str(args.capability), str(args.query)))
        if entry is None:
            raise _forbidden(f"query {args.capability}.{args.query} needs an admin key")
        check, answer = entry
        check(key, dict(args.args))
        return answer
    return _unchanged
