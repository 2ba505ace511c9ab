"""Cutting a byte stream into lines: partial lines wait, over-long lines are split and marked."""

from __future__ import annotations

DEFAULT_MAX_LINE = 64 * 1024


def _cut(data: bytes, cap: int) -> int:
    """An index <= cap that does not split a UTF-8 sequence (falls back to cap)."""
    i = cap
    # step back over continuation bytes (10xxxxxx) so the next piece starts on a character
    while i > cap - 4 and i > 0 and (data[i] & 0xC0) == 0x80:
        i -= 1
    return i if i > 0 else cap


class LineFramer:
    """Feed raw chunks, get complete lines; a line longer than ``max_line`` is split into
    pieces, all but the last marked partial (the next record of the stream continues it)."""

    __slots__ = ("max_line", "pending")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.pending = b""

    def feed(self, data: bytes) -> tuple[list[bytes], frozenset[int]]:
        """Lines completed by ``data`` (without newlines) and the indices of partial pieces."""
        if self.pending:
            data = self.pending + data
        nl = data.rfind(b"\n")
        if nl < 0:
            self.pending = data
            if len(data) <= self.max_line:
                return [], frozenset()
            return self._drain_long()
        self.pending = data[nl + 1 :]
        lines = data[:nl].split(b"\n")
        # one C-level pass tells whether the slow path is needed at all
        if max(map(len, lines)) <= self.max_line:
            if len(self.pending) <= self.max_line:
                return lines, frozenset()
            more, more_partial = self._drain_long()
            n = len(lines)
            return lines + more, frozenset(n + i for i in more_partial)
        out: list[bytes] = []
        partial: set[int] = set()
        for line in lines:
            while len(line) > self.max_line:
                k = _cut(line, self.max_line)
                partial.add(len(out))
                out.append(line[:k])
                line = line[k:]
            out.append(line)
        if len(self.pending) > self.max_line:
            more, more_partial = self._drain_long()
            n = len(out)
            out += more
            partial.update(n + i for i in more_partial)
        return out, frozenset(partial)

    def feed_block(self, data: bytes) -> tuple[bytes | None, list[bytes], frozenset[int]]:
        """Like :meth:`feed`, without building per-line objects when it can: returns
        ``(block, [], {})`` with ``block`` the complete lines joined by newlines (no final
        newline) when no line exceeds the cap, else ``(None, lines, partial)``."""
        if self.pending:
            data = self.pending + data
        nl = data.rfind(b"\n")
        if nl < 0 or len(data) - nl - 1 > self.max_line or self._maybe_long(data, nl):
            self.pending = b""
            lines, partial = self.feed(data)
            return None, lines, partial
        self.pending = data[nl + 1 :]
        return data[:nl], [], frozenset()

    def _maybe_long(self, data: bytes, end: int) -> bool:
        """Whether a line in ``data[:end]`` may exceed the cap: a line of more than ``cap``
        bytes contains a whole newline-free aligned block of ``(cap + 1) // 2`` bytes, so
        checking those blocks (a few ``find`` calls per MiB) rules long lines out."""
        h = (self.max_line + 1) // 2
        if end <= self.max_line:
            return False
        return any(data.find(b"\n", k, k + h) < 0 for k in range(0, end - h + 1, h))

    def _drain_long(self) -> tuple[list[bytes], frozenset[int]]:
        out: list[bytes] = []
        data = self.pending
        while len(data) > self.max_line:
            k = _cut(data, self.max_line)
            out.append(data[:k])
            data = data[k:]
        self.pending = data
        return out, frozenset(range(len(out)))

    def flush(self, *, final: bool) -> tuple[list[bytes], frozenset[int]]:
        """The unterminated rest: partial when the stream goes on (idle), whole when it ended."""
        if not self.pending:
            return [], frozenset()
        rest, self.pending = self.pending, b""
        return [rest], frozenset() if final else frozenset({0})
