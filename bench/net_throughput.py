"""TCP throughput through the net driver's DNAT'd host port vs a direct connection.

Root only. An iperf3 server runs inside an instance namespace set up by the net driver's
library (``HostNetwork``, the driver's own rules). Two pairs are measured, each alternating
direct and DNAT'd in the same run, ``--rounds`` times, and the median of the per-round ratios
is printed (with the ratio of medians, to show the spread):

- host: the sender runs on the host; direct = the instance address (routed over its veth),
  DNAT = 127.0.0.1:<host port> (output-hook DNAT, masquerade, route_localnet).
- forwarded: the sender runs in a client namespace behind a veth, like a machine on the LAN;
  direct = the instance address, DNAT = the host's address on that link (prerouting DNAT,
  forward chain).

``--cpu`` adds where the time goes: iperf3's own CPU share (sender, receiver) per path, so a
ratio dominated by the load generator shows up as a saturated sender on both sides.

Uses Debian's iperf3 (installed when missing): a C sender with one stream, so the Python
interpreter is not what is measured. Usage:
  sudo .venv/bin/python bench/net_throughput.py [--rounds 7] [--seconds 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence


def ensure_iperf3() -> bool:
    """True when iperf3 is on PATH, installing Debian's package if it is not."""
    if shutil.which("iperf3") is None:
        print("installing iperf3", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "iperf3"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("iperf3") is not None


def iperf(prefix: Sequence[str], address: str, port: int,
          seconds: int) -> tuple[float, float, float]:
    """(received bit/s, sender CPU %, receiver CPU %) of one iperf3 run to address:port."""
    cmd = [*prefix, "iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-O", "1",
           "-J"]
    for attempt in range(3):
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        try:
            report = json.loads(out.stdout)
            bps = float(report["end"]["sum_received"]["bits_per_second"])
            cpu = report["end"]["cpu_utilization_percent"]
            return bps, float(cpu["host_total"]), float(cpu["remote_total"])
        except (ValueError, KeyError):
            if attempt == 2:
                raise RuntimeError(f"iperf3 to {address}:{port} failed: "
                                   f"{out.stdout[-400:]}{out.stderr[-400:]}") from None
            time.sleep(0.5)  # the server is still finishing the previous test
    raise AssertionError("unreachable")


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def measure(label: str, prefix: Sequence[str], direct: tuple[str, int],
            dnat: tuple[str, int], rounds: int, seconds: int, cpu: bool) -> None:
    """Alternate direct and DNAT runs; print medians and the median per-round ratio."""
    iperf(prefix, *direct, 1)  # warm up both paths (ARP, conntrack, route caches)
    iperf(prefix, *dnat, 1)
    d_runs: list[tuple[float, float, float]] = []
    n_runs: list[tuple[float, float, float]] = []
    for r in range(rounds):
        # Alternate which path goes first, so a drift within a round hits both alike.
        order = [("direct", direct, d_runs), ("dnat", dnat, n_runs)]
        if r % 2:
            order.reverse()
        for _, target, runs in order:
            runs.append(iperf(prefix, *target, seconds))
        print(f"  {label} round {r + 1}: direct {d_runs[-1][0] / 1e9:6.2f} Gbit/s  "
              f"dnat {n_runs[-1][0] / 1e9:6.2f} Gbit/s  ratio "
              f"{n_runs[-1][0] / d_runs[-1][0]:.3f}", file=sys.stderr)
    ratios = [n[0] / d[0] for d, n in zip(d_runs, n_runs, strict=True)]
    d_med = statistics.median(x[0] for x in d_runs)
    n_med = statistics.median(x[0] for x in n_runs)
    print(f"{label}_direct_gbit_s: {d_med / 1e9:.2f}")
    print(f"{label}_dnat_gbit_s: {n_med / 1e9:.2f}")
    if cpu:
        for name, runs in (("direct", d_runs), ("dnat", n_runs)):
            print(f"{label}_{name}_cpu: sender {statistics.median(x[1] for x in runs):.0f} %, "
                  f"receiver {statistics.median(x[2] for x in runs):.0f} %")
    print(f"{label}_dnat_throughput_ratio: {statistics.median(ratios):.3f} "
          f"(median of {rounds} alternating rounds, min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}; ratio of medians {n_med / d_med:.3f}; goal >= 0.95)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="print iperf3's CPU shares")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("net_throughput: needs root (netns, nftables)", file=sys.stderr)
        return 2
    if not ensure_iperf3():
        print("net_throughput: iperf3 is missing and could not be installed", file=sys.stderr)
        return 2
    from corral_net.config import NetConfig
    from corral_net.host import HostNetwork
    from corral_net.model import policy_from_manifest

    tag = secrets.token_hex(2)
    config = NetConfig(pool4=ipaddress.IPv4Network("10.238.0.0/24"),
                       pool6=ipaddress.IPv6Network("fd63:6f72:7261:fc::/64"),
                       table=f"cnq{tag}", netns_prefix=f"cnq{tag}-", link_prefix=f"q{tag}",
                       resolvers=())
    net = HostNetwork(config)
    port = 31000 + int(tag, 16) % 20000
    client_ns, client_link = f"cnq{tag}-client", f"q{tag}cli"
    gw, client_addr = "10.239.254.1", "10.239.254.2"
    server = None
    try:
        net.set_app(policy_from_manifest("bench", {"ports": {"http": port}}))
        instance = net.prepare_instance("bench", "bench.web.0", port=port)
        server = subprocess.Popen(
            ["ip", "netns", "exec", instance.netns, "iperf3", "-s", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # A client namespace behind its own veth: its traffic is forwarded by the host.
        run(["ip", "netns", "add", client_ns])
        run(["ip", "link", "add", client_link, "type", "veth", "peer", "name", "eth0",
             "netns", client_ns])
        run(["ip", "addr", "add", f"{gw}/30", "dev", client_link])
        run(["ip", "link", "set", client_link, "up"])
        inside = ["ip", "netns", "exec", client_ns]
        run([*inside, "ip", "addr", "add", f"{client_addr}/30", "dev", "eth0"])
        run([*inside, "ip", "link", "set", "eth0", "up"])
        run([*inside, "ip", "link", "set", "lo", "up"])
        run([*inside, "ip", "route", "add", "default", "via", gw])
        direct_addr = str(instance.addresses.instance4)
        deadline = time.monotonic() + 10
        while True:  # the server listens once iperf3 is up
            probe = subprocess.run(["iperf3", "-c", direct_addr, "-p", str(port), "-t", "1",
                                    "-J"], capture_output=True, check=False)
            if probe.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        measure("host", [], (direct_addr, port), ("127.0.0.1", port), args.rounds,
                args.seconds, args.cpu)
        measure("forwarded", inside, (direct_addr, port), (gw, port), args.rounds,
                args.seconds, args.cpu)
    finally:
        if server is not None:
            os.killpg(server.pid, 9)
            server.wait()
        subprocess.run(["ip", "link", "del", client_link], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", client_ns], check=False, capture_output=True)
        for name in list(net.state.apps):
            net.remove_app(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
