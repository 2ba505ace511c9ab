"""Command-line overrides: ``--set KEY=VALUE``, ``--env KEY=VALUE`` and the Procfile merge."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corral.manifest._locate import Path_, format_path

_SET_KEY_PART = re.compile(r'\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\\n]|\\.)*)"|\'([^\'\n]*)\')\s*')
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROCFILE_LINE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*?)\s*")

# The contract variables belong to corral: --env may not shadow them.
RESERVED_ENV = frozenset({"PORT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})
RESERVED_ENV_PREFIX = "CORRAL_"


_BAD_KEY = (
    "expected KEY=VALUE with KEY a dotted path such as ports.http or "
    "processes.web.instances, got key {key!r}"
)


class OverrideError(ValueError):
    """An override is malformed: ``label`` is the flag as typed, ``message`` what was expected."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(f"{label}: {message}")
        self.label = label
        self.message = message


def shown(item: str) -> str:
    """Return a command-line item as typed, quoted if it holds unprintable characters."""
    return item if item.isprintable() else repr(item)


@dataclass(frozen=True)
class Setting:
    """One parsed ``--set``: the field path, its new value and the flag as typed."""

    path: Path_
    value: Any
    label: str


def parse_set(item: str) -> Setting:
    """Parse ``KEY=VALUE``: KEY a dotted path, VALUE a TOML value or else a plain string."""
    label = f"--set {shown(item)}"
    key, equals, text = item.partition("=")
    if not equals:
        raise OverrideError(label, "expected KEY=VALUE, e.g. --set ports.http=9000")
    parts: list[str | int] = []
    position = 0
    while True:
        match = _SET_KEY_PART.match(key, position)
        if match is None:
            raise OverrideError(label, _BAD_KEY.format(key=key))
        bare, basic, literal = match.groups()
        if bare is not None:
            parts.append(int(bare) if bare.isdigit() else bare)
        else:
            raw = f'"{basic}"' if basic is not None else f"'{literal}'"
            try:
                parts.append(tomllib.loads(f"k = {raw}")["k"])
            except tomllib.TOMLDecodeError as exc:
                raise OverrideError(label, _BAD_KEY.format(key=key)) from exc
        position = match.end()
        if position == len(key):
            break
        if key[position] != ".":
            raise OverrideError(label, _BAD_KEY.format(key=key))
        position += 1
    return Setting(tuple(parts), _toml_value(text), label)


def _toml_value(text: str) -> Any:
    """Read ``text`` as one TOML value (9000, true, "x", [1, 2], {a = 1}), else as a string."""
    if "\n" in text or "\r" in text:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(document: dict[str, Any], setting: Setting) -> None:
    """Write ``setting`` into ``document``, creating tables on the way; raise OverrideError."""
    node: Any = document
    for depth, part in enumerate(setting.path[:-1]):
        if isinstance(node, dict):
            node = (
                node.setdefault(part, {})
                if isinstance(part, str)
                else node.setdefault(str(part), {})
            )
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            raise _not_a_table(setting, depth)
    last = setting.path[-1]
    if isinstance(node, dict):
        node[str(last)] = setting.value
    elif isinstance(node, list) and isinstance(last, int) and last <= len(node):
        if last == len(node):
            node.append(setting.value)
        else:
            node[last] = setting.value
    else:
        raise _not_a_table(setting, len(setting.path) - 1)


def _not_a_table(setting: Setting, depth: int) -> OverrideError:
    where = format_path(setting.path[:depth]) or "the document"
    return OverrideError(
        setting.label,
        f"{where} is not a table, or is an array without element {setting.path[depth]}",
    )


def parse_env(items: Sequence[str]) -> tuple[dict[str, str], list[OverrideError]]:
    """Parse ``--env KEY=VALUE`` items; return the variables and an error per bad item."""
    env: dict[str, str] = {}
    problems: list[OverrideError] = []
    for item in items:
        label = f"--env {shown(item)}"
        name, equals, value = item.partition("=")
        if not equals or not _ENV_NAME.fullmatch(name):
            problems.append(
                OverrideError(label, "expected KEY=VALUE with KEY made of letters, digits and '_'")
            )
        elif name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            problems.append(
                OverrideError(
                    label, f"{name} is set by corral from the manifest (use --set for ports)"
                )
            )
        elif "\x00" in value:
            problems.append(OverrideError(label, "expected a value without NUL bytes"))
        else:
            env[name] = value
    return env, problems


@dataclass(frozen=True)
class ProcfileEntry:
    """One ``name: command`` line of a Procfile."""

    name: str
    command: str
    line: int


def parse_procfile(text: str) -> tuple[list[ProcfileEntry], list[tuple[int, str]]]:
    """Read a Procfile; return its entries and (line, problem) pairs for bad lines."""
    entries: list[ProcfileEntry] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PROCFILE_LINE.fullmatch(line)
        if match is None or not match.group(2):
            problems.append((number, 'expected "name: command", e.g. "web: python app.py"'))
            continue
        name, command = match.groups()
        if name in seen:
            problems.append((number, f"process {name!r} is already defined on line {seen[name]}"))
            continue
        seen[name] = number
        entries.append(ProcfileEntry(name, command, number))
    return entries, problems
