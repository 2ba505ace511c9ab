"""The lb driver through the real kernel: `corral up`/`down` with the net, fs, lb, log drivers.

Every app instance gets its own network namespace and address from the net driver, so two
instances of one process listen on the same port side by side and the lb balances them.
Each kernel gets its own address pools, nft table names, netns and link prefixes (a random
tag), so kernels of other test sessions on this machine never touch its state, nor it theirs.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.testing import (
    KernelProcess,
    NetHost,
    drivers_running,
    free_port,
    new_net_host,
    running_kernel,
    wait_for,
)

pytestmark = pytest.mark.root

DRIVERS = ("net", "fs", "lb", "log")

# An HTTP/1.1 keep-alive server on every address of its namespace (v4 and v6): answers
# /healthz with 200 and anything else with "<instance id> <VERSION>".
WEB = textwrap.dedent('''
    import http.server, os, socket, socketserver, sys, time
    # when this process was exec'd, on the wall clock (/proc: ticks since boot, same clock
    # as /proc/uptime; psutil's create_time rounds the boot time to whole seconds)
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    age = float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    t0 = time.time() - age
    time.sleep(float(os.environ.get("START_DELAY", "0")))
    iid = os.environ.get("CORRAL_INSTANCE_ID", os.environ.get("CORRAL_INSTANCE", "?"))
    version = os.environ.get("VERSION", "1")
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = (f"{iid} {version}\\n" if self.path != "/healthz" else "ok\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 256
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    srv = S(("::", int(os.environ["PORT"])), H)
    data = os.environ.get("CORRAL_PATH_DATA")
    if data:  # when the app listens, for the on-demand figures
        with open(os.path.join(data, "started"), "a") as f:
            f.write(f"{iid} {t0} {time.time()}\\n")
    srv.serve_forever()
''')


def _libnftables() -> bool:
    try:
        import nftables

        nftables.Nftables()
        return True
    except Exception:
        return False


def require_net() -> None:
    """Everything the deployed net and lb drivers need on this host."""
    require(shutil.which("nft") is not None, "nftables (nft)")
    require(shutil.which("ip") is not None, "iproute2 (ip)")
    require(_libnftables(), "Debian's libnftables1 (python nftables binding)")
    require(os.path.exists("/proc/self/ns/net"), "network namespaces")
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini (fs driver)")
    require(os.path.exists("/usr/bin/python3"), "/usr/bin/python3 (the apps run on it)")



def start_kernel(base: Path, host: NetHost,
                 drivers: tuple[str, ...] = ("net", "fs", "lb", "log")) -> KernelProcess:
    base.mkdir()
    k = KernelProcess(base, host.host_toml(drivers))
    k.start()
    try:
        wait_for(lambda: drivers_running(k, drivers), 20, what=f"drivers {drivers} running")
    except BaseException:
        print(k.log())
        for name in drivers:
            log = k.home / "drivers" / f"{name}.log"
            if log.exists():
                print(name, log.read_text()[-3000:])
        k.teardown()
        raise
    return k


@pytest.fixture
def net_host() -> NetHost:
    require_net()
    return new_net_host()


@pytest.fixture
def kernel(public_dir: Path, net_host: NetHost) -> Iterator[KernelProcess]:
    """A real kernel with the net, fs, lb and log drivers, scoped to ``net_host``."""
    with running_kernel(public_dir / "k", net_host.host_toml(DRIVERS), drivers=DRIVERS) as k:
        yield k


def web_app(d: Path, name: str, port: int, lb: str, *, instances: int = 2,
            extra: str = "", script: str = WEB) -> Path:
    """An app of ``instances`` instances of ``script`` (WEB) on ``port`` behind an ``[lb]``
    section."""
    d.mkdir(parents=True)
    (d / "web.py").write_text(script)
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{name}"
        [ports]
        http = {port}
        [processes]
        web = {{ command = "python3 web.py", port = "http", instances = {instances} }}
        [lb]
    ''').lstrip() + textwrap.dedent(lb).strip() + "\n" + extra)
    for path in (d, *d.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return d


def lb_app(public_dir: Path, name: str, lb_extra: str = "", *, plane: str = "proxy",
           mode: str = "http", health: str = 'http = "/healthz"', rise: int = 1,
           instances: int = 2, extra: str = "") -> tuple[int, int, str, Path]:
    """web_app ``name`` behind a fresh lb name and frontend, health-checked every second
    (``lb_extra``: more lines of its [lb] section): (port, frontend, lb name, directory)."""
    port, front = free_port(), free_port()
    lb_name = f"{name}-{secrets.token_hex(3)}.test"
    d = web_app(public_dir / name, name, port, f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ {health}, interval = "1s", rise = {rise} }}
        plane = "{plane}"
        mode = "{mode}"
    ''' + textwrap.dedent(lb_extra), instances=instances, extra=extra)
    return port, front, lb_name, d


def up(k: KernelProcess, d: Path, *args: str, ok: bool = True) -> dict[str, Any]:
    r = k.cli("up", str(d), "--json", *args, timeout=180)
    if not ok:
        assert r.returncode != 0, r.stdout
        return {"stderr": r.stderr}
    assert r.returncode == 0, f"{r.stderr}\n{k.log()}\n{driver_logs(k)}"
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def driver_logs(k: KernelProcess) -> str:
    out = []
    for log in sorted((k.home / "drivers").glob("*.log")):
        out.append(f"--- {log.name}\n{log.read_text()[-2500:]}")
    return "\n".join(out)


def query(k: KernelProcess, capability: str, name: str, args: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    argv = ["query", capability, name] + ([json.dumps(args)] if args else [])
    r = k.cli(*argv)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def ps(k: KernelProcess) -> list[dict[str, Any]]:
    r = k.cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def http_get(host: str, port: int, lb_name: str, path: str = "/", timeout: float = 5.0) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": lb_name})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        return body
    finally:
        conn.close()


def tcp_get(host: str, port: int, timeout: float = 5.0) -> str:
    """One HTTP/1.0 request over a plain TCP connection (for the L4 frontends)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def lb_backends(k: KernelProcess, app: str) -> dict[str, str]:
    """Backend id -> state, as `corral query lb status` reports them."""
    res = query(k, "lb", "status", {"app": app})
    return {b["id"]: b["state"] for b in res["services"][0]["backends"]}


class Load:
    """Threads doing keep-alive HTTP requests to a frontend until stopped, counting failures."""

    def __init__(self, port: int, lb_name: str, threads: int = 6) -> None:
        self.port, self.lb_name = port, lb_name
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: Counter[str] = Counter()
        self.last: dict[int, str] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self, n: int) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers={"Host": self.lb_name})
                resp = conn.getresponse()
                body = resp.read().decode()
                with self._lock:
                    if resp.status == 200:
                        self.ok += 1
                        self.bodies[body.strip()] += 1
                        self.last[n] = body.strip()
                    else:
                        self.failures.append(f"{time.time():.3f} http {resp.status}: {body!r}")
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    def served_by(self, instance: str) -> bool:
        """Whether ``instance`` answered any request so far."""
        with self._lock:
            return any(b.split()[0] == instance for b in self.bodies)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


# ---- tests ---------------------------------------------------------------------------------


def test_http_proxy_two_instances_status_ledger_and_name_conflict(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """Both instances answer through the HTTP frontend by Host; status, ps and ledger agree;
    a second app claiming the same lb name is refused naming the holder."""
    k = kernel
    port, front, lb_name, d = lb_app(public_dir, "shop")
    res = up(k, d)
    ids = sorted(i["id"] for i in res["instances"])
    assert ids == ["shop.web.1", "shop.web.2"]
    addresses = {i["address"] for i in res["instances"]}
    assert len(addresses) == 2 and "127.0.0.1" not in addresses, res["instances"]
    # instance.started returned once each backend was healthy: both serve at once
    assert lb_backends(k, "shop") == {"shop.web.1": "healthy", "shop.web.2": "healthy"}
    seen = Counter(http_get("127.0.0.1", front, lb_name).split()[0] for _ in range(40))
    assert set(seen) == {"shop.web.1", "shop.web.2"}, seen

    status = query(k, "lb", "status", {"app": "shop"})["services"][0]
    assert status["name"] == lb_name and status["frontend"].endswith(f":{front}")
    assert status["plane"] == "proxy" and status["mode"] == "http"
    apps = {a["app"]: a for a in ps(k)}
    assert {i["state"] for i in apps["shop"]["instances"]} == {"ready"}
    assert "net" in apps["shop"]["drivers"], apps["shop"]

    ledger = json.loads(k.cli("ledger", "--json").stdout)["records"]
    held = {(r["kind"], r["key"]): r["owner"] for r in ledger}
    assert held[("lbname", lb_name)] == "shop"
    assert held[("port", str(front))] == "shop"
    assert held[("port", str(port))] == "shop"
    assert sum(1 for (kind, _), owner in held.items()
               if kind == "address" and owner == "shop") == 2

    # a second app wanting the same name is refused, naming the holder, and holds nothing
    d2 = web_app(public_dir / "copy", "copycat", free_port(), f'''
        name = "{lb_name}"
        frontend = {free_port()}
        mode = "http"
    ''', instances=1)
    err = up(k, d2, ok=False)["stderr"]
    assert f"{lb_name}" in err and "held by app 'shop'" in err, err
    assert k.call("ledger.list", {"owner": "copycat"})["records"] == []
    assert set(Counter(http_get("127.0.0.1", front, lb_name).split()[0]
                       for _ in range(10))) <= {"shop.web.1", "shop.web.2"}

    r = k.cli("down", "shop")
    assert r.returncode == 0, r.stderr
    ledger = json.loads(k.cli("ledger", "--json").stdout)["records"]
    assert [r for r in ledger if r["owner"] == "shop"] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", front), timeout=2).close()


def test_rolling_redeploy_under_load_loses_no_request(kernel: KernelProcess,
                                                      public_dir: Path) -> None:
    """`corral up` again with VERSION=2 while keep-alive clients hammer the frontend: every
    instance is replaced beside the old one (-g2), the lb adds it once healthy and drains the
    old one before the kernel stops it. Zero failed requests; answers switch to version 2."""
    k = kernel
    _, front, lb_name, d = lb_app(public_dir, "roll", rise=2)
    first = up(k, d, "--env", "VERSION=1")
    old_pids = {i["pid"] for i in first["instances"]}
    load = Load(front, lb_name).start()
    try:
        wait_for(lambda: load.ok > 200, 20, what="load running")
        t0, ok_before = time.monotonic(), load.ok
        second = up(k, d, "--env", "VERSION=2")
        redeploy_s = time.monotonic() - t0
        ok_at_switch = load.ok
        during = ok_at_switch - ok_before
        wait_for(lambda: load.ok > ok_at_switch + 300, 20, what="load after the redeploy")
    finally:
        load.stop()
    ids = sorted(i["id"] for i in second["instances"])
    assert ids == ["roll.web.1-g2", "roll.web.2-g2"], second
    assert not old_pids & {i["pid"] for i in second["instances"]}
    print(f"\nrolling redeploy: {redeploy_s:.2f}s, {during} requests during it, {load.ok} in "
          f"all, {len(load.failures)} failed; answers: {dict(load.bodies)}")
    assert load.failures == [], load.failures[:10]
    assert during > 50, "the load did not run through the redeploy"
    assert {b.split()[1] for b in load.bodies} == {"1", "2"}
    # every client ends on the new version, and only new instances answer
    assert set(load.last.values()) <= {"roll.web.1-g2 2", "roll.web.2-g2 2"}, load.last
    assert set(Counter(http_get("127.0.0.1", front, lb_name) for _ in range(20))) == {
        "roll.web.1-g2 2\n", "roll.web.2-g2 2\n"}
    assert lb_backends(k, "roll") == {"roll.web.1-g2": "healthy", "roll.web.2-g2": "healthy"}
    # the old instances' addresses were released by the net driver
    addrs = {r["key"] for r in k.call("ledger.list", {"kind": "address"})["records"]}
    assert addrs == {i["address"] for i in second["instances"]}


def test_scale_up_and_down_under_load_loses_no_request(kernel: KernelProcess,
                                                       public_dir: Path) -> None:
    """`corral scale APP web=3` then `web=1` while keep-alive clients hammer the frontend:
    the new instance joins once healthy, the surplus ones are drained before they stop, the
    one that stays is never restarted. Zero failed requests."""
    k = kernel
    _, front, lb_name, d = lb_app(public_dir, "scale")
    first = up(k, d)
    pid1 = next(i["pid"] for i in first["instances"] if i["id"] == "scale.web.1")
    load = Load(front, lb_name).start()
    try:
        wait_for(lambda: load.ok > 200, 20, what="load running")
        r = k.cli("scale", "scale", "web=3", timeout=120)
        assert r.returncode == 0, r.stderr
        assert lb_backends(k, "scale") == {f"scale.web.{n}": "healthy" for n in (1, 2, 3)}
        wait_for(lambda: load.served_by("scale.web.3"), 20, what="the new instance serving")
        ok_before = load.ok
        r = k.cli("scale", "scale", "web=1", timeout=120)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: load.ok > ok_before + 300, 20, what="load after scaling down")
    finally:
        load.stop()
    print(f"\nscale 2 -> 3 -> 1: {load.ok} requests, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:10]
    assert lb_backends(k, "scale") == {"scale.web.1": "healthy"}
    [inst] = instances_of(k, "scale")
    assert inst["id"] == "scale.web.1" and inst["pid"] == pid1
    assert set(Counter(http_get("127.0.0.1", front, lb_name).split()[0]
                       for _ in range(10))) == {"scale.web.1"}


def host_addresses4() -> list[str]:
    """The host's own IPv4 addresses besides loopback (eth0 and the like)."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    return [a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])
            if not a["local"].startswith("127.") and link["ifname"] != "lo"
            and not link["ifname"].startswith("z")]


def test_nft_plane_tcp_from_loopback_and_host_address(kernel: KernelProcess,
                                                      public_dir: Path) -> None:
    """Kernel DNAT: the frontend answers on 127.0.0.1 and on the host's address, and both
    backends get connections; the host's loopback connections go straight to an instance
    (translated at connect()), also after a kill -9 of the lb driver, whose program goes with
    it; `corral down` removes the service and the lb's table."""
    k = kernel
    port, front, _, d = lb_app(public_dir, "dnat", 'policy = "round-robin"\n',
                               plane="nft", mode="tcp", health="tcp = true")
    up(k, d)
    assert lb_backends(k, "dnat") == {"dnat.web.1": "healthy", "dnat.web.2": "healthy"}
    status = query(k, "lb", "status", {"app": "dnat"})["services"][0]
    assert status["plane"] == "nft"
    table = KernelTable(k)
    assert table.exists(), "the lb's nft table was not created"
    targets = ["127.0.0.1", *host_addresses4()]
    require(len(targets) > 1, "a non-loopback IPv4 address on the host")
    for host in targets:
        seen = Counter(tcp_get(host, front).split()[0] for _ in range(20))
        assert set(seen) == {"dnat.web.1", "dnat.web.2"}, (host, seen)

    addresses = {(i["address"], port) for i in instances_of(k, "dnat")}

    def loopback_peer() -> tuple[str, int]:
        with socket.create_connection(("127.0.0.1", front), timeout=5) as c:
            host, peer_port = c.getpeername()[:2]
            return str(host), int(peer_port)

    assert status["socket_lb"] == [f"127.0.0.1:{front}"]
    assert loopback_peer() in addresses  # no NAT: connected to the instance itself
    lb_pid = next(d["pid"] for d in k.call("drivers.list")["drivers"] if d["name"] == "lb")
    os.kill(lb_pid, signal.SIGKILL)
    assert "dnat.web." in tcp_get("127.0.0.1", front)  # the DNAT rules carry on meanwhile
    wait_for(lambda: any(d["name"] == "lb" and d["pid"] not in (None, lb_pid)
                         and d["state"] == "running"
                         for d in k.call("drivers.list")["drivers"]), 20, what="lb restarted")
    wait_for(lambda: query(k, "lb", "status", {"app": "dnat"})["services"][0]["socket_lb"]
             == [f"127.0.0.1:{front}"], 20, what="the new lb driver's program")
    assert loopback_peer() in addresses
    r = k.cli("down", "dnat")
    assert r.returncode == 0, r.stderr
    assert not table.exists(), "the lb's nft table outlived its last service"


def test_proxy_plane_tcp_mode_relays_and_survives_a_driver_kill(kernel: KernelProcess,
                                                               public_dir: Path) -> None:
    """The proxy plane in tcp mode (the C relay in the lb driver): both instances get
    connections, a connection's bytes flow both ways over many requests, every connection is
    counted per backend once it ends; after kill -9 of the lb driver the new one relays again."""
    k = kernel
    _, front, _, d = lb_app(public_dir, "relay", 'policy = "round-robin"\n', mode="tcp",
                            health="tcp = true")
    up(k, d)
    assert lb_backends(k, "relay") == {"relay.web.1": "healthy", "relay.web.2": "healthy"}
    seen = Counter(tcp_get("127.0.0.1", front).split()[0] for _ in range(20))
    assert seen == {"relay.web.1": 10, "relay.web.2": 10}, seen
    # one connection, many requests (HTTP/1.1 keep-alive through the L4 relay)
    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=10)
    bodies = set()
    for _ in range(50):
        conn.request("GET", "/", headers={"Host": "x"})
        bodies.add(conn.getresponse().read().decode().split()[0])
    conn.close()
    assert len(bodies) == 1, bodies  # a connection stays with its backend

    def counted() -> int:
        backends = query(k, "lb", "metrics", {"app": "relay"})["services"][0]["backends"]
        return sum(b["requests"] for b in backends if b["active"] == 0)

    wait_for(lambda: counted() == 21, 10, what="21 finished connections counted")
    lb_pid = next(d["pid"] for d in k.call("drivers.list")["drivers"] if d["name"] == "lb")
    os.kill(lb_pid, signal.SIGKILL)
    wait_for(lambda: any(d["name"] == "lb" and d["pid"] not in (None, lb_pid)
                         and d["state"] == "running"
                         for d in k.call("drivers.list")["drivers"]), 20, what="lb restarted")

    def relays() -> bool:
        try:
            return tcp_get("127.0.0.1", front).split()[0].startswith("relay.web.")
        except OSError:
            return False

    wait_for(relays, 20, 0.2, what="the new lb driver relaying")
    seen = Counter(tcp_get("127.0.0.1", front).split()[0] for _ in range(10))
    assert set(seen) == {"relay.web.1", "relay.web.2"}, seen
    r = k.cli("down", "relay")
    assert r.returncode == 0, r.stderr
    with pytest.raises(OSError):
        tcp_get("127.0.0.1", front, timeout=2)


class KernelTable:
    """The lb driver's nft table of a test kernel (named in its host config)."""

    def __init__(self, k: KernelProcess) -> None:
        text = k.config.read_text()
        self.name = text.split('nft_table = "', 1)[1].split('"', 1)[0]

    def exists(self) -> bool:
        return subprocess.run(["nft", "list", "table", "ip", self.name],
                              capture_output=True).returncode == 0


def instances_of(k: KernelProcess, app: str) -> list[dict[str, Any]]:
    for a in ps(k):
        if a["app"] == app:
            return a["instances"]  # type: ignore[no-any-return]
    raise AssertionError(f"app {app!r} not in corral ps")


def test_on_demand_activation_through_the_kernel(kernel: KernelProcess, public_dir: Path
                                                ) -> None:
    """No instance after `corral up`; the first request starts one (instance.spawn) and is
    answered; after `idle` without traffic it is stopped; the next request starts it again."""
    k = kernel
    _, front, lb_name, d = lb_app(
        public_dir, "lazy", 'activation = "on-demand"\nidle = "2s"\n', instances=1,
        extra='[paths]\ndata = { path = "data", mode = "rw" }\n')
    data = d / "data"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is known only once deployed
    up(k, d)
    assert instances_of(k, "lazy") == [], "an on-demand app runs no instance until a request"
    time.sleep(0.5)
    assert instances_of(k, "lazy") == []

    figures = []
    for round_ in (1, 2):
        t0 = time.time()
        body = http_get("127.0.0.1", front, lb_name, timeout=30)
        first_s = time.time() - t0
        insts = instances_of(k, "lazy")
        assert len(insts) == 1 and insts[0]["state"] == "ready", insts
        assert body.split()[0] == insts[0]["id"]
        iid, app_t0, listening = (data / "started").read_text().splitlines()[-1].split()
        assert iid == insts[0]["id"]
        app_start_s = float(listening) - float(app_t0)
        figures.append((first_s, app_start_s))
        print(f"\non-demand round {round_}: first request {first_s * 1000:.1f} ms, app start "
              f"(exec to listening) {app_start_s * 1000:.1f} ms, difference "
              f"{(first_s - app_start_s) * 1000:.1f} ms")
        assert first_s < 15
        # more requests are served by the same instance, no new start
        assert http_get("127.0.0.1", front, lb_name).split()[0] == insts[0]["id"]
        # idle: the lb drains it and asks the kernel to stop it
        wait_for(lambda: instances_of(k, "lazy") == [], 15, 0.2, what="idle stop")
        assert k.call("ledger.list", {"owner": "lazy", "kind": "instance"})["records"] == []
        assert k.call("ledger.list", {"owner": "lazy", "kind": "address"})["records"] == []
    assert len((data / "started").read_text().splitlines()) == 2
    # a redeploy retires a running on-demand instance; the next request starts the new spec
    assert http_get("127.0.0.1", front, lb_name, timeout=30).split() == ["lazy.web.1", "1"]
    up(k, d, "--env", "VERSION=2")
    assert instances_of(k, "lazy") == []
    assert http_get("127.0.0.1", front, lb_name, timeout=30).split() == ["lazy.web.1", "2"]


def test_lb_gc_of_one_kernel_spares_another_kernels_nft_services(public_dir: Path) -> None:
    """Two kernels whose lb drivers share one nft table: the restarted lb driver of one
    garbage-collects only its own services; the other kernel's frontend keeps answering."""
    require_net()
    host_a = new_net_host()
    host_b = replace(new_net_host(), lb_table=host_a.lb_table)
    kernels = []
    try:
        fronts = {}
        for name, host in (("alpha", host_a), ("beta", host_b)):
            k = start_kernel(public_dir / f"k{name}", host)
            kernels.append(k)
            fronts[name] = free_port()
            d = web_app(public_dir / name, name, free_port(), f'''
                name = "{name}-{host_a.tag}.test"
                frontend = {fronts[name]}
                plane = "nft"
                policy = "round-robin"
            ''', instances=1)
            up(k, d)
            assert tcp_get("127.0.0.1", fronts[name]).split()[0] == f"{name}.web.1"
        beta = kernels[1]
        pid = next(d["pid"] for d in json.loads(beta.cli("drivers", "--json").stdout)
                   if d["name"] == "lb")
        os.kill(pid, 9)
        wait_for(lambda: next((d["pid"] for d in json.loads(beta.cli("drivers", "--json").stdout)
                               if d["name"] == "lb" and d["state"] == "running"), pid) != pid,
                 15, what="lb driver restarted")
        wait_for(lambda: lb_backends(beta, "beta") == {"beta.web.1": "healthy"}, 10,
                 what="beta re-synced")
        for name in ("alpha", "beta"):
            assert tcp_get("127.0.0.1", fronts[name]).split()[0] == f"{name}.web.1", name
        table = KernelTable(kernels[0])
        assert kernels[0].cli("down", "alpha").returncode == 0
        assert table.exists(), "beta's service still lives in the shared table"
        assert tcp_get("127.0.0.1", fronts["beta"]).split()[0] == "beta.web.1"
        assert beta.cli("down", "beta").returncode == 0
        assert not table.exists()
    finally:
        for k in kernels:
            k.teardown()


# A server that never binds: it serves HTTP on the socket it inherited as fd 3 and answers
# with what socket activation handed it (its pid as it sees it, LISTEN_*, fd 3's address).
SOCKET_APP = textwrap.dedent('''
    import http.server, json, os, socket, socketserver
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    seen = {"pid": os.getpid(), "LISTEN_FDS": os.environ.get("LISTEN_FDS"),
            "LISTEN_PID": os.environ.get("LISTEN_PID"),
            "LISTEN_FDNAMES": os.environ.get("LISTEN_FDNAMES"),
            "id": os.environ.get("CORRAL_INSTANCE_ID"), "fds_at_start": fds}
    if seen["LISTEN_FDS"] != "1" or seen["LISTEN_PID"] != str(os.getpid()):
        raise SystemExit(f"not socket-activated: {seen}")
    sock = socket.socket(fileno=3)
    seen["fd3"] = list(sock.getsockname()[:2])
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = (json.dumps(seen) + "\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
    srv = S(sock.getsockname()[:2], H, bind_and_activate=False)
    srv.socket.close()
    srv.socket = sock
    srv.serve_forever()
''')



def socket_app(k: KernelProcess, d: Path, *, idle: str) -> tuple[int, int, str]:
    """Deploy SOCKET_APP as app ``d.name``: on-demand, socket-activated, behind the HTTP proxy.
    Returns (the app's port, the lb frontend, the lb name)."""
    port, front = free_port(), free_port()
    lb_name = f"{d.name}-{secrets.token_hex(3)}.test"
    web_app(d, d.name, port, f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "1s", rise = 1 }}
        plane = "proxy"
        mode = "http"
        activation = "on-demand"
        idle = "{idle}"
        socket_activation = true
    ''', instances=1, script=SOCKET_APP)
    up(k, d)
    return port, front, lb_name


def test_socket_activation_through_the_kernel(kernel: KernelProcess, public_dir: Path) -> None:
    """lb.socket_activation: the first request starts the instance (instance.spawn with
    listen_fd); the kernel lifts the lb's listening socket with pidfd_getfd and the instance
    gets it as fd 3 with LISTEN_FDS=1, LISTEN_PID = its own pid (behind tini in its pid
    namespace) and LISTEN_FDNAMES=http, and answers without ever binding its port. A crash
    is restarted on the same socket; after `idle` it is stopped, and the next request gets a
    fresh instance on a fresh socket. A client may not pass a descriptor."""
    k = kernel
    port, front, lb_name = socket_app(k, public_dir / "sock", idle="2s")
    assert instances_of(k, "sock") == []

    t0 = time.time()
    seen = json.loads(http_get("127.0.0.1", front, lb_name, timeout=30))
    first_s = time.time() - t0
    print(f"\nsocket-activated first request through the kernel: {first_s * 1000:.1f} ms")
    insts = instances_of(k, "sock")
    assert len(insts) == 1 and insts[0]["state"] == "ready", insts
    inst = insts[0]
    assert seen["id"] == inst["id"] == "sock.web.1"
    assert seen["LISTEN_FDS"] == "1"
    assert seen["LISTEN_PID"] == str(seen["pid"])
    assert seen["pid"] == 2, seen  # tini is pid 1 of the instance's pid namespace
    assert seen["LISTEN_FDNAMES"] == "http"
    assert 3 in seen["fds_at_start"]
    # fd 3 is the lb's socket on the host's loopback, not the instance's own address:port
    assert seen["fd3"][0] == "127.0.0.1" and seen["fd3"][1] != port, seen
    assert inst["address"] != "127.0.0.1"
    with pytest.raises(OSError):
        socket.create_connection((inst["address"], port), timeout=1).close()
    backends = query(k, "lb", "status", {"app": "sock"})["services"][0]["backends"]
    assert [b["id"] for b in backends] == ["sock.web.1"], backends
    assert json.loads(http_get("127.0.0.1", front, lb_name))["id"] == "sock.web.1"

    # a crash: the kernel restarts it with its copy of the same socket; the lb did nothing
    os.kill(inst["pid"], 9)
    wait_for(lambda: [i for i in instances_of(k, "sock")
                      if i["pid"] != inst["pid"] and i["state"] == "ready"], 20, 0.1,
             what="restart of the crashed instance")
    again = json.loads(http_get("127.0.0.1", front, lb_name, timeout=30))
    assert again["fd3"] == seen["fd3"] and again["LISTEN_PID"] == str(again["pid"])
    restarted = instances_of(k, "sock")[0]
    assert restarted["restarts"] == 1, restarted

    # idle: stopped and released; the next request starts a fresh instance on a fresh socket
    wait_for(lambda: instances_of(k, "sock") == [], 20, 0.2, what="idle stop")
    assert k.call("ledger.list", {"owner": "sock", "kind": "instance"})["records"] == []
    third = json.loads(http_get("127.0.0.1", front, lb_name, timeout=30))
    assert third["LISTEN_FDS"] == "1" and third["LISTEN_PID"] == str(third["pid"])
    assert third["fd3"] != seen["fd3"]

    # only drivers may spawn, and only the lb driver may hand over a descriptor
    with pytest.raises(CorralError) as refused:
        k.call("instance.spawn", {"app": "sock", "process": "web",
                                  "listen_fd": {"pid": os.getpid(), "fd": 0}})
    assert refused.value.code == ErrorCode.FORBIDDEN, refused.value
    assert k.cli("down", "sock").returncode == 0


def test_socket_activated_instance_keeps_its_socket_across_a_kernel_crash(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """kill -9 of corrald while a socket-activated instance runs: the next kernel adopts it
    and takes back a copy of its listening socket (pidfd_getfd of fd 3), so a crash after the
    restart is still restarted on the same socket, with no help from the lb."""
    k = kernel
    _, front, lb_name = socket_app(k, public_dir / "sockr", idle="300s")
    seen = json.loads(http_get("127.0.0.1", front, lb_name, timeout=30))
    [inst] = instances_of(k, "sockr")

    k.kill9()
    k.start()
    wait_for(lambda: drivers_running(k, ("net", "fs", "lb", "log")), 20, what="drivers back")
    [adopted] = instances_of(k, "sockr")
    assert adopted["pid"] == inst["pid"]
    # the lb (which outlived the kernel) still forwards to its own socket, not to the
    # instance's address:port, which a socket-activated app never binds
    assert json.loads(http_get("127.0.0.1", front, lb_name))["fd3"] == seen["fd3"]
    backends = query(k, "lb", "status", {"app": "sockr"})["services"][0]["backends"]
    assert [(b["id"], b["address"]) for b in backends] == [
        ("sockr.web.1", "{}:{}".format(*seen["fd3"]))], backends

    os.kill(inst["pid"], 9)
    wait_for(lambda: [i for i in instances_of(k, "sockr")
                      if i["pid"] != inst["pid"] and i["state"] == "ready"], 20, 0.1,
             what="restart of the crashed instance on the recovered socket")
    again = json.loads(http_get("127.0.0.1", front, lb_name, timeout=30))
    assert again["LISTEN_FDS"] == "1" and again["LISTEN_PID"] == str(again["pid"])
    assert again["fd3"] == seen["fd3"], (again, seen)  # the same socket, not a fresh one
    assert instances_of(k, "sockr")[0]["restarts"] == 1
    assert k.cli("down", "sockr").returncode == 0


# A foreign driver of capability CAP (argv[1]), declaring the features in argv[2:], whose
# query.<cap>.spawn asks the kernel for instance.spawn with listen_fd = {pid, fd} of its
# choosing and reports the kernel's answer.
IMPOSTER = textwrap.dedent('''
    import os, socket, sys
    from corral.errors import CorralError
    from corral.sdk import Driver, op, run
    CAP = sys.argv[1]
    LISTENING = socket.socket()
    LISTENING.bind(("127.0.0.1", 0))
    LISTENING.listen(1)
    class Imposter(Driver):
        name = "imposter"
        capability = CAP
        version = "0.0.1"
        features = frozenset(sys.argv[2:])
        @op("state.sync")
        async def sync(self, args):
            return {}
        @op(f"query.{CAP}.spawn")
        async def spawn(self, args):
            pid = {"own": os.getpid(), "parent": os.getppid()}[args.get("pid", "own")]
            fd = {"listening": LISTENING.fileno(), "stdin": 0}[args.get("fd", "listening")]
            try:
                await self.kernel.call("instance.spawn", {
                    "app": "nope", "process": "web", "listen_fd": {"pid": pid, "fd": fd}})
            except CorralError as exc:
                return {"code": int(exc.code), "reason": exc.reason}
            return {"code": 0, "reason": "spawned"}
    run(Imposter)
''')


def test_only_a_listen_sockets_driver_may_pass_its_own_listening_socket(public_dir: Path
                                                                        ) -> None:
    """The kernel lifts a descriptor only for a driver that declared the listen_sockets
    feature, only from that driver's own process, and only a listening socket: a driver
    without the feature is refused (403) whatever its capability, one naming another process
    (its parent, the kernel) is refused (403), stdin is not a listening socket (422); with
    all three right the request reaches the deploy (404: no app)."""
    script = public_dir / "imposter.py"
    script.write_text(IMPOSTER)
    base = public_dir / "k"
    base.mkdir()
    toml = "".join(
        f'[drivers.{name}]\nexec = ["{sys.executable}", "{script}", "{cap}"{extra}]\n'
        f'capability = "{cap}"\n' for name, cap, extra in (
            ("cronx", "cron", ', "listen_sockets"'), ("lbx", "lb", "")))
    k = KernelProcess(base, toml)
    k.start()
    try:
        wait_for(lambda: drivers_running(k, ("cronx", "lbx")), 20, what="imposters running")

        def attempt(cap: str, **args: str) -> tuple[int, str]:
            res = k.call("driver.query", {"capability": cap, "query": "spawn", "args": args})
            return int(res["code"]), str(res["reason"])

        # an lb driver without the feature is refused; a cron one with it is not
        code, reason = attempt("lb")
        assert code == ErrorCode.FORBIDDEN and "declaring the listen_sockets" in reason, reason
        code, reason = attempt("cron", pid="parent")
        assert code == ErrorCode.FORBIDDEN and "is not the process of driver 'cronx'" in reason
        code, reason = attempt("cron", fd="stdin")
        assert code == ErrorCode.INVALID and "not a listening stream socket" in reason, reason
        code, reason = attempt("cron")
        assert code == NotFoundError.code and "no app named 'nope'" in reason, reason
    finally:
        k.teardown()


def _get_as(front: int, lb_name: str, user: str) -> str:
    """The instance that answered a GET carrying ``X-User: user``."""
    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": lb_name, "X-User": user})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        return body.split()[0]
    finally:
        conn.close()


def test_hash_header_policy_deploys_and_balances_by_the_header(kernel: KernelProcess,
                                                                public_dir: Path) -> None:
    """policy = "hash-header" with hash_header = "X-User" (documented in docs/drivers/lb.md)
    deploys: the [lb] section is the lb's own schema, checked by the lb. Requests carrying the
    same header value always reach the same instance; different values spread over all."""
    k = kernel
    _port, front, lb_name, d = lb_app(public_dir, "sticky", '''
        policy = "hash-header"
        hash_header = "X-User"
    ''', instances=3)
    res = up(k, d)
    assert len(res["instances"]) == 3
    doc = json.loads(k.cli("check", str(d)).stdout)
    assert doc["lb"]["policy"] == "hash-header" and doc["lb"]["hash_header"] == "X-User"
    for user in ("alice", "bob", "carol"):
        assert len({_get_as(front, lb_name, user) for _ in range(8)}) == 1, user
    served = {_get_as(front, lb_name, f"user-{n}") for n in range(60)}
    assert served == {"sticky.web.1", "sticky.web.2", "sticky.web.3"}, served


def test_a_section_no_running_driver_owns_is_refused_before_anything_is_claimed(
        kernel: KernelProcess, public_dir: Path) -> None:
    """[cron] with no cron driver enabled: `corral check` (through the kernel) and `corral up`
    exit 2 naming the section, its line and the driver to enable; nothing is claimed."""
    k = kernel
    _port, _front, _lb_name, d = lb_app(public_dir, "orphan", extra=textwrap.dedent('''
        [cron.nightly]
        schedule = "@daily"
        command = "true"
    '''))
    line = (d / "corral.toml").read_text().splitlines().index("[cron.nightly]") + 1
    where = f"{d.resolve() / 'corral.toml'}:{line}: cron: unknown key: no enabled driver owns"
    r = k.cli("check", str(d))
    assert r.returncode == 2 and where in r.stderr, r.stderr
    r = k.cli("check", str(d), "--json")
    assert r.returncode == 2 and where in json.loads(r.stdout)["problems"][0], r.stdout
    r = k.cli("up", str(d))
    assert r.returncode == 2 and where in r.stderr, r.stderr
    assert k.call("ledger.list", {"owner": "orphan"})["records"] == []
