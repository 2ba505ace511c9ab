"""A TOML writer for tests that varies its style and records the line of every field."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any

Path_ = tuple[str | int, ...]
Choose = Callable[[str], bool]
"""Answers a style question ("inline table?") so hypothesis can explore every style."""

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def basic_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def key(text: str) -> str:
    return text if _BARE.fullmatch(text) else basic_string(text)


def _literal_ok(text: str) -> bool:
    control = any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text)
    return "'" not in text and not control


class TomlWriter:
    """Write a dict as TOML, recording the line each key, table and array element starts on."""

    def __init__(self, choose: Choose) -> None:
        self.choose = choose
        self.parts: list[str] = []
        self.line = 1
        self.lines: dict[Path_, int] = {}

    def text(self) -> str:
        return "".join(self.parts)

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.line += text.count("\n")

    def mark(self, path: Path_) -> None:
        self.lines.setdefault(path, self.line)

    def scalar(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            assert math.isfinite(value)
            return repr(value)
        if isinstance(value, datetime | date | time):
            return value.isoformat()
        assert isinstance(value, str)
        if "\n" in value and "'''" not in value and _literal_ok(value.replace("\n", "")):
            if self.choose("multi-line literal string"):
                return "'''\n" + value + "'''"  # the newline after ''' is trimmed by TOML
        if _literal_ok(value) and self.choose("literal string"):
            return "'" + value + "'"
        return basic_string(value)

    def value(self, value: Any, path: Path_) -> None:
        if isinstance(value, dict):
            self.write("{")
            for number, (name, item) in enumerate(value.items()):
                self.write(", " if number else " ")
                self.mark((*path, name))
                self.write(f"{key(name)} = ")
                self.value(item, (*path, name))
            self.write(" }" if value else "}")
        elif isinstance(value, list):
            multiline = bool(value) and self.choose("multi-line array")
            self.write("[")
            for index, item in enumerate(value):
                if multiline:
                    self.write("\n  # element\n  " if self.choose("comment") else "\n  ")
                elif index:
                    self.write(", ")
                self.mark((*path, index))
                self.value(item, (*path, index))
                if multiline:
                    self.write(",")
            self.write("\n]" if multiline else "]")
        else:
            self.write(self.scalar(value))

    def document(self, data: dict[str, Any]) -> str:
        self.table(data, (), header=None)
        return self.text()

    def table(self, data: dict[str, Any], path: Path_, header: str | None) -> None:
        sections: list[tuple[str, Any]] = []
        for name, value in data.items():
            here = (*path, name)
            if isinstance(value, dict) and self.choose("section table"):
                sections.append((name, value))
            elif (
                isinstance(value, list)
                and value
                and all(isinstance(v, dict) for v in value)
                and self.choose("array of tables")
            ):
                sections.append((name, value))
            elif (
                isinstance(value, dict)
                and value
                and all(not isinstance(v, dict) for v in value.values())
                and self.choose("dotted keys")
            ):
                for sub, item in value.items():
                    self.mark(here)
                    self.mark((*here, sub))
                    self.write(f"{key(name)}.{key(sub)} = ")
                    self.value(item, (*here, sub))
                    self.write("\n")
            else:
                self.mark(here)
                self.write(f"{key(name)} = ")
                self.value(value, here)
                self.write("  # trailing comment\n" if self.choose("comment") else "\n")
        for name, value in sections:
            here = (*path, name)
            title = f"{header}.{key(name)}" if header else key(name)
            if isinstance(value, dict):
                self.write("\n")
                self.mark(here)
                self.write(f"[{title}]\n")
                self.table(value, here, title)
            else:
                for index, element in enumerate(value):
                    self.write("\n")
                    self.mark(here)
                    self.mark((*here, index))
                    self.write(f"[[{title}]]\n")
                    self.table(element, (*here, index), title)
