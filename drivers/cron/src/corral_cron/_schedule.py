"""Schedule expressions (R4): exactly five cron fields, or one of five @macros."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from enum import StrEnum

from corral.errors import CorralError, ErrorCode

MACROS: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
}
# Aliases other crons accept; refused so that there is one spelling of each, with the hint.
_ALIASES = {"@midnight": "@daily", "@annually": "@yearly"}

_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _FieldSpec("minute", 0, 59, {}),
    _FieldSpec("hour", 0, 23, {}),
    _FieldSpec("day-of-month", 1, 31, {}),
    _FieldSpec("month", 1, 12, _MONTHS),
    _FieldSpec("day-of-week", 0, 7, _DAYS),
)
_ITEM = re.compile(r"^(?P<base>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>\d+))?$")
_EXTENSIONS = {
    "?": "'?' (Quartz: 'no specific value') is not cron syntax; use '*'",
    "l": "'L' (last day) is a Quartz/croniter extension that other crons read differently",
    "w": "'W' (nearest weekday) is a Quartz extension",
    "#": "'#' (nth weekday) is a Quartz/croniter extension",
    "h": "'H' (hashed value) is a Jenkins extension; use the job's `jitter` setting instead",
}


class JobKind(StrEnum):
    """How a schedule meets DST changes (R2): see docs/drivers/cron.md."""

    FIXED = "fixed"  # literal minute and hour (lists and ranges of literals included)
    INTERVAL = "interval"  # '*' or a step in the minute or hour field


class ScheduleError(CorralError):
    """A schedule expression is not valid; ``field`` names the cron field at fault (or None)."""

    code = ErrorCode.INVALID

    def __init__(self, expression: str, problem: str, *, field: str | None = None) -> None:
        where = f" {field} field" if field else ""
        super().__init__(f"schedule {expression!r}:{where} {problem}", details={"field": field})
        self.expression = expression
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Schedule:
    """A parsed, validated five-field schedule; ``cron`` is what croniter is given."""

    expression: str
    cron: str
    kind: JobKind
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday; 7 is folded into 0
    day_restricted: bool
    weekday_restricted: bool

    @property
    def day_or_weekday(self) -> bool:
        """True when both day fields are restricted, so a day matches if EITHER matches."""
        return self.day_restricted and self.weekday_restricted

    def fire_dates(self) -> str:
        """'always', 'leap-years' or 'never': on which years the day fields can match at all."""
        if self.weekday_restricted or not self.day_restricted:
            return "always"
        possible = {(m, d) for m in self.months for d in self.days
                    if d <= calendar.monthrange(2023, m)[1]}
        if possible:
            return "always"
        if 2 in self.months and 29 in self.days:
            return "leap-years"
        return "never"


def parse_schedule(expression: str) -> Schedule:
    """Parse and validate ``expression``; raise ScheduleError that names the field at fault."""
    text = " ".join(expression.split())
    if not text:
        raise ScheduleError(expression, "is empty; expected five fields or @hourly, @daily, ...")
    if text.startswith("@"):
        macro = text.lower()
        if macro == "@reboot":
            raise ScheduleError(
                expression,
                "@reboot is not supported: a scheduler restart is not an event of the app, so "
                "the job would run again on every driver or host restart. Use an explicit "
                "on-deploy trigger (a deploy/release step of the app) instead.",
            )
        if macro in _ALIASES:
            raise ScheduleError(expression, f"write {_ALIASES[macro]} (the one accepted spelling)")
        if macro not in MACROS:
            raise ScheduleError(
                expression, f"unknown macro; expected one of {', '.join(MACROS)}")
        text = MACROS[macro]
    fields = text.split(" ")
    if len(fields) in (6, 7):
        meaning = ("seconds (first in Quartz and Spring, last in croniter) or a year (last, in "
                   "other crons)" if len(fields) == 6 else "seconds first and a year last (Quartz)")
        raise ScheduleError(
            expression,
            f"has {len(fields)} fields; corral takes exactly 5 (minute hour day-of-month month "
            f"day-of-week). Extra fields mean {meaning}, and libraries disagree about which, so "
            "'*/30 * * * * *' is every 30 seconds in one and every 30 minutes of one year in "
            "another. Write the 5-field form; the smallest interval is one minute.",
        )
    if len(fields) != 5:
        raise ScheduleError(
            expression,
            f"has {len(fields)} field(s); expected 5: minute hour day-of-month month day-of-week",
        )
    sets = [_expand(expression, spec, value) for spec, value in zip(_FIELDS, fields, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in sets[4])
    interval = any(("*" in f or "/" in f) for f in fields[:2])
    return Schedule(
        expression=expression,
        cron=text,
        kind=JobKind.INTERVAL if interval else JobKind.FIXED,
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=weekdays,
        day_restricted=len(sets[2]) < 31,
        weekday_restricted=len(weekdays) < 7,
    )


def _expand(expression: str, spec: _FieldSpec, text: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.lower().split(","):
        match = _ITEM.match(item)
        if match is None:
            for mark in "?#":
                if mark in item:
                    raise ScheduleError(
                        expression, f"{text!r}: {_EXTENSIONS[mark]}", field=spec.name)
            raise ScheduleError(
                expression,
                f"{text!r}: {item!r} is not a value, range (a-b), step (*/n, a-b/n) or '*'",
                field=spec.name,
            )
        base, step_text = match.group("base"), match.group("step")
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            first, last = base.split("-")
            low, high = _value(expression, spec, text, first), _value(expression, spec, text, last)
            if low > high:
                raise ScheduleError(
                    expression, f"{text!r}: range {item!r} runs backwards", field=spec.name)
        else:
            low = high = _value(expression, spec, text, base)
            if step_text is not None:
                raise ScheduleError(
                    expression,
                    f"{text!r}: {item!r} (a single value with a step) is read as 'value-max/step'"
                    " by some crons and refused by others; write the range explicitly",
                    field=spec.name,
                )
        step = int(step_text) if step_text is not None else 1
        if step < 1 or step > spec.high - spec.low + 1:
            raise ScheduleError(
                expression, f"{text!r}: step {step} is outside 1-{spec.high - spec.low + 1}",
                field=spec.name)
        values.update(range(low, high + 1, step))
    return frozenset(values)


def _value(expression: str, spec: _FieldSpec, text: str, token: str) -> int:
    if token in spec.names:
        return spec.names[token]
    if not token.isdigit():
        for mark in "lwh":
            if token == mark or (token[:-1].isdigit() and token.endswith(mark)):
                raise ScheduleError(
                    expression, f"{text!r}: {_EXTENSIONS[mark]}", field=spec.name)
        raise ScheduleError(expression, f"{text!r}: {token!r} is not a number", field=spec.name)
    value = int(token)
    if not spec.low <= value <= spec.high:
        raise ScheduleError(
            expression, f"{text!r}: {value} is out of range {spec.low}-{spec.high}",
            field=spec.name)
    return value
