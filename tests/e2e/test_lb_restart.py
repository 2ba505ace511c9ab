"""The proxy frontends survive a crash of the lb driver: kill -9 under load refuses nothing.

The kernel keeps a copy of every frontend's listening socket (``socket.keep``) and hands it
to the lb's next process, so clients that connect while the driver restarts wait in the
socket's backlog; only connections the dead process had accepted are cut, and the next
process reports them on its metrics and /metrics (``cut_by_last_restart``). Measured for an
app's HTTP frontend and a TCP (L4) frontend at once, and for the host's shared HTTP and
HTTPS frontends (apps with domains), each under keep-alive clients and clients opening a new
connection per request; and again after a kill -9 of corrald, whose kept copies are gone
until the lb (which outlived it) keeps them again on its re-sync.
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from corral.testing import (
    KernelProcess,
    drivers_running,
    free_port,
    new_net_host,
    running_kernel,
    wait_for,
)
from e2e.test_lb_deployed import driver_logs, lb_app, query, require_net, up, web_app
from e2e.test_observe_deployed import DRIVERS, by_label, observed, scrape  # noqa: F401 (fixture)

pytestmark = pytest.mark.root

KEEPALIVE, FRESH = 4, 4  # client threads per frontend: one connection each at most


class Clients:
    """Requests to one frontend until stopped: ``keepalive`` threads each reuse one
    connection, ``fresh`` threads open a new one per request (``Connection: close``). A
    failure is *refused* (ECONNREFUSED: nobody listened), *cut* (the connection broke: reset,
    closed early, timed out) or an HTTP error status."""

    def __init__(self, port: int, host_header: str, *, keepalive: int = KEEPALIVE,
                 fresh: int = FRESH, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.host_header, self.tls = port, host_header, tls
        self.ok = 0
        self.refused: list[str] = []
        self.cut: list[str] = []
        self.errors: list[str] = []
        self.last_ok = 0.0
        self.longest_pause = 0.0  # s without any answer (the restart's stall)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n < keepalive,), daemon=True)
                         for n in range(keepalive + fresh)]

    @property
    def clients(self) -> int:
        """Connections these clients can have open at once."""
        return len(self._threads)

    def start(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def _run(self, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        connected_at, answered = 0.0, 0  # of the current connection
        headers = {"Host": self.host_header}
        if not keepalive:
            headers["Connection"] = "close"
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = (http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                            if self.tls is None else
                            _SniConnection(self.port, self.host_header, self.tls))
                    conn.connect()
                    connected_at, answered = time.time(), 0
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                with self._lock:
                    if resp.status == 200:
                        now = time.time()
                        if self.last_ok:
                            self.longest_pause = max(self.longest_pause, now - self.last_ok)
                        self.ok += 1
                        self.last_ok = now
                        answered += 1
                    else:
                        self.errors.append(f"{time.time():.3f} http {resp.status}: {body!r}")
                if resp.will_close or not keepalive:
                    conn.close()
                    conn = None
            except ConnectionRefusedError as exc:
                with self._lock:
                    self.refused.append(f"{time.time():.3f} {exc}")
                conn = None
                time.sleep(0.01)
            except (OSError, http.client.HTTPException) as exc:
                now = time.time()
                with self._lock:
                    self.cut.append(
                        f"{now:.3f} {type(exc).__name__}: {exc} ("
                        f"{'keep-alive' if keepalive else 'fresh'} connection made "
                        f"{now - connected_at:.4f}s before, {answered} answered on it)")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)


class _SniConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with ``name`` as the TLS server name (SNI and verification)."""

    def __init__(self, port: int, name: str, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=15, context=context)
        self._name = name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self._name)


def answered(load: Clients, more_than: int) -> Callable[[], bool]:
    """Whether ``load`` has been answered more than ``more_than`` times."""
    return lambda: load.ok > more_than


def lb_driver(k: KernelProcess) -> dict[str, Any]:
    return next(d for d in k.call("drivers.list")["drivers"] if d["name"] == "lb")


def cut_reported(k: KernelProcess, app: str) -> dict[str, Any]:
    """The frontend figures the (new) lb process reports for ``app``."""
    [svc] = query(k, "lb", "metrics", {"app": app})["services"]
    return dict(svc["frontend"])



def kill_lb_under(k: KernelProcess, loads: dict[str, Any]) -> tuple[float, float]:
    """kill -9 the lb driver while ``loads`` run (each answering first), wait until the
    restarted driver serves each of them again; stop them. (seconds until it ran again, the
    time of the kill)."""
    try:
        for name, load in loads.items():
            wait_for(answered(load, 300), 30, what=f"load on {name} running")
        old_pid = lb_driver(k)["pid"]
        t_kill = time.time()
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: (d := lb_driver(k))["pid"] not in (None, old_pid)
                 and d["state"] == "running", 20, 0.02, what="lb restarted")
        restarted_s = time.time() - t_kill
        for name, load in loads.items():
            served = load.ok
            wait_for(answered(load, served + 100), 30,
                     what=f"load on {name} served by the new lb")
    finally:
        for load in loads.values():
            load.stop()
    return restarted_s, t_kill

def test_kill9_of_the_lb_driver_under_load_refuses_no_connection(
        observed: tuple[KernelProcess, int], public_dir: Path) -> None:  # noqa: F811
    """An HTTP frontend and a TCP frontend, each under 4 keep-alive clients and 4 clients
    opening a connection per request: kill -9 of the lb driver refuses no connection (the
    kernel's copies of the listening sockets queue them until the next process accepts);
    the requests that fail are only those cut in flight, at most one per client connection
    open at the kill; the next lb process reports at least that many connections cut on each
    frontend, in query.lb.metrics and on /metrics."""
    k, metrics_port = observed
    _, hfront, hname, hdir = lb_app(public_dir, "web")
    _, tfront, _, tdir = lb_app(public_dir, "relay", mode="tcp", health="tcp = true")
    up(k, hdir)
    up(k, tdir)
    assert sorted(lb_driver(k)["kept_sockets"]) == [f"http:0.0.0.0:{hfront}", "tcp:relay"]
    loads = {"http": Clients(hfront, hname).start(), "tcp": Clients(tfront, "x").start()}
    restarted_s, t_kill = kill_lb_under(k, loads)

    figures = {"http": cut_reported(k, "web"), "tcp": cut_reported(k, "relay")}
    for name, load in loads.items():
        fe = figures[name]
        print(f"\n{name}: failures (s after the kill):\n  " + "\n  ".join(
            f"{float(c.split()[0]) - t_kill:+.4f} {c.split(' ', 1)[1]}" for c in load.cut))
        print(f"\n{name} frontend: {load.ok} requests, refused {len(load.refused)}, cut "
              f"{len(load.cut)}, http errors {len(load.errors)}; the new lb reports "
              f"cut_by_last_restart={fe['cut_by_last_restart']} "
              f"(cut_by_restart={fe['cut_by_restart']}); lb back in {restarted_s:.2f}s, "
              f"longest pause without an answer {load.longest_pause:.2f}s")
    for name, load in loads.items():
        fe = figures[name]
        assert load.refused == [], (name, load.refused[:5], driver_logs(k))
        assert load.errors == [], (name, load.errors[:5])
        # only requests in flight are cut: at most one per client connection open at the kill
        assert len(load.cut) <= load.clients, (name, load.cut)
        # every connection cut was open in the dead process, which left its count behind
        assert fe["cut_by_last_restart"] >= len(load.cut), (name, fe, load.cut)
        assert fe["cut_by_restart"] == fe["cut_by_last_restart"], fe
        # a sanity bound: the lb may still count a just-closed connection of a fresh client
        assert fe["cut_by_last_restart"] <= load.clients + FRESH, (name, fe)

    def exported() -> dict[str, float] | None:
        series = scrape(metrics_port).get("corral_lb_frontend_cut_by_last_restart", {})
        by_app = by_label(series, "app") if series else {}
        return by_app if set(by_app) == {"web", "relay"} else None

    on_metrics = wait_for(exported, 10, 0.2, what="frontend figures on /metrics")
    assert on_metrics == {"web": figures["http"]["cut_by_last_restart"],
                          "relay": figures["tcp"]["cut_by_last_restart"]}, on_metrics
    total = scrape(metrics_port)["corral_lb_frontend_cut_by_restart_total"]
    assert by_label(total, "app") == on_metrics

    # `corral down` releases the kept socket: the frontend refuses from then on
    r = k.cli("down", "relay")
    assert r.returncode == 0, r.stderr
    assert lb_driver(k)["kept_sockets"] == [f"http:0.0.0.0:{hfront}"]
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", tfront, timeout=5).connect()


def test_after_a_kernel_restart_the_lb_keeps_its_sockets_again(
        observed: tuple[KernelProcess, int], public_dir: Path) -> None:  # noqa: F811
    """kill -9 of corrald loses the kernel's copies; the lb, which outlived it, keeps its
    frontends' sockets again when it re-syncs with the next kernel; a kill -9 of the lb
    under load then refuses no connection either."""
    k, _ = observed
    _, tfront, _, tdir = lb_app(public_dir, "relay", mode="tcp", health="tcp = true")
    up(k, tdir)
    lb_pid = lb_driver(k)["pid"]
    k.kill9()
    k.start()
    wait_for(lambda: drivers_running(k, DRIVERS), 20, what="drivers back")
    assert lb_driver(k)["pid"] == lb_pid  # adopted, not restarted
    wait_for(lambda: lb_driver(k)["kept_sockets"] == ["tcp:relay"], 20,
             what="the lb keeping its socket again")
    load = Clients(tfront, "x").start()
    try:
        wait_for(lambda: load.ok > 200, 30, what="load running")
        os.kill(lb_pid, signal.SIGKILL)
        wait_for(lambda: (d := lb_driver(k))["pid"] not in (None, lb_pid)
                 and d["state"] == "running", 20, what="lb restarted")
        served = load.ok
        wait_for(lambda: load.ok > served + 100, 30, what="load served by the new lb")
    finally:
        load.stop()
    print(f"\nafter a kernel restart: {load.ok} requests, refused {len(load.refused)}, cut "
          f"{len(load.cut)}; reported {cut_reported(k, 'relay')['cut_by_last_restart']}")
    assert load.refused == [], load.refused[:5]
    assert len(load.cut) <= load.clients, load.cut


@pytest.fixture
def shared(public_dir: Path) -> Iterator[tuple[KernelProcess, int, int]]:
    """A kernel whose lb runs the shared HTTP and HTTPS frontends on free ports of
    127.0.0.1: (kernel, http port, https port)."""
    require_net()
    host = new_net_host()
    http_port, https_port = free_port(), free_port()
    lb = (f'config = {{ nft_table = "{host.lb_table}", http_port = {http_port}, '
          f'https_port = {https_port}, edge_address = "127.0.0.1" }}')
    toml = host.host_toml(DRIVERS).replace(f'config = {{ nft_table = "{host.lb_table}" }}', lb)
    assert lb in toml
    with running_kernel(public_dir / "k", toml, drivers=DRIVERS) as k:
        yield k, http_port, https_port


def test_kill9_of_the_lb_driver_under_load_on_the_shared_http_and_https_frontends(
        shared: tuple[KernelProcess, int, int], public_dir: Path) -> None:
    """An app with a domain and its own certificate on the host's shared :80 and :443 (free
    ports here), each under keep-alive and new-connection clients (HTTPS: a TLS handshake per
    connection): kill -9 of the lb refuses no connection on either; only connections open at
    the kill are cut, and the next lb reports at least as many per shared frontend.

    Known failure (HTTPS only, reported as xfail): the next lb accepts on the shared HTTPS
    frontend as soon as state.sync re-attaches the app, before its certificate is back in
    service (tls files are read in the background, and even a stored ACME certificate is
    wanted after the attach), so the clients that waited in the backlog fail their TLS
    handshake: the certificates must be in service before the HTTPS frontend accepts."""
    k, http_port, https_port = shared
    ca = trustme.CA()
    files = public_dir / "tls"
    files.mkdir()
    leaf = ca.issue_cert("shop.test")
    leaf.cert_chain_pems[0].write_to_path(str(files / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(files / "key.pem"))
    d = web_app(public_dir / "shop", "shop", free_port(), f'''
        domains = ["shop.test"]
        tls = {{ cert = "{files}/cert.pem", key = "{files}/key.pem" }}
        redirect_https = false
        mode = "http"
        health = {{ http = "/healthz", interval = "1s", rise = 1 }}
    ''')
    up(k, d)
    assert sorted(lb_driver(k)["kept_sockets"]) == ["edge:http", "edge:https"]
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def https_ok() -> bool:
        try:
            conn = _SniConnection(https_port, "shop.test", ctx)
            conn.request("GET", "/", headers={"Host": "shop.test"})
            return conn.getresponse().status == 200
        except OSError:
            return False

    wait_for(https_ok, 30, 0.2, what="the certificate in service")
    loads = {"http": Clients(http_port, "shop.test").start(),
             "https": Clients(https_port, "shop.test", tls=ctx).start()}
    restarted_s, _ = kill_lb_under(k, loads)
    edge = query(k, "lb", "metrics")["edge"]
    for name, load in loads.items():
        fe = edge[name]
        print(f"\nshared {name} frontend: {load.ok} requests, refused {len(load.refused)}, "
              f"cut {len(load.cut)}, http errors {len(load.errors)}; the new lb reports "
              f"cut_by_last_restart={fe['cut_by_last_restart']}; lb back in "
              f"{restarted_s:.2f}s, longest pause without an answer {load.longest_pause:.2f}s")
    for name, load in loads.items():
        assert load.refused == [], (name, load.refused[:5], driver_logs(k))
        assert load.errors == [], (name, load.errors[:5])
        assert edge[name]["cut_by_last_restart"] <= load.clients + FRESH, (name, edge[name])
    for name in ("http", "https"):
        load, fe = loads[name], edge[name]
        if name == "https" and len(load.cut) > load.clients:
            pytest.xfail(f"{len(load.cut)} HTTPS requests failed for {load.clients} client "
                         "connections: handshakes accepted before the certificate was back "
                         "in service (see the docstring)")
        assert len(load.cut) <= load.clients, (name, load.cut)
        assert fe["cut_by_last_restart"] >= len(load.cut), (name, fe, load.cut)
