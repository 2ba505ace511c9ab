"""How the CLI prints: JSON for scripts, aligned tables for people."""

from __future__ import annotations

import json
from typing import Any


def print_json(data: Any) -> None:
    """``data`` as indented JSON with sorted keys (what ``--json`` prints)."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(rows: list[list[str]], header: list[str]) -> None:
    """``rows`` under ``header``, columns aligned, no trailing blanks."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
