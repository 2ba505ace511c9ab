"""corral net driver: per-instance network namespaces, addresses and nftables rules."""

from corral.protocol import DriverDescription

DRIVER = DriverDescription(
    name="net",
    capability="net",
    version="0.1.0",
    module="corral_net.driver",
    reset="corral_net.reset",
    doc="network namespaces, veth pairs, addresses; nftables ingress/egress/DNAT per app",
    sections={"network": "corral_net.sections:NETWORK"},
)
