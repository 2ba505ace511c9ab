import http.server, os, sys, json
print("starting", flush=True)
print(json.dumps({"level": "info", "msg": "structured"}), flush=True)
try:
    1/0
except ZeroDivisionError:
    import traceback; traceback.print_exc()
sys.stderr.flush()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("GET", self.path, flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
