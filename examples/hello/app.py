"""hello: a tiny HTTP app speaking corral's contract with nothing but the standard library.

It uses `corral.app` when that is importable and reads the environment directly otherwise, so
`python3 app.py` works with or without corral installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

try:
    from corral import app as corral_app
except ImportError:  # plain python3: the same contract, read by hand
    corral_app = None  # type: ignore[assignment]


def listen_port() -> int:
    """Return $PORT, else the "http" port of the manifest $CORRAL_MANIFEST names, else 8080."""
    if corral_app is not None and os.environ.get("PORT"):
        return int(corral_app.port())
    if os.environ.get("PORT"):
        return int(os.environ["PORT"])
    manifest = os.environ.get("CORRAL_MANIFEST")
    if manifest:
        with open(manifest, encoding="utf-8") as handle:
            ports: dict[str, int] = json.load(handle)["ports"]
            return int(ports["http"])
    return 8080


def instance_name() -> str:
    """Return $CORRAL_INSTANCE, or "hello" when started by hand."""
    return os.environ.get("CORRAL_INSTANCE", "hello")


def notify_ready() -> None:
    """Send sd_notify READY=1 to $NOTIFY_SOCKET, if corral (or systemd) gave one."""
    if corral_app is not None:
        corral_app.notify_ready()
        return
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(b"READY=1")


class Hello(BaseHTTPRequestHandler):
    """GET / says who answered; GET /healthz says ok."""

    def do_GET(self) -> None:  # the name http.server calls
        if self.path == "/":
            self.answer(200, f"hello from {instance_name()}\n")
        elif self.path == "/healthz":
            self.answer(200, "ok")
        else:
            self.answer(404, "not found\n")

    def answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> int:
    server = ThreadingHTTPServer(("0.0.0.0", listen_port()), Hello)
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    notify_ready()
    print(f"{instance_name()} listening on port {server.server_address[1]}", file=sys.stderr)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
