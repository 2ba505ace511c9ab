"""Real receivers for testing sinks: syslog (UDP, TCP, unix), Loki push (HTTP), journald.

Each runs on a thread, records what arrived, and can be stopped and started again on the same
address (to simulate an outage).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SyslogReceiver:
    """Collects syslog messages: datagrams as they come, streams de-framed (octet counting)."""

    def __init__(self, kind: str, path: str | None = None) -> None:
        self.kind = kind  # "udp", "tcp", "unix" (datagram)
        self.path = path
        self.messages: list[bytes] = []
        self.port = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []

    @property
    def address(self) -> str:
        """The sink address of this receiver."""
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"{self.kind}://127.0.0.1:{self.port}"

    def start(self) -> SyslogReceiver:
        """Bind (on the same port as before after a stop) and serve."""
        self._stop.clear()
        if self.kind == "unix":
            assert self.path is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(self.path)
        else:
            typ = socket.SOCK_DGRAM if self.kind == "udp" else socket.SOCK_STREAM
            s = socket.socket(socket.AF_INET, typ)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            self.port = s.getsockname()[1]
            if self.kind == "tcp":
                s.listen(16)
        s.settimeout(0.1)
        self._sock = s
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        self._threads = [t]
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                if self.kind == "tcp":
                    conn, _ = self._sock.accept()
                    self._conns.append(conn)
                    t = threading.Thread(target=self._serve_stream, args=(conn,), daemon=True)
                    t.start()
                    self._threads.append(t)
                else:
                    data = self._sock.recv(1 << 17)
                    with self._lock:
                        self.messages.append(data)
            except (TimeoutError, OSError):
                continue

    def _serve_stream(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            while True:
                sp = buf.find(b" ")
                if sp < 0:
                    break
                n = int(buf[:sp])
                if len(buf) < sp + 1 + n:
                    break
                with self._lock:
                    self.messages.append(buf[sp + 1 : sp + 1 + n])
                buf = buf[sp + 1 + n :]
        conn.close()

    def stop(self) -> None:
        """Stop receiving and close every socket (connected senders see the close)."""
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._conns = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``n`` messages arrived; all messages so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < n:
            time.sleep(0.01)
        with self._lock:
            return list(self.messages)


class LokiReceiver:
    """An HTTP server accepting Loki push requests; keeps the decoded bodies."""

    def __init__(self, status: int = 204) -> None:
        self.pushes: list[dict[str, Any]] = []
        self.status = status
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The push URL."""
        return f"http://127.0.0.1:{self.port}/loki/api/v1/push"

    def start(self) -> LokiReceiver:
        """Serve (on the same port as before after a stop)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/loki/api/v1/push" and (
                    self.headers.get("Content-Type") == "application/json"
                )
                if ok and receiver.status < 300:
                    receiver.pushes.append(json.loads(body))
                self.send_response(receiver.status if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def lines(self) -> list[tuple[dict[str, str], str, str]]:
        """(labels, timestamp, line) of every value received, in arrival order."""
        return [
            (s["stream"], v[0], v[1])
            for p in self.pushes
            for s in p["streams"]
            for v in s["values"]
        ]


class JournalReceiver(SyslogReceiver):
    """A unix datagram socket speaking journald's native protocol; entries as dicts."""

    def __init__(self, path: str) -> None:
        super().__init__("unix", path)

    def entries(self) -> list[dict[str, str]]:
        """Decoded entries (KEY=VALUE and the binary-safe KEY\\n<len><value> form)."""
        out = []
        for msg in list(self.messages):
            fields: dict[str, str] = {}
            i = 0
            while i < len(msg):
                nl = msg.index(b"\n", i)
                line = msg[i:nl]
                if b"=" in line:
                    k, _, v = line.partition(b"=")
                    fields[k.decode()] = v.decode()
                    i = nl + 1
                else:
                    (n,) = struct.unpack("<Q", msg[nl + 1 : nl + 9])
                    fields[line.decode()] = msg[nl + 9 : nl + 9 + n].decode()
                    i = nl + 9 + n + 1
            out.append(fields)
        return out
