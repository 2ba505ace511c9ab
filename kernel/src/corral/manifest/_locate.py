"""Where each field of a TOML document is written: a map from dotted path to line number.

tomllib parses the document (and rejects bad syntax) but keeps no positions, so this module
re-reads the source of an already valid document and records the line of every key, table
header and array element. Errors then point at ``corral.toml:12`` instead of just a field.
"""

from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass

from corral.sdk.sections import format_path

__all__ = ["Location", "Path_", "field_lines", "format_path"]

Path_ = tuple[str | int, ...]
"""A field path: table keys and array indexes, e.g. ("logs", "sinks", 0, "path")."""

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}\n#")


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file and line, or a command-line override."""

    file: str
    line: int | None = None
    override: str | None = None

    def prefix(self) -> str:
        """Return the ``file:line`` (or ``file (--set ...)``) part of a problem message."""
        if self.override is not None:
            return f"{self.file} ({self.override})"
        return f"{self.file}:{self.line if self.line is not None else 1}"


class _Scanner:
    """A reader for valid TOML that records the line each key and array element starts on."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [i for i, c in enumerate(text) if c == "\n"]
        self.lines: dict[Path_, int] = {}
        self.array_tables: dict[Path_, int] = {}

    def line(self) -> int:
        return bisect.bisect_left(self.newlines, self.pos) + 1

    def peek(self, count: int = 1) -> str:
        return self.text[self.pos : self.pos + count]

    def skip_space(self, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#" and newlines:
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def record(self, path: Path_, line: int) -> None:
        self.lines.setdefault(path, line)

    def scan(self) -> dict[Path_, int]:
        prefix: Path_ = ()
        while True:
            self.skip_space(newlines=True)
            if self.pos >= len(self.text):
                return self.lines
            line = self.line()
            if self.peek(2) == "[[":
                self.pos += 2
                key = self.read_key()
                self.pos = self.text.index("]]", self.pos) + 2
                table = (*self.resolve(key[:-1]), key[-1])
                index = self.array_tables.get(table, -1) + 1
                self.array_tables[table] = index
                self.record_prefixes(table, line)
                prefix = (*table, index)
                self.record(prefix, line)
            elif self.peek() == "[":
                self.pos += 1
                key = self.read_key()
                self.pos = self.text.index("]", self.pos) + 1
                prefix = self.resolve(key)
                self.record_prefixes(prefix, line)
            else:
                self.key_value(prefix)
            self.skip_to_line_end()

    def skip_to_line_end(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1

    def resolve(self, key: tuple[str, ...]) -> Path_:
        """Map a header key to a path, stepping into the last element of arrays of tables."""
        path: Path_ = ()
        for part in key:
            path = (*path, part)
            if path in self.array_tables:
                path = (*path, self.array_tables[path])
        return path

    def record_prefixes(self, path: Path_, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.record(path[:end], line)

    def key_value(self, prefix: Path_) -> None:
        line = self.line()
        path = (*prefix, *self.read_key())
        self.record_prefixes(path, line)
        self.skip_space(newlines=False)
        self.pos += 1  # "="
        self.skip_space(newlines=False)
        self.value(path)

    def read_key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.skip_space(newlines=False)
            char = self.peek()
            if char in "\"'":
                start = self.pos
                self.skip_string()
                parts.append(tomllib.loads(f"k = {self.text[start : self.pos]}")["k"])
            else:
                start = self.pos
                while self.pos < len(self.text) and self.text[self.pos] in _BARE_KEY:
                    self.pos += 1
                parts.append(self.text[start : self.pos])
            self.skip_space(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    def skip_string(self) -> None:
        text = self.text
        quote = text[self.pos]
        if text.startswith(quote * 3, self.pos):
            self.pos += 3
            while not text.startswith(quote * 3, self.pos):
                self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
            self.pos += 3
            # A closing delimiter may be preceded by up to two quotes that belong to the value.
            for _ in range(2):
                if self.peek() == quote:
                    self.pos += 1
            return
        self.pos += 1
        while text[self.pos] != quote:
            self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
        self.pos += 1

    def value(self, path: Path_) -> None:
        char = self.peek()
        if char in "\"'":
            self.skip_string()
        elif char == "[":
            self.pos += 1
            index = 0
            while True:
                self.skip_space(newlines=True)
                if self.peek() == "]":
                    self.pos += 1
                    return
                self.record((*path, index), self.line())
                self.value((*path, index))
                self.skip_space(newlines=True)
                if self.peek() == ",":
                    self.pos += 1
                index += 1
        elif char == "{":
            self.pos += 1
            while True:
                self.skip_space(newlines=False)
                if self.peek() == "}":
                    self.pos += 1
                    return
                self.key_value(path)
                self.skip_space(newlines=False)
                if self.peek() == ",":
                    self.pos += 1
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in _SCALAR_END:
                self.pos += 1


def field_lines(text: str) -> dict[Path_, int]:
    """Return the line of every key, table and array element of the valid TOML ``text``.

    Best effort by design: a document tomllib accepted is always scanned fully (the tests fuzz
    this), but should the scanner ever trip, errors lose their line numbers, not their content.
    """
    try:
        return _Scanner(text).scan()
    except (IndexError, ValueError, tomllib.TOMLDecodeError):
        return {}
