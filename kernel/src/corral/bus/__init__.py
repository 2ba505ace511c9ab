"""The CDP/1 bus: the kernel's ROUTER/PUB server, the peer connection, the ZAP handler."""

from corral.bus._peer import Connection, Handler, decode_event, subscribe
from corral.bus._server import BusServer, Peer
from corral.bus._zap import ZapHandler, peer_uid

__all__ = [
    "BusServer",
    "Connection",
    "Handler",
    "Peer",
    "ZapHandler",
    "decode_event",
    "peer_uid",
    "subscribe",
]
