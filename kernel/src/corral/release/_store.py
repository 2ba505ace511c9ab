"""Releases: numbered, immutable, kept in the ledger (what) and on disk (the files).

Each release ``vN`` of app ``A`` is a ledger record of kind ``release``, key ``A/vN``, owned
by ``releases:A`` (not by the app itself, so ``corral down`` keeps the history and the next
``corral up`` goes on at ``vN+1``), and a directory ``<home>/apps/A/releases/vN`` holding the
source snapshot and the build output, root-owned and read-only to the app once built.

A record's ``status`` is ``building`` (being made: a kernel that dies meanwhile leaves one,
which ``recover`` marks ``abandoned`` and removes with its directory as soon as nothing holds
it any more, so a build cut short makes no release),
``built`` (ready to deploy), ``deployed`` (was live at some point; ``current`` in the app
record says which one is live now) or ``failed`` (its release phase or rollout failed; kept
in the list, as Heroku does, never rolled back to). The record never holds a secret's value:
secrets are referenced (``corral.release._config``).
"""

from __future__ import annotations

import builtins
import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.ledger import Ledger, Txn
from corral.release._source import remove_tree

KIND = "release"
DEFAULT_KEEP = 10


def owner(app: str) -> str:
    """The ledger owner of an app's release records."""
    return f"releases:{app}"


def key(app: str, number: int) -> str:
    """The ledger key of release ``number`` of ``app``."""
    return f"{app}/v{number}"


def now() -> str:
    """UTC time in ISO 8601, seconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ReleaseStore:
    """The releases of every app on this host: records in ``ledger``, files under ``home``."""

    def __init__(self, ledger: Ledger, home: Path, keep: int = DEFAULT_KEEP) -> None:
        self.ledger = ledger
        self.home = home
        self.keep = max(2, keep)

    def root(self, app: str) -> Path:
        """``<home>/apps/<app>/releases``."""
        return self.home / "apps" / app / "releases"

    def directory(self, app: str, number: int) -> Path:
        """Where release ``number``'s files are."""
        return self.root(app) / f"v{number}"

    def log(self, app: str, number: int, what: str) -> Path:
        """The output of release ``number``'s build or release phase (``what``)."""
        logs = self.root(app) / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        return logs / f"v{number}.{what}.log"

    def list(self, app: str) -> list[dict[str, Any]]:
        """The app's releases, oldest first (each a record value, with ``number``)."""
        found = [dict(r.value) for r in self.ledger.list(owner=owner(app), kind=KIND)]
        return sorted(found, key=lambda v: int(v["number"]))

    def get(self, app: str, number: int) -> dict[str, Any]:
        """Release ``number`` of ``app``; NotFoundError lists the ones there are."""
        rec = self.ledger.get(KIND, key(app, number))
        if rec is None:
            have = [f"v{r['number']}" for r in self.list(app)]
            raise NotFoundError(
                f"app {app!r} has no release v{number} "
                f"({'it has ' + ', '.join(have) if have else 'it has no release'}; "
                f"releases older than the last {self.keep} are removed)")
        return dict(rec.value)

    def prepare_root(self, app: str) -> Path:
        """Create ``apps/<app>/releases`` (0711: the app's uid traverses it to its release)."""
        root = self.root(app)
        for d in (self.home / "apps", self.home / "apps" / app, root):
            d.mkdir(mode=0o711, exist_ok=True)
            os.chmod(d, 0o711)
        return root

    def allocate(self, app: str, value: dict[str, Any]) -> int:
        """Claim the next release number with status ``building``; return it. Its directory
        is made empty (a leftover of a crashed build with the same number is removed)."""
        self.prepare_root(app)
        numbers = [int(v["number"]) for v in self.list(app)]
        existing = [int(p.name[1:]) for p in self.root(app).glob("v*") if p.name[1:].isdigit()]
        number = max([0, *numbers, *existing]) + 1
        for _attempt in range(100):
            txn = Txn().expect_free(KIND, key(app, number))
            txn.claim(owner(app), KIND, key(app, number),
                      {**value, "number": number, "status": "building", "created": now()})
            try:
                self.ledger.commit(txn)
            except CorralError as exc:
                if exc.code != ErrorCode.CONFLICT:
                    raise
                number += 1
                continue
            directory = self.directory(app, number)
            remove_tree(directory)
            return number
        raise CorralError(f"no release number could be allocated for {app!r}",
                          code=ErrorCode.CONFLICT)

    def update(self, app: str, number: int, txn: Txn | None = None, **changes: Any) -> Txn:
        """Change fields of a release's record; into ``txn`` when given (committed by the
        caller with other changes), else committed now."""
        value = {**self.get(app, number), **changes}
        out = txn if txn is not None else Txn()
        out.claim(owner(app), KIND, key(app, number), value)
        if txn is None:
            self.ledger.commit(out)
        return out

    def drop(self, app: str, number: int) -> None:
        """Remove a release: its directory (unless a kept release shares it: a config
        change makes a release of the same files), its logs, then its record."""
        value = self.ledger.get(KIND, key(app, number))
        files = str((value.value if value else {}).get("files") or f"v{number}")
        sharing = [v for v in self.list(app)
                   if int(v["number"]) != number and v.get("files") == files]
        if not sharing:
            remove_tree(self.root(app) / files)
        for what in ("build", "release"):
            (self.root(app) / "logs" / f"v{number}.{what}.log").unlink(missing_ok=True)
        self.ledger.release(owner(app), [(KIND, key(app, number))])

    def prune(self, app: str, current: int | None) -> builtins.list[int]:
        """Remove releases beyond the newest ``keep`` (never the current one nor the one
        before it, the first rollback target); return the numbers removed."""
        releases = self.list(app)
        keep: set[int] = {int(v["number"]) for v in releases[-self.keep:]}
        if current is not None:
            keep.add(current)
            earlier = [int(v["number"]) for v in releases
                       if int(v["number"]) < current and v.get("status") == "deployed"]
            if earlier:
                keep.add(earlier[-1])
        removed = []
        for value in releases:
            number = int(value["number"])
            if number not in keep and value.get("status") != "building":
                self.drop(app, number)
                removed.append(number)
        return removed

    def recover(self, kill: Callable[[dict[str, Any]], None] | None = None
                ) -> builtins.list[str]:
        """At kernel start: remove every release still ``building`` (its build died with the
        previous kernel; ``kill`` ends what remains of its builder process first) and every
        release directory no record uses; return what went. What cannot be removed yet (the
        dead build's sandbox still holds its directory until the fs driver collects it) is
        marked ``abandoned`` and removed by ``collect`` later; this never raises for it."""
        gone: list[str] = []
        for rec in self.ledger.list(kind=KIND):
            if rec.value.get("status") == "building":
                app = str(rec.value.get("app") or rec.key.split("/")[0])
                if kill is not None and rec.value.get("builder"):
                    kill(rec.value["builder"])
                self.update(app, int(rec.value["number"]), status="abandoned",
                            failure="its build was cut short by a kernel restart")
                gone.append(rec.key)
        apps = self.home / "apps"
        for app in sorted(p.name for p in apps.iterdir()) if apps.is_dir() else []:
            gone += self.collect(app)
        return gone

    def collect(self, app: str, *, strays: bool = True) -> builtins.list[str]:
        """Remove the app's ``abandoned`` releases and (``strays``) the directories no record
        uses (a crash between copy and record leaves one; only while no release of the app is
        being made); what is still busy stays for next time."""
        gone: list[str] = []
        for value in self.list(app):
            if value.get("status") == "abandoned":
                try:
                    self.drop(app, int(value["number"]))
                    gone.append(f"{app}/v{value['number']}")
                except OSError:
                    pass
        root = self.root(app)
        if strays and root.is_dir():
            used = {str(v.get("files") or f"v{v['number']}") for v in self.list(app)}
            for d in root.iterdir():
                if d.name != "logs" and d.name not in used:
                    try:
                        remove_tree(d)
                        gone.append(f"{app}/{d.name}")
                    except OSError:
                        pass
        return gone

    def referenced_secrets(self, app: str) -> set[str]:
        """The secret references the app's kept releases hold."""
        refs: set[str] = set()
        for value in self.list(app):
            refs.update(str(r) for r in ((value.get("config") or {}).get("secrets") or {})
                        .values())
        return refs
