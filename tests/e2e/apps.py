"""Small real apps written into a test's directory."""

from __future__ import annotations

import textwrap
from pathlib import Path

# The one free_port is corral.testing's; named here too for the tests that import it from here.
from corral.testing import free_port as free_port

SERVER = textwrap.dedent('''
    import http.server, os, socket, sys, time
    delay = float(os.environ.get("START_DELAY", "0"))
    time.sleep(delay)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ["CORRAL_INSTANCE"] + "\\n").encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
    n = os.environ.get("NOTIFY_SOCKET")
    if n and os.environ.get("USE_NOTIFY"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b"READY=1", n)
    srv.serve_forever()
''')


def write_app(d: Path, name: str, ports: dict[str, int], processes: dict[str, str],
              extra: str = "") -> Path:
    """An app directory with a corral.toml and server.py."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.py").write_text(SERVER)
    lines = ["[app]", f'name = "{name}"', "[ports]"]
    lines += [f"{k} = {v}" for k, v in ports.items()]
    lines += ["[processes]"] + [f"{k} = {v}" for k, v in processes.items()]
    (d / "corral.toml").write_text("\n".join(lines) + "\n" + extra)
    d.chmod(0o755)
    return d
