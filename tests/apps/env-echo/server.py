"""A dependency-free HTTP server for the several-hosts tests and bench: `python3 server.py PORT`
answers every GET with "$APP $TOKEN" ("?" and "-" when unset), one line."""

import http.server
import os
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{os.environ.get('APP', '?')} {os.environ.get('TOKEN', '-')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
