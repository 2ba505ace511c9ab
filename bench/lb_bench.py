"""lb benchmark: corral's nft and proxy planes against direct and HAProxy, in one run.

Same setup as ../shared/bench/lb_anchors.sh: an nginx backend on loopback answering "ok\\n",
HAProxy 2.6 (one thread) in tcp and http mode, wrk -t1 -c50. The corral proxy runs in its
own process on uvloop, like HAProxy runs in its own. Rounds interleave every contestant
(the order rotates from round to round) so that noise from the shared machine hits all alike;
each ratio is the median of the per-round ratios (both sides measured in the same round),
printed with its spread, and each absolute figure is the median of the rounds.

Needs root (nft), and Debian's nginx-light haproxy wrk nftables (installed when missing).
Prints one line per ratio: `name: value (goal ...)`; exits non-zero only if it could not
measure. Usage: sudo .venv/bin/python bench/lb_bench.py [--duration 3] [--rounds 5]
[--only direct,nft,nft-dnat,haproxy-tcp,proxy-tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKEND, HA_TCP, HA_HTTP, PX_TCP, PX_HTTP, NFT = 18181, 18182, 18183, 18192, 18193, 18195
NFT_DNAT = 18196
NEEDS = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "nft": "nftables"}

APP = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(128)
while True:
    c, _ = s.accept(); c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n")
    c.close()
"""


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in NEEDS.items() if shutil.which(tool) is None]
    if missing:
        print(f"installing {' '.join(missing)}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True,
                       stdout=subprocess.DEVNULL)


def wrk(port: int, duration: int) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) of wrk -t1 -c50 against port."""
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m, out
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    if "Socket errors" in out or "Non-2xx" in out:
        print(f"  warning: errors against port {port}:\n{out}", file=sys.stderr)
    return rps, p99


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (0 for None: no relay process)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 10.0) -> float:
    """Seconds until port accepts a connection."""
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.05).close()
            return time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.0005)


def serve_proxy() -> None:
    """--serve: the corral proxy plane (tcp on PX_TCP, http on PX_HTTP) to the nginx backend."""
    import uvloop

    from corral_lb.balancer import Balancer
    from corral_lb.config import load_lb_config

    async def main() -> None:
        lb = Balancer()
        for app, port, mode in (("tcp", PX_TCP, "tcp"), ("http", PX_HTTP, "http")):
            cfg = load_lb_config({"name": f"{app}.bench", "frontend": f"127.0.0.1:{port}",
                                  "mode": mode}, app=app)
            await lb.attach(app, cfg)
            await lb.add_backend(app, "nginx", "127.0.0.1", BACKEND, wait=5)
        print("ready", flush=True)
        await asyncio.Event().wait()

    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    uvloop.run(main())


def on_demand(rounds: int) -> tuple[float, float]:
    """(median app start-to-listen, median on-demand first request) in ms."""
    import uvloop

    from corral_lb.activation import ProcessActivator
    from corral_lb.balancer import Balancer
    from corral_lb.config import load_lb_config

    app_port, fe = 18301, 18302
    starts: list[float] = []
    firsts: list[float] = []
    for _ in range(rounds):
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-c", APP, str(app_port)])
        wait_port(app_port)
        starts.append((time.monotonic() - t0) * 1000)
        p.terminate()
        p.wait()

        async def first_request() -> float:
            act = ProcessActivator([sys.executable, "-c", APP, "{port}"], port=app_port)
            lb = Balancer(activators=lambda app, c: act)
            cfg = load_lb_config({"name": "od.bench", "frontend": f"127.0.0.1:{fe}",
                                  "mode": "tcp", "activation": "on-demand", "idle": "60s"},
                                 app="od")
            await lb.attach("od", cfg)
            t = time.monotonic()
            r, w = await asyncio.open_connection("127.0.0.1", fe)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            body = await r.read()
            elapsed = (time.monotonic() - t) * 1000
            assert body.endswith(b"ok\n"), body
            w.close()
            await lb.close()
            return elapsed

        firsts.append(uvloop.run(first_request()))
    return statistics.median(starts), statistics.median(firsts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated contestants (default: all)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_proxy()
        return 0
    if os.geteuid() != 0:
        print("lb_bench: needs root (nft, apt-get)", file=sys.stderr)
        return 2
    ensure_tools()
    import logging

    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from corral_lb.backend import Backend
    from corral_lb.config import load_lb_config
    from corral_lb.nft import NftPlane

    d = Path(tempfile.mkdtemp(prefix="corral-lb-bench-"))
    (d / "nginx.conf").write_text(f"""
worker_processes 1; pid {d}/nginx.pid; error_log {d}/ngerr.log; daemon on;
events {{ worker_connections 4096; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{BACKEND}; location / {{ return 200 "ok\\n"; }} }} }}
""")
    (d / "haproxy.cfg").write_text(f"""
global
  maxconn 4000
  nbthread 1
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend ft_tcp
  mode tcp
  bind 127.0.0.1:{HA_TCP}
  default_backend bk_tcp
backend bk_tcp
  mode tcp
  server s1 127.0.0.1:{BACKEND}
frontend ft_http
  mode http
  bind 127.0.0.1:{HA_HTTP}
  default_backend bk_http
backend bk_http
  mode http
  http-reuse always
  server s1 127.0.0.1:{BACKEND}
""")
    # "nft": the plane as deployed (the host's own connections translated at connect() by
    # its cgroup/connect4 program, DNAT for the rest); "nft-dnat": per-packet DNAT only, the
    # path of connections from other hosts and of hosts without cgroup v2 / BPF.
    nft = NftPlane()
    nft_dnat = NftPlane(socket_lb=False)
    proxy: subprocess.Popen[bytes] | None = None
    nft_cfg = load_lb_config({"name": "nft.bench", "frontend": f"127.0.0.1:{NFT}",
                              "plane": "nft", "mode": "tcp"}, app="nftbench")
    dnat_cfg = load_lb_config({"name": "nftdnat.bench", "frontend": f"127.0.0.1:{NFT_DNAT}",
                               "plane": "nft", "mode": "tcp"}, app="nftdnatbench")
    try:
        subprocess.run(["nginx", "-c", str(d / "nginx.conf")], check=True)
        subprocess.run(["haproxy", "-D", "-p", str(d / "haproxy.pid"), "-f",
                        str(d / "haproxy.cfg")], check=True)
        for plane, cfg in ((nft, nft_cfg), (nft_dnat, dnat_cfg)):
            plane.install(cfg.name, cfg.listen, cfg.policy_name)
            plane.set_backends(cfg.name, [Backend(id="nginx", host="127.0.0.1", port=BACKEND)])
        if nft.socket_lb is None:
            print("  note: no connect-time translation on this host: nft is DNAT only",
                  file=sys.stderr)
        # A session of its own, as corrald starts every driver and as `haproxy -D` runs: with
        # autogroup scheduling (sched_autogroup_enabled) a process shares its session's CPU
        # share, and in ours it would compete with wrk while HAProxy has a share to itself.
        proxy = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE,
                                 start_new_session=True)
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        for port in (BACKEND, HA_TCP, HA_HTTP, PX_TCP, PX_HTTP, NFT, NFT_DNAT):
            wait_port(port)
        names = {"direct": BACKEND, "nft": NFT, "nft-dnat": NFT_DNAT, "haproxy-tcp": HA_TCP,
                 "proxy-tcp": PX_TCP, "haproxy-http": HA_HTTP, "proxy-http": PX_HTTP}
        if args.only:
            names = {n: p for n, p in names.items() if n in args.only.split(",")}
        for port in names.values():  # warm up: first connections, caches
            wrk(port, 1)
        # The relay process of each contestant, to report its CPU time per request.
        haproxy_pid = int((d / "haproxy.pid").read_text().split()[0])
        relay = {"haproxy-tcp": haproxy_pid, "haproxy-http": haproxy_pid,
                 "proxy-tcp": proxy.pid, "proxy-http": proxy.pid}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        cpu_us: dict[str, list[float]] = {name: [] for name in names if name in relay}
        order = list(names)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                pid = relay.get(name)
                before = cpu_seconds(pid)
                rps, p99 = wrk(names[name], args.duration)
                extra = ""
                if pid is not None:
                    cpu_us[name].append((cpu_seconds(pid) - before) * 1e6
                                        / (rps * args.duration))
                    extra = f"  relay CPU {cpu_us[name][-1]:5.1f} us/req"
                print(f"  round {r + 1} {name:13s} {rps:10.0f} req/s  p99 {p99:6.2f} ms"
                      f"{extra}", file=sys.stderr)
                runs[name].append((rps, p99))
        start_ms, first_ms = on_demand(3) if not args.only else (0.0, 0.0)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        for pidfile in ("haproxy.pid", "nginx.pid"):
            p = d / pidfile
            if p.exists():
                subprocess.run(["kill", p.read_text().strip()], check=False)
        nft.uninstall(nft_cfg.name, nft_cfg.listen)
        nft_dnat.uninstall(dnat_cfg.name, dnat_cfg.listen)
        nft.close()
        shutil.rmtree(d, ignore_errors=True)

    def ratio(a: str, b: str, goal: str, index: int = 0) -> None:
        """Median of the per-round ratios a/b (index 0: req/s, 1: p99), with its spread."""
        if a not in runs or b not in runs:
            return
        per_round = [x[index] / y[index] for x, y in zip(runs[a], runs[b], strict=True)]
        label = f"{a} p99 / {b} p99" if index else f"{a} / {b}"
        print(f"{label}: {statistics.median(per_round):.2f} (median of {len(per_round)} "
              f"rounds, min {min(per_round):.2f}, max {max(per_round):.2f}; goal {goal})")

    for name, rs in runs.items():
        print(f"{name}: median {statistics.median(x[0] for x in rs):.0f} req/s, p99 "
              f"{statistics.median(x[1] for x in rs):.2f} ms ({len(rs)} rounds)"
              + (f", relay CPU {statistics.median(cpu_us[name]):.1f} us/req"
                 if cpu_us.get(name) else ""))
    ratio("nft", "direct", ">= 0.95")
    ratio("nft-dnat", "direct", "none: per-packet DNAT, for reference")
    ratio("nft", "haproxy-tcp", ">= 1.8")
    ratio("proxy-tcp", "haproxy-tcp", ">= 1.0")
    ratio("proxy-http", "haproxy-http", ">= 0.8")
    ratio("proxy-http", "haproxy-http", "<= 1.2", index=1)
    if not args.only:
        print(f"on-demand first request - app start: {first_ms - start_ms:.1f} ms "
              f"(app start {start_ms:.1f} ms, first request {first_ms:.1f} ms; goal <= 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
