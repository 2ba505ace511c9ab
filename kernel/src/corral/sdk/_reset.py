"""The driver side of ``corral host reset``: find, and with ``apply`` remove, a driver's leftovers.

A driver whose description names a ``reset`` module is run as ``python -m <reset>`` by
``corral host reset``, with one JSON object on stdin::

    {"home": "/var/lib/corral", "runtime_dir": "/run/corral",
     "config": {...the host config's [drivers.<name>] config...}, "apply": false}

and prints one JSON object on stdout: ``{"found": [...], "removed": [...], "failed": [...]}``
(plain sentences, one per thing: ``network namespace corral-blog.web.0-1a2b3c``). Without
``apply`` it only looks. It must find everything by the driver's naming conventions and the
config alone: the home and its ledger may be gone. Exit status 0 when it could look (failures
to remove are reported in ``failed``), anything else when it could not even look.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ResetRequest:
    """What ``corral host reset`` hands a driver's reset: where corral lives, its config."""

    home: Path
    runtime_dir: Path
    config: dict[str, Any]
    apply: bool


@dataclass
class ResetReport:
    """What a reset found, removed and failed to remove, one sentence per thing."""

    found: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def item(self, what: str, remove: Callable[[], object], *, apply: bool) -> None:
        """Record ``what`` as found and, with ``apply``, remove it (a failure is recorded with
        its reason, and the reset goes on with the next thing)."""
        self.found.append(what)
        if not apply:
            return
        try:
            remove()
        except Exception as exc:  # reported, never hidden: the next item goes on
            self.failed.append(f"{what}: {exc}")
        else:
            self.removed.append(what)


def serve_reset(reset: Callable[[ResetRequest, ResetReport], None]) -> None:
    """Run one reset as ``corral host reset`` asks (stdin request, stdout report); exits."""
    raw = json.load(sys.stdin)
    request = ResetRequest(home=Path(raw["home"]), runtime_dir=Path(raw["runtime_dir"]),
                           config=dict(raw.get("config") or {}), apply=bool(raw.get("apply")))
    report = ResetReport()
    reset(request, report)
    json.dump(asdict(report), sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    raise SystemExit(0)
