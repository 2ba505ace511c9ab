"""A real backend process for lb tests: a tiny HTTP/1.1 keep-alive server that names itself.

Usage: python lb_backend.py ID PORT [--delay-start S] [--tcp-echo]
  GET /            -> 200, body "ID"
  GET /slow?ms=N   -> 200 after N ms
  GET /chunked     -> 200, chunked body "ID" in two chunks
  POST /echo       -> 200, echoes the body (Content-Length or chunked request)
  GET /fail        -> 500
With LISTEN_FDS=1 (systemd socket activation) it serves the inherited fd 3 instead of PORT.
--tcp-echo serves a raw TCP echo that prefixes each connection's first reply with "ID:".
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time


async def handle_http(ident: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, rest = head.partition(b"\r\n")
            _, target, _ = line.split(b" ", 2)
            lower = rest.lower()
            body = b""
            if b"content-length:" in lower:
                n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(n)
            elif b"transfer-encoding: chunked" in lower:
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    parts.append(await reader.readexactly(size))
                    await reader.readexactly(2)
                body = b"".join(parts)
            status = b"200 OK"
            payload = ident
            if target.startswith(b"/slow"):
                ms = int(target.split(b"ms=")[1]) if b"ms=" in target else 100
                await asyncio.sleep(ms / 1000)
            elif target == b"/fail":
                status, payload = b"500 Internal Server Error", b"fail"
            elif target == b"/echo":
                payload = body
            if target == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(ident), ident)
                             + b"3\r\n-ok\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
            if b"connection: close" in lower:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def handle_echo(ident: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    first = True
    try:
        while data := await reader.read(65536):
            writer.write((ident + b":" if first else b"") + data)
            first = False
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    ident, port = sys.argv[1].encode(), int(sys.argv[2])
    if "--delay-start" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--delay-start") + 1]))
    handler = handle_echo if "--tcp-echo" in sys.argv else handle_http

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handler(ident, r, w)

    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        sock = socket.socket(fileno=3)
        server = await asyncio.start_server(serve, sock=sock)
    else:
        server = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
