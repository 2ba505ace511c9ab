"""The net driver through the real kernel: `corral up`/`down` with the net, fs, lb, log drivers.

The app's own process makes the escape attempts 5-7 of SECURITY.md from inside its deployed
instance (its namespace, its dynamic uid, its sandbox), writes the results as JSON into its
rw grant, then serves its port, so the deploy's readiness check passes only after the
probes ran. A second network namespace made by the test plays another host: the listed
database peer, an unlisted address beside it, and a DNS server for names.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from corral.testing import KernelProcess, free_port, running_kernel
from e2e.test_lb_deployed import (
    DRIVERS,
    NetHost,
    http_get,
    new_net_host,
    ps,
    query,
    require_net,
    start_kernel,
    tcp_get,
    up,
    wait_for,
    web_app,
)

pytestmark = pytest.mark.root

PEER_SERVE = Path(__file__).resolve().parents[1] / "integration" / "net" / "app_probe.py"
PEER_DNS = Path(__file__).resolve().parents[1] / "integration" / "net" / "peer_dns.py"

# The app: listen on an ungranted port (TCP and UDP, v4 and v6), run the probe actions of
# probe.json, write result.json into the rw grant, then serve $PORT. Stdlib only: it runs on
# /usr/bin/python3 inside the sandbox as the app's dynamic uid.
PROBE_APP = textwrap.dedent(r'''
    import errno, http.server, json, os, random, socket, struct, sys, threading, time

    def err(exc):
        if isinstance(exc, socket.timeout):
            return "timeout"
        return errno.errorcode.get(getattr(exc, "errno", None) or 0, repr(exc))

    def dns(server, name, qtype):
        """One query to ``server`` (A=1, AAAA=28); the addresses in the answer."""
        tid = random.randint(0, 65535)
        q = struct.pack(">HHHHHH", tid, 0x0100, 1, 0, 0, 0)
        for part in name.split("."):
            q += bytes([len(part)]) + part.encode()
        q += b"\0" + struct.pack(">HH", qtype, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(q, (server, 53))
            data = s.recv(1500)
        count = struct.unpack(">H", data[6:8])[0]
        pos = 12
        while data[pos]:
            pos += data[pos] + 1
        pos += 5
        found = []
        for _ in range(count):
            if data[pos] & 0xC0 == 0xC0:
                pos += 2
            else:
                while data[pos]:
                    pos += data[pos] + 1
                pos += 1
            rtype, _cls, _ttl, size = struct.unpack(">HHIH", data[pos:pos + 10])
            pos += 10
            if rtype in (1, 28):
                fam = socket.AF_INET if rtype == 1 else socket.AF_INET6
                found.append(socket.inet_ntop(fam, data[pos:pos + size]))
            pos += size
        return found

    def connect(a):
        host, started = a["host"], time.monotonic()
        if host in ("GATEWAY4", "GATEWAY6"):  # the host side of the instance's own link
            import ipaddress
            own = os.environ["CORRAL_ADDRESS" if host == "GATEWAY4" else "CORRAL_ADDRESS6"]
            host = str(ipaddress.ip_address(own) - 1)
        try:
            if a.get("resolver"):
                host = dns(a["resolver"], host, 28 if a.get("v6") else 1)[0]
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((host, a["port"]))
                result = "ok:" + s.recv(100).decode().strip()
        except (OSError, IndexError) as exc:
            result = err(exc) if isinstance(exc, OSError) else "no answer"
        return {"result": result, "to": host, "seconds": time.monotonic() - started}

    def resolve(a):
        try:
            return {"result": dns(a["resolver"], a["name"], 1)}
        except OSError as exc:
            return {"result": err(exc)}

    def open_socket(a):
        fams = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "packet": socket.AF_PACKET}
        types = {"raw": socket.SOCK_RAW, "dgram": socket.SOCK_DGRAM}
        try:
            socket.socket(fams[a["family"]], types[a["type"]], a["proto"]).close()
            return {"result": "ok"}
        except OSError as exc:
            return {"result": err(exc)}

    def ping(a):
        """ICMP echo the way ping(8) does it: a raw socket, else an ICMP datagram socket."""
        packet = struct.pack("!BBHHH", 8, 0, 0xF7FD, 7, 1)  # checksum precomputed
        for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
            try:
                with socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP) as s:
                    s.settimeout(1.5)
                    s.sendto(packet, (a["host"], 0))
                    s.recv(100)
                    return {"result": "reply"}
            except OSError as exc:
                last = err(exc)
        return {"result": last}

    def udp(a):
        fam = socket.AF_INET6 if ":" in a["host"] else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(1)
                s.connect((a["host"], a["port"]))
                s.send(b"ping")
                return {"result": "ok:" + s.recv(100).decode().strip()}
        except OSError as exc:
            return {"result": err(exc)}

    def listen_ungranted(port):
        t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("::", port))
        t.listen(16)
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", port))
        def accept():
            while True:
                c, _ = t.accept()
                c.sendall(b"ungranted\n")
                c.close()
        def answer():
            while True:
                _d, peer = u.recvfrom(100)
                u.sendto(b"ungranted\n", peer)
        for fn in (accept, answer):
            threading.Thread(target=fn, daemon=True).start()

    plan = json.load(open("probe.json"))
    if plan.get("ungranted"):
        listen_ungranted(plan["ungranted"])
    ops = {"connect": connect, "resolve": resolve, "socket": open_socket, "ping": ping,
           "udp": udp}
    report = {"results": [ops[a["op"]](a) for a in plan.get("actions", [])],
              "uid": os.getuid(), "address": os.environ.get("CORRAL_ADDRESS"),
              "address6": os.environ.get("CORRAL_ADDRESS6")}
    data = os.environ["CORRAL_PATH_DATA"]
    with open(os.path.join(data, "result.json.tmp"), "w") as f:
        json.dump(report, f)
    os.replace(os.path.join(data, "result.json.tmp"), os.path.join(data, "result.json"))

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ["CORRAL_INSTANCE"] + "\n").encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    class S(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    S(("::", int(os.environ["PORT"])), H).serve_forever()
''')

REFUSED = {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Peer:
    """Another host: a netns behind its own veth, routed from the host."""

    ns: str
    link: str
    host4: str  # the host's side of the peer link
    db4: str  # the listed database peer
    other4: str  # an unlisted address on the same host
    host6: str
    db6: str
    other6: str


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    """A peer netns serving TCP/UDP 5432-5433 on all its addresses and DNS on db4:53."""
    require_net()
    tag = secrets.token_hex(2)
    octet = random.randint(1, 254)
    v6 = f"fd63:6f72:7263:{random.randint(0x100, 0xfffe):x}::"
    p = Peer(ns=f"zp{tag}", link=f"zp{tag}h", host4=f"10.252.{octet}.1",
             db4=f"10.252.{octet}.2", other4=f"10.252.{octet}.3", host6=f"{v6}1",
             db6=f"{v6}2", other6=f"{v6}3")
    procs: list[subprocess.Popen[str]] = []
    try:
        sh("ip", "netns", "add", p.ns)
        sh("ip", "link", "add", p.link, "type", "veth", "peer", "name", "eth0", "netns", p.ns)
        sh("ip", "addr", "add", f"{p.host4}/24", "dev", p.link)
        sh("ip", "addr", "add", f"{p.host6}/64", "dev", p.link, "nodad")
        sh("ip", "link", "set", p.link, "up")
        run = ["ip", "netns", "exec", p.ns]
        sh(*run, "ip", "link", "set", "lo", "up")
        for addr in (p.db4, p.other4):
            sh(*run, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        for addr in (p.db6, p.other6):
            sh(*run, "ip", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
        sh(*run, "ip", "link", "set", "eth0", "up")
        sh(*run, "ip", "route", "add", "default", "via", p.host4)
        sh(*run, "ip", "-6", "route", "add", "default", "via", p.host6)
        zone = tmp_path / "zone.json"
        zone.write_text(json.dumps({"db.test": {"ttl": 60, "addrs": [p.db4, p.db6]},
                                    "blocked.test": {"ttl": 60, "addrs": [p.other4, p.other6]}}))
        for argv in ([*run, sys.executable, str(PEER_SERVE), "serve", "5432,5433", "5432,5433",
                      "peer"],
                     [*run, sys.executable, str(PEER_DNS), str(zone), p.db4]):
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "ready", (argv, line, proc.stderr.read() if proc.stderr else "")
        yield p
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        sh("ip", "link", "del", p.link, check=False)
        sh("ip", "netns", "del", p.ns, check=False)


class HostService:
    """A TCP service on every host address (dual stack) that apps must not reach."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def host_addresses() -> list[str]:
    """The host's own global addresses (v4 and v6), not loopback, not link-local."""
    out = json.loads(sh("ip", "-j", "addr").stdout)
    found = []
    for link in out:
        for a in link.get("addr_info", []):
            if a.get("scope") == "global" and not link["ifname"].startswith("z"):
                found.append(a["local"])
    return found


@pytest.fixture
def net_host() -> NetHost:
    require_net()
    return new_net_host()


def probe_app(d: Path, name: str, port: int, plan: dict[str, Any], egress: list[str],
              interfaces: list[str]) -> Path:
    d.mkdir(parents=True)
    (d / "app.py").write_text(PROBE_APP)
    (d / "probe.json").write_text(json.dumps(plan))
    data = d / "data"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is known only once deployed
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{name}"
        [ports]
        http = {port}
        [processes]
        web = {{ command = "python3 app.py", port = "http" }}
        [paths]
        data = {{ path = "data", mode = "rw" }}
        [network]
        interfaces = {json.dumps(interfaces)}
        egress = {json.dumps(egress)}
    ''').lstrip())
    for path in (d / "app.py", d / "probe.json", d / "corral.toml"):
        path.chmod(0o644)
    d.chmod(0o755)
    return d


def host_connect(host: str, port: int) -> str:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect((host, port))
            return "ok:" + s.recv(100).decode().strip()
    except OSError as exc:
        import errno

        return "timeout" if isinstance(exc, TimeoutError) else errno.errorcode.get(
            exc.errno or 0, str(exc))


def net_figures(k: KernelProcess, app: str) -> dict[str, int]:
    apps = {a["app"]: a for a in ps(k)}
    return apps[app]["drivers"]["net"]  # type: ignore[no-any-return]


# ---- tests ---------------------------------------------------------------------------------


def test_escape_attempts_from_inside_a_deployed_app(public_dir: Path, net_host: NetHost,
                                                    peer: Peer) -> None:
    """Items 5-7 of SECURITY.md from inside a deployed instance: unlisted peers (v4, v6, by
    name), host services, raw/packet sockets and ping fail; the listed peer is reached (by
    address and by name); ungranted ports are not reachable from outside; `corral ps` shows
    the refused attempts."""
    net_host.resolvers = (peer.db4,)
    k = start_kernel(public_dir / "k", net_host)
    service = HostService()
    try:
        port, ungranted = free_port(), free_port()
        targets = [
            ("listed v4", {"op": "connect", "host": peer.db4, "port": 5432}),
            ("listed v6", {"op": "connect", "host": peer.db6, "port": 5432}),
            ("listed name", {"op": "connect", "host": "db.test", "port": 5432,
                             "resolver": peer.db4}),
            ("resolve blocked.test", {"op": "resolve", "name": "blocked.test",
                                      "resolver": peer.db4}),
            ("unlisted v4", {"op": "connect", "host": peer.other4, "port": 5432}),
            ("unlisted v6", {"op": "connect", "host": peer.other6, "port": 5432}),
            ("listed host, unlisted port", {"op": "connect", "host": peer.db4, "port": 5433}),
            ("unlisted name", {"op": "connect", "host": "blocked.test", "port": 5432,
                               "resolver": peer.db4}),
            ("unlisted name v6", {"op": "connect", "host": "blocked.test", "port": 5432,
                                  "resolver": peer.db4, "v6": True}),
            ("udp unlisted port", {"op": "udp", "host": peer.db4, "port": 5433}),
            ("dns to another server", {"op": "udp", "host": peer.other4, "port": 53}),
            ("raw icmp", {"op": "socket", "family": "inet", "type": "raw", "proto": 1}),
            ("raw icmpv6", {"op": "socket", "family": "inet6", "type": "raw", "proto": 58}),
            ("packet", {"op": "socket", "family": "packet", "type": "raw", "proto": 0x0300}),
            ("icmp dgram", {"op": "socket", "family": "inet", "type": "dgram", "proto": 1}),
            ("ping listed", {"op": "ping", "host": peer.db4}),
            ("ping unlisted", {"op": "ping", "host": peer.other4}),
        ]
        host_targets = [*host_addresses(), peer.host4, peer.host6, "GATEWAY4", "GATEWAY6"]
        targets += [(f"host service {a}", {"op": "connect", "host": a, "port": service.port})
                    for a in host_targets]
        d = probe_app(public_dir / "probe", "probe", port,
                      {"ungranted": ungranted, "actions": [a for _, a in targets]},
                      egress=[f"{peer.db4}/32:5432", f"[{peer.db6}]:5432", "db.test:5432"],
                      interfaces=[peer.link])
        res = up(k, d)
        inst = res["instances"][0]
        report = json.loads((d / "data" / "result.json").read_text())
        results = {name: r for (name, _), r in zip(targets, report["results"], strict=True)}
        print("\n" + "\n".join(f"{n}: {r['result']}" for n, r in results.items()))
        assert report["uid"] >= 61000, "apps run as their dynamic uid"
        # the listed peer: by v4, v6 and by name
        assert results["listed v4"]["result"] == "ok:peer:5432", results["listed v4"]
        assert results["listed v6"]["result"] == "ok:peer:5432", results["listed v6"]
        assert results["listed name"]["result"] == "ok:peer:5432", results["listed name"]
        assert results["resolve blocked.test"]["result"] == [peer.other4], "DNS is allowed"
        # 6. unlisted peers (v4, v6, unlisted port, by name) and services on host addresses
        refused = ["unlisted v4", "unlisted v6", "listed host, unlisted port", "unlisted name",
                   "unlisted name v6", *(f"host service {a}" for a in host_targets)]
        for name in refused:
            r = results[name]
            assert r["result"] in REFUSED, (name, r)
            assert r["seconds"] < 1.0, f"{name}: refused, but slowly ({r})"
        assert not results["udp unlisted port"]["result"].startswith("ok")
        assert not results["dns to another server"]["result"].startswith("ok")
        # 7. raw and packet sockets, ICMP echo
        for name in ("raw icmp", "raw icmpv6", "packet"):
            assert results[name]["result"] == "EPERM", (name, results[name])
        assert results["icmp dgram"]["result"] in {"EACCES", "EPERM"}, results["icmp dgram"]
        for name in ("ping listed", "ping unlisted"):
            assert results[name]["result"] in REFUSED, (name, results[name])
        # 5. the ungranted port is not reachable from outside (host and the other host);
        # the granted one is, on the instance's address and through the host port
        addr4, addr6 = report["address"], report["address6"]
        assert addr4 == inst["address"]
        before = net_figures(k, "probe")
        assert http_get("127.0.0.1", port, "probe") == "probe.web.1\n"
        assert http_get(addr4, port, "probe") == "probe.web.1\n"
        assert http_get(addr6, port, "probe") == "probe.web.1\n"
        assert host_connect(addr4, ungranted) == "ECONNREFUSED"
        assert host_connect(addr6, ungranted) == "ECONNREFUSED"
        from_peer = [
            sh("ip", "netns", "exec", peer.ns, sys.executable, "-c",
               "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], "
               "int(sys.argv[2])), 3).recv(10); print('ok')\nexcept OSError as e: "
               "print(type(e).__name__)", host, str(ungranted)).stdout.strip()
            for host in (addr4, addr6)]
        assert from_peer == ["ConnectionRefusedError"] * 2, from_peer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((addr4, ungranted))
            with pytest.raises(OSError):
                s.send(b"x")
                s.recv(100)
        # `corral ps` shows the refused attempts (from the net driver's counters)
        after = net_figures(k, "probe")
        print(f"refused before the ingress checks {before}, after {after}")
        assert after["refused"] >= len(refused) + 2, after
        assert after["refused_in"] >= before["refused_in"] + 4, (before, after)
        r = k.cli("ps")
        assert re.search(r"net\.refused=\d+", r.stdout), r.stdout
    finally:
        service.close()
        k.teardown()


def test_two_copies_with_offset_each_on_their_own_host_port(kernel: KernelProcess,
                                                            public_dir: Path) -> None:
    """The same manifest deployed twice: `--offset 100 --set app.name=...` gives the copy its
    own ports and name; each copy answers on its own host port through 127.0.0.1."""
    base = free_port()
    while base + 100 > 65535 or not _free(base + 100):
        base = free_port()
    front = free_port()
    d = web_app(public_dir / "twin", "twin", base, f'''
        name = "twin-{secrets.token_hex(3)}.test"
        frontend = {front}
    ''', instances=1)
    a = up(kernel, d)
    b = up(kernel, d, "--offset", "100", "--set", "app.name=twin-copy",
           "--set", "lb.name=twin-copy.test")
    assert a["app"] == "twin" and b["app"] == "twin-copy"
    assert a["instances"][0]["port"] == base and b["instances"][0]["port"] == base + 100
    assert http_get("127.0.0.1", base, "x").split()[0] == "twin.web.1"
    assert http_get("127.0.0.1", base + 100, "x").split()[0] == "twin-copy.web.1"
    # and through each copy's lb frontend (offset too)
    assert tcp_get("127.0.0.1", front).split()[0] == "twin.web.1"
    assert tcp_get("127.0.0.1", front + 100).split()[0] == "twin-copy.web.1"
    ledger = {(r["kind"], r["key"]): r["owner"]
              for r in kernel.call("ledger.list")["records"]}
    assert ledger[("port", str(base))] == "twin"
    assert ledger[("port", str(base + 100))] == "twin-copy"
    for app in ("twin", "twin-copy"):
        assert kernel.cli("down", app).returncode == 0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def kernel(public_dir: Path, net_host: NetHost) -> Iterator[KernelProcess]:
    with running_kernel(public_dir / "k", net_host.host_toml(DRIVERS), drivers=DRIVERS) as k:
        yield k


# ---- teardown ------------------------------------------------------------------------------

def host_state() -> dict[str, Any]:
    """nftables ruleset per table (no handles), links with addresses, /run/netns."""
    text = sh("nft", "list", "ruleset").stdout
    tables: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("table "):
            current = line.rstrip(" {")
            tables[current] = ""
        elif current is not None:
            tables[current] += line + "\n"
    links = {}
    for link in json.loads(sh("ip", "-j", "addr").stdout):
        links[link["ifname"]] = sorted(f"{a['local']}/{a['prefixlen']}"
                                       for a in link.get("addr_info", []))
    try:
        namespaces = sorted(p.name for p in Path("/run/netns").iterdir())
    except FileNotFoundError:
        namespaces = []
    return {"tables": tables, "links": links, "netns": namespaces}


def test_teardown_leaves_ruleset_links_addresses_and_netns_as_before(
    public_dir: Path, net_host: NetHost
) -> None:
    """After `corral down` of everything (proxy and nft lb planes, several instances), the
    host's nftables ruleset, links, addresses and /run/netns equal what they were before the
    kernel started. Other kernels on this shared machine change things meanwhile: what is
    theirs is told apart by name (tables, links, namespaces) and reported, not failed."""
    before = host_state()
    k = start_kernel(public_dir / "k", net_host)
    ours_seen: dict[str, Any] = {}
    try:
        for i, (plane, mode) in enumerate((("proxy", "http"), ("nft", "tcp"))):
            port, front = free_port(), free_port()
            d = web_app(public_dir / f"app{i}", f"app{i}", port, f'''
                name = "app{i}-{net_host.tag}.test"
                frontend = {front}
                plane = "{plane}"
                mode = "{mode}"
            ''')
            up(k, d)
            assert tcp_get("127.0.0.1", port).split()[0].startswith(f"app{i}.web.")
        ours_seen = host_state()
        for app in ("app0", "app1"):
            r = k.cli("down", app)
            assert r.returncode == 0, r.stderr
    finally:
        k.teardown()
    after = host_state()
    mine = _ours(net_host)
    created = {t for t in ours_seen["tables"] if mine(t)}
    assert {f"table inet {net_host.table}", f"table ip {net_host.table}_nat",
            f"table ip {net_host.lb_table}"} <= created, sorted(ours_seen["tables"])
    assert any(mine(n) for n in ours_seen["netns"]) and any(mine(n) for n in ours_seen["links"])
    problems: list[str] = []
    others: list[str] = []
    for kind in ("tables", "links"):
        for name in sorted(set(before[kind]) | set(after[kind])):
            b, a = before[kind].get(name), after[kind].get(name)
            if a == b:
                continue
            entry = f"{kind} {name}: before {b!r:.300} after {a!r:.300}"
            (problems if mine(name) or mine(str(a)) else others).append(entry)
    for name in sorted(set(before["netns"]) ^ set(after["netns"])):
        (problems if mine(name) else others).append(f"netns {name}")
    if others:
        print("\nchanged meanwhile by other kernels on this machine (not ours):\n"
              + "\n".join(others))
    assert problems == [], problems


def _ours(h: NetHost) -> Any:
    pool4 = h.pool4.rsplit(".", 1)[0] + "."
    pool6 = h.pool6.split("::", 1)[0] + ":"
    names = (h.table, h.lb_table, h.netns_prefix, h.link_prefix)

    def mine(text: str) -> bool:
        return any(n in text for n in names) or pool4 in text or pool6 in text

    return mine



def test_a_second_kernel_with_overlapping_net_names_is_refused_and_harms_nothing(
    public_dir: Path, net_host: NetHost
) -> None:
    """Two kernels on one host: a net driver whose table, prefixes or pools overlap a live
    one's refuses to touch the host (naming the other driver), so its garbage collection
    can never remove the first kernel's namespaces, links or rules."""
    a = start_kernel(public_dir / "a", net_host)
    try:
        port = free_port()
        d = web_app(public_dir / "solo", "solo", port, f'''
            name = "solo-{net_host.tag}.test"
            frontend = {free_port()}
        ''', instances=1)
        up(a, d)
        before = host_state()
        ours = sorted(n for n in before["netns"] if n.startswith(net_host.netns_prefix))
        assert len(ours) == 1
        clashes = {
            "same table": replace(net_host, lb_table=net_host.lb_table + "b"),
            "same prefixes and pools": replace(net_host, table=net_host.table + "b",
                                               lb_table=net_host.lb_table + "c"),
        }
        for i, (what, other) in enumerate(clashes.items()):
            b = start_kernel(public_dir / f"b{i}", other)
            try:
                d2 = web_app(public_dir / f"other{i}", f"other{i}", free_port(), f'''
                    name = "other{i}-{net_host.tag}.test"
                    frontend = {free_port()}
                ''', instances=1)
                err = up(b, d2, ok=False)["stderr"]
                assert "[drivers.net]" in err and "net driver" in err, (what, err)
                assert b.call("ledger.list", {"owner": f"other{i}"})["records"] == []
            finally:
                b.teardown()
            # the first kernel's app, namespace and rules are untouched
            assert http_get("127.0.0.1", port, "x").split()[0] == "solo.web.1", what
            now = host_state()
            assert sorted(n for n in now["netns"] if n.startswith(net_host.netns_prefix)) == ours
            assert now["tables"][f"table inet {net_host.table}"].count("jump") == \
                before["tables"][f"table inet {net_host.table}"].count("jump")
    finally:
        a.teardown()


def driver_pid(k: KernelProcess, name: str) -> int | None:
    r = k.cli("drivers", "--json")
    for d in json.loads(r.stdout):
        if d["name"] == name and d["state"] == "running":
            return int(d["pid"])
    return None


def test_net_driver_kill9_keeps_apps_reachable_and_the_restart_readopts(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """kill -9 of the net driver: the app keeps answering; the restarted driver takes its
    host claim again (the dead one's lock went with it), adopts the instance by state.sync,
    and `corral down` then removes everything."""
    import os
    import signal

    k = kernel
    port = free_port()
    d = web_app(public_dir / "tough", "tough", port, f'''
        name = "tough-{secrets.token_hex(3)}.test"
        frontend = {free_port()}
    ''', instances=1)
    res = up(k, d)
    ns_before = sorted(p.name for p in Path("/run/netns").iterdir())
    old = driver_pid(k, "net")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert http_get("127.0.0.1", port, "x").split()[0] == "tough.web.1"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        new = driver_pid(k, "net")
        if new is not None and new != old:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the net driver did not come back")
    # "running" comes before state.sync is done: wait for the adoption
    stats = wait_for(lambda: (s := query(k, "net", "stats"))["instances"] == 1 and s, 10,
                     what="net driver adopted the instance")
    assert "tough" in stats["apps"]
    assert sorted(p.name for p in Path("/run/netns").iterdir()) == ns_before
    assert http_get("127.0.0.1", port, "x").split()[0] == "tough.web.1"
    assert http_get(res["instances"][0]["address"], port, "x").split()[0] == "tough.web.1"
    assert k.cli("down", "tough").returncode == 0
    assert not any(p.name.startswith(res["instances"][0]["id"])
                   for p in Path("/run/netns").iterdir())
    assert query(k, "net", "stats")["instances"] == 0


def test_an_instance_killed_again_and_again_gets_one_network_each_time(
        kernel: KernelProcess, public_dir: Path, net_host: NetHost) -> None:
    """kill -9 of an instance, five times: each restart (the same instance id) gets a new
    network only once the stopped one's namespace and links are gone (the net driver removes
    them after answering instance.stopped), serves, and in the end the app holds one
    address, one namespace and one host link."""
    port = free_port()
    d = web_app(public_dir / "churn", "churn", port,
                f'name = "churn-{secrets.token_hex(3)}.test"\nfrontend = {free_port()}\n',
                instances=1)
    res = up(kernel, d)
    iid = res["instances"][0]["id"]
    ns_name = [n for n in Path("/run/netns").iterdir() if iid in n.name]
    assert len(ns_name) == 1, ns_name

    def pid_now() -> int | None:
        inst = [i for a in ps(kernel) if a["app"] == "churn" for i in a["instances"]]
        return int(inst[0]["pid"]) if inst and inst[0]["state"] == "ready" else None

    for _ in range(5):
        old = pid_now()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda old=old: (lambda p: p is not None and p != old)(pid_now()), 30,
                 what="the instance restarted")
        wait_for(lambda: _answers(port), 30, what="the restarted instance serving")

    def settled() -> bool:
        claims = [r for r in kernel.call("ledger.list")["records"]
                  if r["kind"] == "address" and r["owner"] == "churn"]
        netns = [n.name for n in Path("/run/netns").iterdir() if iid in n.name]
        links = [ln for ln in host_state()["links"] if ln.startswith(net_host.link_prefix)]
        return len(claims) == 1 and len(netns) == 1 and len(links) == 1

    wait_for(settled, 10, what="one address, namespace and link")
    assert kernel.cli("down", "churn").returncode == 0


def _answers(port: int) -> bool:
    try:
        return http_get("127.0.0.1", port, "x").startswith("churn.web.")
    except (OSError, AssertionError):
        return False
