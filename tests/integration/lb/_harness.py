"""Real processes and real sockets for lb integration tests: backends, clients, a load loop."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BACKEND = Path(__file__).with_name("lb_backend.py")


def backend_argv(ident: str, port: int | str, *extra: str) -> list[str]:
    return [sys.executable, str(BACKEND), ident, str(port), *extra]


def start_backend(ident: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """Start lb_backend.py and wait until it listens."""
    proc = subprocess.Popen(backend_argv(ident, port, *extra), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"ready", f"backend {ident} did not start: {line!r}"
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def backends(*specs: tuple[str, int]) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_backend(i, p) for i, p in specs]
    try:
        yield procs
    finally:
        for p in procs:
            stop(p)


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client over one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> HttpClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def request(self, method: str = "GET", path: str = "/", host: str = "x",
                      body: bytes | None = None, headers: str = "") -> tuple[int, bytes, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}"
        if body is not None and "chunked" not in headers:
            head += f"Content-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        resp_head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(resp_head[9:12])
        lower = resp_head.lower()
        if method == "HEAD":
            return status, resp_head, b""
        if b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            return status, resp_head, b"".join(parts)
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return status, resp_head, await self.reader.readexactly(n)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def get(port: int, path: str = "/", host: str = "x") -> tuple[int, bytes]:
    c = await HttpClient.connect(port)
    try:
        status, _, body = await c.request("GET", path, host)
        return status, body
    finally:
        await c.close()


@dataclass
class Load:
    """Clients requesting in a loop, on keep-alive connections or (``per_request``) on a new
    connection each time; every failure is recorded, none retried."""

    port: int
    clients: int = 8
    per_request: bool = False
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    served_by: Counter[bytes] = field(default_factory=Counter)
    last: dict[int, bytes] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def _client(self, i: int) -> None:
        c: HttpClient | None = None
        while not self._stop.is_set():
            try:
                if c is None:
                    c = await HttpClient.connect(self.port)
                status, _, body = await asyncio.wait_for(c.request(), 5)
                if status != 200:
                    self.failures.append(f"client {i}: status {status} {body!r}")
                else:
                    self.ok += 1
                    self.served_by[body] += 1
                    self.last[i] = body
                if self.per_request:
                    await c.close()
                    c = None
            except Exception as e:
                self.failures.append(f"client {i}: {type(e).__name__}: {e}")
                if c is not None:
                    await c.close()
                c = None
                await asyncio.sleep(0.01)
        if c is not None:
            await c.close()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
