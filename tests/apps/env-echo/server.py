"""A dependency-free HTTP server for the several-hosts tests and bench: `python3 server.py PORT`
answers every GET with "$APP $TOKEN" ("?" and "-" when unset), one line, and says which
instance it is in an X-Instance header ($CORRAL_INSTANCE); it says so once on stdout when it
serves."""

import http.server
import os
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{os.environ.get('APP', '?')} {os.environ.get('TOKEN', '-')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", os.environ.get("CORRAL_INSTANCE", "?"))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer's own asks the resolver for its name (getfqdn): seconds where no
        # resolver answers, as in the test hosts' sandboxes
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "env-echo", int(self.server_address[1])


server = Server(("0.0.0.0", int(sys.argv[1])), Handler)
print(f"{os.environ.get('CORRAL_INSTANCE', '?')} serving on port {sys.argv[1]}", flush=True)
server.serve_forever()
