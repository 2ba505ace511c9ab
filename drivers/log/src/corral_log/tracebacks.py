"""Recognising multi-line stack traces on stderr and grouping them by fingerprint.

Each language is a small detector (a state machine over lines): ``start`` says whether a line
opens a trace, ``more`` whether the next line belongs to it. A :class:`TraceCollector` runs the
detectors over one stream and hands out finished :class:`Trace` objects. The fingerprint is the
exception type plus the frames normalised (no line numbers, columns, addresses, offsets or
messages), so the same bug with different messages or after an unrelated edit groups together.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class Step(Enum):
    """What a detector says about the next line of an open trace."""

    TAKE = 1  # the line belongs to the trace, which continues
    TAKE_END = 2  # the line belongs to the trace, which is now complete
    END = 3  # the line does not belong; the trace ended before it


@dataclass
class Trace:
    """One recognised stack trace."""

    language: str
    type: str
    message: str
    frames: list[str]
    lines: list[str] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """Stable id of the error group: language, type and normalised frames."""
        h = hashlib.sha256(f"{self.language}\0{self.type}\0".encode())
        h.update("\0".join(self.frames).encode())
        return h.hexdigest()[:16]

    @property
    def text(self) -> str:
        """The trace as it was written."""
        return "\n".join(self.lines)


_HEX = re.compile(r"0x[0-9a-fA-F]+")
_NUM = re.compile(r"\d+")


class Detector(Protocol):
    """A language's trace grammar."""

    language: str

    def start(self, line: str) -> bool:
        """Whether ``line`` opens a trace (the detector then owns the following lines)."""

    def more(self, line: str) -> Step:
        """Whether ``line`` continues the open trace."""

    def finish(self, lines: list[str]) -> Trace | None:
        """The trace made of ``lines``, or None if they were not one after all."""


# ---- Python -----------------------------------------------------------------------------------

_PY_START = "Traceback (most recent call last):"
_PY_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line \d+(?:, in (?P<func>.+))?$')
_PY_EXC = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<msg>.*))?$")
_PY_CHAIN = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


class PythonDetector:
    """``Traceback (most recent call last):`` ... ``  File ...`` ... ``Type: message``;
    chained exceptions (``During handling ...``) stay in one trace."""

    language = "python"

    def __init__(self) -> None:
        self._after_exc = False

    def start(self, line: str) -> bool:
        """A trace opens on the ``Traceback`` header."""
        self._after_exc = False
        return line.rstrip() == _PY_START

    def more(self, line: str) -> Step:
        """Indented lines continue; the unindented exception line may be followed by a chain."""
        s = line.rstrip()
        if self._after_exc:
            if s == "" or s in _PY_CHAIN or s == _PY_START:
                if s == _PY_START:
                    self._after_exc = False
                return Step.TAKE
            return Step.END
        if s == "" or line[:1] in (" ", "\t") or s == _PY_START:
            return Step.TAKE
        self._after_exc = True
        return Step.TAKE

    def finish(self, lines: list[str]) -> Trace | None:
        """Type and message of the last exception in the chain; frames of all of it."""
        while lines and not lines[-1].strip():
            lines.pop()
        frames = []
        for ln in lines:
            m = _PY_FRAME.match(ln)
            if m:
                frames.append(f"{m['file']}:{m['func'] or '?'}")
        exc = next((ln for ln in reversed(lines) if ln[:1] not in (" ", "\t", "")), "")
        m = _PY_EXC.match(exc.strip()) if exc and exc.strip() != _PY_START else None
        if not frames or m is None:
            return None
        return Trace(self.language, m["type"], m["msg"] or "", frames, lines)


# ---- Java and Node.js: a header line, then "at ..." frames ------------------------------------

_JAVA_HEAD = re.compile(
    r'^(?:Exception in thread "[^"]*" )?(?:Caused by: )?'
    r"(?P<type>(?:[a-zA-Z_$][\w$]*\.)+[\w$]*(?:Exception|Error|Throwable)[\w$]*)(?::\s?(?P<msg>.*))?$"
)
_JAVA_AT = re.compile(r"^\s+at (?P<frame>[\w$./<>]+)\(.*\)$")
_JAVA_MORE = re.compile(r"^\s+\.\.\. \d+ (?:more|common frames omitted)$")


class JavaDetector:
    """``Exception in thread "main" java.lang.X: msg`` then ``\\tat a.b.C.m(C.java:3)`` lines,
    ``Caused by:`` sections and ``... N more``."""

    language = "java"

    def start(self, line: str) -> bool:
        """A fully qualified exception or error type opens a candidate trace."""
        return _JAVA_HEAD.match(line.rstrip()) is not None

    def more(self, line: str) -> Step:
        """Frames, elisions and causes continue."""
        s = line.rstrip()
        if _JAVA_AT.match(s) or _JAVA_MORE.match(s) or s.startswith("Caused by: "):
            return Step.TAKE
        if s.startswith("\tSuppressed: ") or s.startswith("\t\tat "):
            return Step.TAKE
        return Step.END

    def finish(self, lines: list[str]) -> Trace | None:
        """Type of the outermost exception; frames normalised to ``class.method``."""
        m = _JAVA_HEAD.match(lines[0].rstrip())
        frames = [_HEX.sub("", fm["frame"]) for ln in lines if (fm := _JAVA_AT.match(ln.rstrip()))]
        if m is None or not frames:
            return None
        causes = [
            c["type"]
            for ln in lines[1:]
            if (c := _JAVA_HEAD.match(ln.rstrip())) and ln.startswith("Caused by: ")
        ]
        typ = m["type"] + "".join(f" <- {c}" for c in causes)
        return Trace(self.language, typ, m["msg"] or "", frames, lines)


_NODE_HEAD = re.compile(
    r"^(?:Uncaught )?(?P<type>[A-Z][\w$]*(?:Error|Exception)|Error)(?: \[(?P<code>[A-Z_0-9]+)\])?"
    r"(?::\s?(?P<msg>.*))?$"
)
_NODE_AT = re.compile(r"^\s+at (?:(?P<func>.+?) \((?P<loc>.+)\)|(?P<bare>.+))$")
_LOC = re.compile(r":\d+(?::\d+)?$")


class NodeDetector:
    """``TypeError: msg`` then ``    at fn (file.js:3:9)`` lines (V8's stack format)."""

    language = "node"

    def start(self, line: str) -> bool:
        """An Error-like header opens a candidate trace."""
        return _NODE_HEAD.match(line.rstrip()) is not None

    def more(self, line: str) -> Step:
        """Indented ``at`` lines continue."""
        return (
            Step.TAKE if _NODE_AT.match(line.rstrip()) and line.startswith("    at ") else Step.END
        )

    def finish(self, lines: list[str]) -> Trace | None:
        """Type (with an error code if any); frames as ``function@file`` without positions."""
        m = _NODE_HEAD.match(lines[0].rstrip())
        frames = []
        for ln in lines[1:]:
            fm = _NODE_AT.match(ln.rstrip())
            if fm is None:
                continue
            loc = _LOC.sub("", fm["loc"] or fm["bare"] or "")
            frames.append(f"{fm['func'] or ''}@{loc}")
        if m is None or not frames:
            return None
        typ = m["type"] + (f" [{m['code']}]" if m["code"] else "")
        return Trace(self.language, typ, m["msg"] or "", frames, lines)


# ---- Go ---------------------------------------------------------------------------------------

_GO_START = re.compile(r"^(?:panic: |fatal error: )(?P<msg>.*)$")
_GO_GOROUTINE = re.compile(r"^goroutine \d+ \[.*\]:$")
_GO_FUNC = re.compile(
    r"^(?:created by )?(?P<func>[\w./*()\[\]{}$-]+?)(?:\(.*\))?(?: in goroutine \d+)?$"
)
_GO_ERRTYPE = re.compile(r"^(?P<type>[\w.*]+)(?:\{.*\}|\(.*\))?$")


class GoDetector:
    """``panic: msg`` / ``fatal error: msg``, then ``goroutine N [running]:`` and pairs of
    ``pkg.func(args)`` / ``\\t/path/file.go:12 +0x1d`` lines, maybe ``exit status 2``."""

    language = "go"

    def start(self, line: str) -> bool:
        """``panic:`` or ``fatal error:`` opens a trace."""
        return _GO_START.match(line.rstrip()) is not None

    def more(self, line: str) -> Step:
        """Goroutine headers, function lines, tab-indented file lines and blanks continue."""
        s = line.rstrip()
        if s.startswith("exit status "):
            return Step.TAKE_END
        if (
            s == ""
            or line.startswith("\t")
            or _GO_GOROUTINE.match(s)
            or s.startswith("[")
            or s.startswith("panic: ")
            or s.startswith("created by ")
            or s.startswith("goroutine ")
            or _GO_FUNC.match(s)
        ):
            return Step.TAKE
        return Step.END

    def finish(self, lines: list[str]) -> Trace | None:
        """Type from the panic value (numbers stripped); frames are function names."""
        while lines and not lines[-1].strip():
            lines.pop()
        m = _GO_START.match(lines[0].rstrip())
        if m is None:
            return None
        frames = []
        in_stack = False
        for ln in lines[1:]:
            s = ln.rstrip()
            if _GO_GOROUTINE.match(s):
                if in_stack:
                    break  # only the panicking goroutine's frames make the fingerprint
                in_stack = True
                continue
            if in_stack and s and not ln.startswith("\t") and (fm := _GO_FUNC.match(s)):
                frames.append(_HEX.sub("", fm["func"]))
        if not frames:
            return None
        msg = m["msg"]
        kind = "fatal error" if lines[0].startswith("fatal error") else "panic"
        if msg.startswith("runtime error: "):
            typ = f"{kind}: " + _NUM.sub("N", msg.split(" [")[0])
        else:
            typ = f"{kind}: " + _NUM.sub("N", _HEX.sub("0x", msg))[:80]
        return Trace(self.language, typ, msg, frames, lines)


def default_detectors() -> list[Detector]:
    """The detectors run on stderr, most specific first."""
    return [PythonDetector(), GoDetector(), JavaDetector(), NodeDetector()]


class TraceCollector:
    """Runs detectors over the lines of one stream and returns the traces they complete."""

    def __init__(self, detectors: list[Detector] | None = None, max_lines: int = 500) -> None:
        self.detectors = detectors if detectors is not None else default_detectors()
        self.max_lines = max_lines
        self._open: Detector | None = None
        self._lines: list[str] = []

    def feed(self, line: str) -> list[Trace]:
        """Consume one line; traces completed by it (usually none)."""
        out: list[Trace] = []
        if self._open is not None:
            step = self._open.more(line) if len(self._lines) < self.max_lines else Step.END
            if step is Step.TAKE:
                self._lines.append(line)
                return out
            if step is Step.TAKE_END:
                self._lines.append(line)
                out.extend(self.flush())
                return out
            out.extend(self.flush())
        for d in self.detectors:
            if d.start(line):
                self._open = d
                self._lines = [line]
                break
        return out

    def flush(self) -> list[Trace]:
        """Finish the open trace (idle stream, instance exit)."""
        if self._open is None:
            return []
        d, lines = self._open, self._lines
        self._open, self._lines = None, []
        t = d.finish(lines)
        return [t] if t is not None else []
