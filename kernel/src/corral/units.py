"""Sizes and durations as people write them (manifest, host config, CLI): bytes and seconds.

The one notation of corral, public so drivers use it too: `MB` is 10^6 bytes, `MiB` 2^20."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

# Binary units are what memory limits and log rotation mean; decimal ones are accepted because
# people write "100MB". Single letters follow systemd and docker ("512M" is 512 MiB).
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")

_DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")

SIZE_EXPECTED = 'a size such as "512MiB", "1GiB", "100MB" or a whole number of bytes'
DURATION_EXPECTED = 'a duration such as "500ms", "2s", "10m" or "1h30m", or a number of seconds'


class UnitError(ValueError):
    """A size or duration could not be read: ``expected`` says what would do, ``hint`` why."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(f"expected {expected}" + (f" ({hint})" if hint else ""))
        self.expected = expected
        self.hint = hint


def parse_size(value: object) -> int:
    """Return ``value`` ("512MiB", "100MB", 4096) as a number of bytes; raise UnitError."""
    if isinstance(value, bool):
        raise UnitError(SIZE_EXPECTED)
    if isinstance(value, int):
        if value < 0:
            raise UnitError(SIZE_EXPECTED, "negative")
        return value
    if not isinstance(value, str):
        raise UnitError(SIZE_EXPECTED)
    match = _SIZE.fullmatch(value)
    if match is None:
        raise UnitError(SIZE_EXPECTED)
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UnitError(
            SIZE_EXPECTED,
            f"unknown unit {unit!r}; units are B, KiB, MiB, GiB, TiB, kB, MB, GB, TB, "
            "and K, M, G, T for binary units",
        )
    return int(Decimal(number) * factor)


def parse_duration(value: object) -> float:
    """Return ``value`` ("10m", "1h30m", "500ms", 2.5) as seconds; raise UnitError."""
    if isinstance(value, bool):
        raise UnitError(DURATION_EXPECTED)
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise UnitError(DURATION_EXPECTED, "negative or not finite")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise UnitError(DURATION_EXPECTED)
    total = Decimal(0)
    position = 0
    text = value.rstrip()
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise UnitError(DURATION_EXPECTED)
        try:
            total += Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
            raise UnitError(DURATION_EXPECTED) from exc
        position = match.end()
    seconds = float(total)
    if not math.isfinite(seconds):
        raise UnitError(DURATION_EXPECTED, "too large")
    return seconds
