"""A real network lab for the net driver: unique names, an "other host", cleanup always.

Everything the lab creates carries a random tag (tables, namespaces, links, address ranges),
so concurrent runs on a shared machine do not collide, and is removed in the fixture's
finally block even when the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from corral.testing import free_port

HERE = Path(__file__).parent
PROBE = HERE / "app_probe.py"
APP_PYTHON = "/usr/bin/python3"  # readable by uid 65534 (the venv's interpreter may not be)
APP_UID = 65534


def _libnftables_loads() -> bool:
    try:
        from corral_net.nft import Nftables

        Nftables()
        return True
    except Exception:
        return False


def require_lab() -> None:
    """Every facility the lab needs; under CI=true a missing one fails the test."""
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("ip") is not None, "needs iproute2 (ip netns exec)")
    require(shutil.which("setpriv") is not None, "needs util-linux setpriv")
    require(Path(APP_PYTHON).exists(), f"needs {APP_PYTHON} for unprivileged probes")
    require(_libnftables_loads(), "needs Debian's libnftables1 (and nftables)")
    require(os.path.exists("/proc/self/ns/net"), "needs network namespaces")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Lab:
    """One test's network world: the driver library, an other host, servers, probes."""

    tag: str
    config: Any
    net: Any
    peer_ns: str
    peer_link: str
    peer_host4: str  # host side of the peer link
    peer_db4: str  # the listed database peer
    peer_other4: str  # an unlisted address on the same host
    peer_new4: str  # where the DNS answer moves to in the refresh test
    peer_host6: str
    peer_db6: str
    peer_other6: str
    zone_file: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    etc_dirs: list[Path] = field(default_factory=list)

    def set_zone(self, zone: dict[str, Any]) -> None:
        tmp = self.zone_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        tmp.replace(self.zone_file)

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start a long-running process, wait for its "ready" line; killed at teardown."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            errors = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{argv} did not start: {line!r} {errors}")
        return proc

    def app_argv(self, netns: str, *args: str, uid: int | None = APP_UID) -> list[str]:
        argv = ["ip", "netns", "exec", netns]
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                     "--no-new-privs"]
        return [*argv, APP_PYTHON, str(PROBE), *args]

    def serve_in(self, netns: str, tcp: list[int], udp: list[int], tag: str,
                 uid: int | None = APP_UID) -> None:
        self.spawn(self.app_argv(netns, "serve", ",".join(map(str, tcp)),
                                 ",".join(map(str, udp)), tag, uid=uid))

    def probe(self, netns: str, actions: list[dict[str, Any]],
              uid: int | None = APP_UID) -> list[dict[str, Any]]:
        """Run probe actions inside ``netns`` as ``uid``; return one result per action."""
        done = sh(*self.app_argv(netns, "probe", json.dumps(actions), uid=uid))
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def resolv_conf(self, netns: str, nameserver: str) -> None:
        """``ip netns exec`` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf."""
        directory = Path("/etc/netns") / netns
        directory.mkdir(parents=True, exist_ok=True)
        self.etc_dirs.append(directory)
        (directory / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1\n")


def _make_peer(tag: str, octet: int, v6net: str) -> tuple[str, str]:
    """An "other host": a netns behind its own veth with addresses routed from the host."""
    ns, link = f"cntp{tag}", f"p{tag}h"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "addr", "add", f"10.250.{octet}.1/24", "dev", link)
    sh("ip", "addr", "add", f"{v6net}1/64", "dev", link, "nodad")
    sh("ip", "link", "set", link, "up")
    run = ["ip", "netns", "exec", ns]
    sh(*run, "ip", "link", "set", "lo", "up")
    for host in (2, 3, 4):
        sh(*run, "ip", "addr", "add", f"10.250.{octet}.{host}/24", "dev", "eth0")
        sh(*run, "ip", "addr", "add", f"{v6net}{host}/64", "dev", "eth0", "nodad")
    sh(*run, "ip", "link", "set", "eth0", "up")
    sh(*run, "ip", "route", "add", "default", "via", f"10.250.{octet}.1")
    sh(*run, "ip", "-6", "route", "add", "default", "via", f"{v6net}1")
    return ns, link


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_lab()
    from corral_net.config import NetConfig
    from corral_net.host import HostNetwork

    tag = secrets.token_hex(2)
    octet = random.randint(1, 254)
    v6word = random.randint(0x100, 0xfffe)
    v6net = f"fd63:6f72:7261:{v6word:x}::"
    peer_ns = peer_link = ""
    net = None
    created: Lab | None = None
    try:
        peer_ns, peer_link = _make_peer(tag, octet, v6net)
        config = NetConfig(
            pool4=ipaddress.IPv4Network(f"10.{random.randint(232, 249)}.{octet}.0/24"),
            pool6=ipaddress.IPv6Network(f"fd63:6f72:7261:{v6word + 1:x}::/64"),
            table=f"cnt{tag}", netns_prefix=f"cnt{tag}-", link_prefix=f"c{tag}",
            resolvers=(f"10.250.{octet}.2",), dns_min_ttl=0.2,
        )
        net = HostNetwork(config)
        created = Lab(
            tag=tag, config=config, net=net, peer_ns=peer_ns, peer_link=peer_link,
            peer_host4=f"10.250.{octet}.1", peer_db4=f"10.250.{octet}.2",
            peer_other4=f"10.250.{octet}.3", peer_new4=f"10.250.{octet}.4",
            peer_host6=f"{v6net}1", peer_db6=f"{v6net}2", peer_other6=f"{v6net}3",
            zone_file=tmp_path / "zone.json",
        )
        created.set_zone({
            "db.test": {"ttl": 1, "addrs": [created.peer_db4, created.peer_db6]},
            "blocked.test": {"ttl": 60, "addrs": [created.peer_other4, created.peer_other6]},
        })
        # The peer serves TCP 5432/5433 on all its addresses, and DNS on its .2 address.
        created.serve_in(peer_ns, [5432, 5433], [5432, 5433], "peer", uid=None)
        created.spawn(["ip", "netns", "exec", peer_ns, sys.executable, str(HERE / "peer_dns.py"),
                       str(created.zone_file), created.peer_db4])
        yield created
    finally:
        if created is not None:
            for proc in created.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for directory in created.etc_dirs:
                shutil.rmtree(directory, ignore_errors=True)
        if net is not None:
            for app in list(net.state.apps):
                net.remove_app(app)
            for instance_id in list(net.state.instances):
                net.stop_instance(instance_id)
                net.remove_network(instance_id)
        if peer_link:
            sh("ip", "link", "del", peer_link, check=False)
        if peer_ns:
            sh("ip", "netns", "del", peer_ns, check=False)


class HostService:
    """A TCP service on the host (all addresses, dual-stack), answering "host:<port>"."""

    def __init__(self) -> None:
        self.port = free_port("::")
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", self.port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"host:{self.port}\n".encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def host_service() -> Iterator[HostService]:
    service = HostService()
    try:
        yield service
    finally:
        service.close()


def host_connect(host: str, port: int, timeout: float = 3.0) -> str:
    """Connect from the host's own namespace; "ok:<greeting>" or the errno name."""
    import errno as errno_mod

    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return "ok:" + s.recv(100).decode().strip()
    except TimeoutError:
        return f"timeout after {time.monotonic() - started:.1f}s"
    except OSError as exc:
        return errno_mod.errorcode.get(exc.errno or 0, str(exc))
