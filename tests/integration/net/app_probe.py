"""Runs inside an app's network namespace as an unprivileged uid (stdlib only).

``probe``: read a JSON list of actions from argv[2], print a JSON list of results.
``serve``: listen (dual-stack TCP and UDP) on the given ports, answer "<tag>:<port>".
"""

import errno
import json
import socket
import sys
import threading
import time


def _err(exc):
    return errno.errorcode.get(exc.errno, str(exc)) if getattr(exc, "errno", None) else repr(exc)


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(action):
    host, port = action["host"], action["port"]
    started = time.monotonic()
    try:
        if not host[0].isdigit() and ":" not in host:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            host = infos[0][4][0]
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.settimeout(action.get("timeout", 3))
            s.connect((host, port))
            data = s.recv(100).decode().strip()
            result = "ok:" + data
    except socket.gaierror as exc:
        result = "gaierror:" + str(exc)
    except OSError as exc:
        result = _err(exc) if not isinstance(exc, socket.timeout) else "timeout"
    return {"result": result, "seconds": time.monotonic() - started, "to": host}


def udp(action):
    host, port = action["host"], action["port"]
    try:
        with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
            s.settimeout(action.get("timeout", 1))
            s.connect((host, port))
            s.send(b"ping")
            return {"result": "ok:" + s.recv(100).decode().strip()}
    except OSError as exc:
        return {"result": _err(exc) if not isinstance(exc, socket.timeout) else "timeout"}


def open_socket(action):
    families = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "packet": socket.AF_PACKET}
    types = {"raw": socket.SOCK_RAW, "dgram": socket.SOCK_DGRAM}
    try:
        socket.socket(families[action["family"]], types[action["type"]], action["proto"]).close()
        return {"result": "ok"}
    except OSError as exc:
        return {"result": _err(exc)}


def resolve(action):
    try:
        infos = socket.getaddrinfo(action["name"], 1, type=socket.SOCK_STREAM)
        return {"result": sorted({i[4][0] for i in infos})}
    except socket.gaierror as exc:
        return {"result": "gaierror:" + str(exc)}


def serve(tcp_ports, udp_ports, tag):
    def tcp_loop(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        s.listen(64)
        return s

    def udp_loop(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        return s

    def accept_forever(s, port):
        while True:
            conn, _ = s.accept()
            try:
                conn.sendall(f"{tag}:{port}\n".encode())
            finally:
                conn.close()

    def answer_forever(s, port):
        while True:
            _data, peer = s.recvfrom(100)
            s.sendto(f"{tag}:{port}\n".encode(), peer)

    threads = []
    for port in tcp_ports:
        threads.append(threading.Thread(target=accept_forever, args=(tcp_loop(port), port),
                                        daemon=True))
    for port in udp_ports:
        threads.append(threading.Thread(target=answer_forever, args=(udp_loop(port), port),
                                        daemon=True))
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        def ports(text):
            return [int(p) for p in text.split(",") if p]

        serve(ports(sys.argv[2]), ports(sys.argv[3]), sys.argv[4])
    else:
        handlers = {"connect": connect, "udp": udp, "socket": open_socket, "resolve": resolve}
        print(json.dumps([handlers[a["op"]](a) for a in json.loads(sys.argv[2])]))
