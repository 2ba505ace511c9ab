"""``python -m corral_net.reset``: the net driver's part of ``corral host reset``.

Finds, by the names of the host config's ``[drivers.net]`` section alone (no ledger): network
namespaces ``/run/netns/<netns_prefix>*``, host links ``<link_prefix>*`` (their peers go with
them), the nft tables ``inet <table>``, ``ip <table>_nat``, ``ip6 <table>_nat``, and the routes
to other hosts' subnets it made (protocol 231, inside ``pool4``/``pool6``). It first
takes the host-wide claim on those names (``corral_net.claim``), exactly as a starting net
driver does: a live net driver using them makes the reset refuse, naming its pid, instead of
pulling the network from under it.
"""

from __future__ import annotations

from functools import partial

from corral.errors import CorralError
from corral.sdk import ResetReport, ResetRequest, serve_reset
from corral_net.claim import HostClaim
from corral_net.config import NetConfig
from corral_net.egress import IPNetwork
from corral_net.netlink import Netlink
from corral_net.nft import Nftables
from corral_net.routes import plan_routes
from corral_net.ruleset import table_names


def reset(request: ResetRequest, report: ResetReport) -> None:
    """Find (and with ``request.apply`` remove) every namespace, link and table of the config."""
    config = NetConfig.from_mapping(request.config)
    claim = HostClaim(config)
    if request.apply:
        try:
            claim.acquire()
        except CorralError as exc:
            report.failed.append(f"net: nothing removed: {exc.reason}")
            return
    try:
        netlink = Netlink()
        # links first: the host end takes its peer (the namespace's eth0) with it
        for link in sorted(netlink.links(config.link_prefix)):
            report.item(f"link {link}", partial(netlink.remove_link, link),
                        apply=request.apply)
        for name in netlink.namespaces(config.netns_prefix):
            report.item(f"network namespace {name}",
                        partial(netlink.remove_namespace, name), apply=request.apply)
        nft = Nftables()
        present = set(nft.tables())
        for family, name in table_names(config):
            if (family, name) in present:
                command = {"delete": {"table": {"family": family, "name": name}}}
                report.item(f"nftables table {family} {name}",
                            partial(nft.apply, [command], what="host reset"),
                            apply=request.apply)
        pools: list[IPNetwork] = [config.pool4]
        if config.pool6 is not None:
            pools.append(config.pool6)
        for route in plan_routes([], netlink.routes(), pools).remove:
            report.item(f"route {route}", partial(netlink.remove_route, route),
                        apply=request.apply)
    finally:
        claim.release()


if __name__ == "__main__":
    serve_reset(reset)
