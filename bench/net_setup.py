"""Net driver setup cost: per-instance netns+veth+rules, and one nft apply with 100 apps.

Root only. Prints absolute times (no reference exists) and exits non-zero only if it could
not measure. Everything it creates carries a random tag and is removed at the end.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import statistics
import sys
import time


def main() -> int:
    if os.geteuid() != 0:
        print("net_setup: needs root (netns, nftables)", file=sys.stderr)
        return 2
    from corral_net.config import NetConfig
    from corral_net.host import HostNetwork
    from corral_net.model import policy_from_manifest

    tag = secrets.token_hex(2)
    config = NetConfig(pool4=ipaddress.IPv4Network("10.239.0.0/20"),
                       pool6=ipaddress.IPv6Network("fd63:6f72:7261:fb::/64"),
                       table=f"cnb{tag}", netns_prefix=f"cnb{tag}-", link_prefix=f"b{tag}",
                       resolvers=("10.255.255.53",))
    net = HostNetwork(config)
    apps = 100
    try:
        for n in range(apps):
            net.set_app(policy_from_manifest(f"app{n}", {
                "ports": {"http": 30000 + n},
                "network": {"egress": [f"10.200.{n}.0/24:5432", "[2001:db8::/32]:443"],
                            "interfaces": ["eth0"]}}))
        per_instance = []
        for n in range(apps):
            started = time.perf_counter()
            net.prepare_instance(f"app{n}", f"app{n}.web.0", port=30000 + n)
            per_instance.append(time.perf_counter() - started)
        applies = []
        for _ in range(20):
            net.apply()
            applies.append(net.last_apply_seconds)
        stops, removals = [], []
        for n in range(10):
            t0 = time.perf_counter()
            net.stop_instance(f"app{n}.web.0")  # instance.stopped answers after this
            t1 = time.perf_counter()
            net.remove_network(f"app{n}.web.0")  # then the driver does this, off the path
            stops.append(t1 - t0)
            removals.append(time.perf_counter() - t1)
        print(f"instance_setup_ms_median: {statistics.median(per_instance) * 1000:.1f} "
              f"(first {per_instance[0] * 1000:.1f}, last {per_instance[-1] * 1000:.1f}, "
              f"includes a full nft apply)")
        print(f"nft_apply_100_apps_ms_median: {statistics.median(applies) * 1000:.1f} "
              f"(p90 {sorted(applies)[17] * 1000:.1f})")
        print(f"instance_stop_ms_mean: {statistics.mean(stops) * 1000:.1f} (rules out: what "
              f"instance.stopped waits for)")
        print(f"instance_network_removal_ms_mean: {statistics.mean(removals) * 1000:.1f} "
              "(namespace and veth pair, after the answer)")
    finally:
        for name in list(net.state.apps):
            net.remove_app(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
