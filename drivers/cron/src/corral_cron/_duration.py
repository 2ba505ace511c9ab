"""Durations as written in corral.toml: "90s", "10m", "1h30m", "2d"."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> timedelta:
    """Parse "1h30m"-style text (units ms, s, m, h, d); raise ValueError saying what is wrong."""
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError("empty duration; expected e.g. '30s', '10m', '1h30m'")
    pos, total = 0, 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(cleaned):
        raise ValueError(f"{text!r} is not a duration; expected e.g. '30s', '10m', '1h30m', '2d'")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """Render a duration the way it is written in corral.toml ("1h30m", "45s", "250ms")."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    if ms:
        parts.append(f"{ms}ms")
    return sign + "".join(parts)
