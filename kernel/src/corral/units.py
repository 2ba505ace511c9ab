"""Sizes, durations and instants as people write them (manifest, host config, CLI).

The one notation of corral, public so drivers use it too: `MB` is 10^6 bytes, `MiB` 2^20;
durations add parts ("1h30m"); an instant is ISO 8601. docs/manifest.md documents it."""

from __future__ import annotations

import calendar
import math
import re
import time
from datetime import UTC, datetime
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
SINCE_EXPECTED = (
    'a duration back from now such as "10m" or "1h30m", or an ISO 8601 instant such as '
    '"2024-05-01T12:00:00Z" (UTC unless it names an offset)'
)
_INSTANT = re.compile(
    r"\s*(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:?\d{2})?\s*"
)


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


def parse_instant(value: str) -> int:
    """Return an ISO 8601 instant ("2024-05-01T12:00:00.5Z") as epoch nanoseconds, UTC unless
    it names an offset; raise UnitError. Nanoseconds are kept (``datetime`` stops at micro)."""
    match = _INSTANT.fullmatch(value)
    if match is None:
        raise UnitError(SINCE_EXPECTED)
    day, clock, fraction, offset = match.groups()
    zone = "+00:00" if offset is None or offset in ("Z", "z") else offset
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}{zone}").astimezone(UTC)
    except ValueError as exc:
        raise UnitError(SINCE_EXPECTED, str(exc)) from None
    seconds = calendar.timegm(moment.timetuple())
    return seconds * 1_000_000_000 + int((fraction or "").ljust(9, "0"))


def parse_since(value: object, now_ns: int | None = None) -> int:
    """Return a ``since`` ("10m" or "1h30m" back from ``now_ns``, an ISO 8601 instant, or a
    number of epoch seconds) as epoch nanoseconds; raise UnitError."""
    if isinstance(value, bool):
        raise UnitError(SINCE_EXPECTED)
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise UnitError(SINCE_EXPECTED, "negative or not finite")
        return int(Decimal(value) * 1_000_000_000)
    if not isinstance(value, str):
        raise UnitError(SINCE_EXPECTED)
    if _INSTANT.fullmatch(value):
        return parse_instant(value)
    try:
        back = parse_duration(value)
    except UnitError:
        raise UnitError(SINCE_EXPECTED) from None
    now = time.time_ns() if now_ns is None else now_ns
    return now - int(Decimal(back) * 1_000_000_000)
