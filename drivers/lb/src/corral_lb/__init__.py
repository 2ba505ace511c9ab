"""corral lb driver: userspace proxy (L4, HTTP/1.1) and nftables DNAT behind one contract."""

from corral.protocol import DriverDescription

DRIVER = DriverDescription(
    name="lb",
    capability="lb",
    version="0.1.0",
    module="corral_lb",
    reset="corral_lb.reset",
    doc="load balancer: nft DNAT or userspace proxy; policies; health checks; on-demand",
    sections={"lb": "corral_lb.sections:LB"},
)

__all__ = ["DRIVER"]
