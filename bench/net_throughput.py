"""TCP throughput through the net driver's DNAT'd host port vs a direct connection.

Root only. A sink runs inside an instance namespace; the sender (this process) alternates
between 127.0.0.1:<host port> (DNAT + masquerade) and <instance address>:<port> (direct,
routed) in the same run, and prints the ratio of medians.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time

SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 18):
        pass
    c.sendall(b"done"); c.close()
"""


def send(address: str, port: int, total: int) -> float:
    """Send ``total`` bytes and wait for the sink's ack; return bytes per second."""
    chunk = b"\0" * (1 << 18)
    started = time.perf_counter()
    with socket.create_connection((address, port), timeout=30) as s:
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b"done"
    return sent / (time.perf_counter() - started)


def main() -> int:
    if os.geteuid() != 0:
        print("net_throughput: needs root (netns, nftables)", file=sys.stderr)
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
    sink = None
    try:
        net.set_app(policy_from_manifest("bench", {"ports": {"http": port}}))
        instance = net.prepare_instance("bench", "bench.web.0", port=port)
        sink = subprocess.Popen(
            ["ip", "netns", "exec", instance.netns, sys.executable, "-c",
             SINK.replace("PORT", str(port))], stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        direct_addr = str(instance.addresses.instance4)
        total = 256 << 20
        send(direct_addr, port, 32 << 20)  # warm up both paths
        send("127.0.0.1", port, 32 << 20)
        direct, dnat = [], []
        for _ in range(5):
            direct.append(send(direct_addr, port, total))
            dnat.append(send("127.0.0.1", port, total))
        d, n = statistics.median(direct), statistics.median(dnat)
        print(f"direct_mbit_s: {d * 8 / 1e6:.0f}")
        print(f"dnat_mbit_s: {n * 8 / 1e6:.0f}")
        print(f"dnat_throughput_ratio: {n / d:.3f} (goal >= 0.95)")
    finally:
        if sink is not None:
            os.killpg(sink.pid, 9)
            sink.wait()
        for name in list(net.state.apps):
            net.remove_app(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
