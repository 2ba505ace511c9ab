"""Durations as written in corral.toml ("90s", "10m", "1h30m", "2d") as ``timedelta``s.

Reading is ``corral.units.parse_duration``, the one notation; this module only adapts it to
``timedelta`` and writes durations back the same way."""

from __future__ import annotations

from datetime import timedelta

from corral.units import parse_duration as _seconds


def parse_duration(text: str) -> timedelta:
    """Parse "1h30m"-style text (``corral.units``); raise ValueError (a UnitError) if unreadable."""
    return timedelta(seconds=_seconds(text))


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
