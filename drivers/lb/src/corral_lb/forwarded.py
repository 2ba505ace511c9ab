"""What a backend learns of the client: ``X-Forwarded-For``/``-Proto``/``-Host`` or RFC 7239
``Forwarded``, written by the proxy into each request head it forwards.

Headers of these names that a client sent are dropped, so a backend can trust what it reads,
unless the client's address is in the host's trusted ranges (another proxy in front of this
one): then its ``X-Forwarded-For`` (or ``Forwarded``) chain is kept and the client's address
appended, and its ``-Proto``/``-Host`` are kept as it sent them. The head has passed the
strict framing checks before (no obs-fold, no bare CR/LF, valid field names), so a field line
is ``name ":" value`` and only whole lines are removed or added; everything else is forwarded
byte for byte.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

STYLES = ("x-forwarded", "rfc7239")
_XFF, _XFP, _XFH, _FWD = b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"
_OURS = frozenset({_XFF, _XFP, _XFH, _FWD})


class Forwarding:
    """The host's choice of headers (``style``) and the client ranges it trusts."""

    def __init__(self, style: str = "x-forwarded", trusted: Sequence[str] = ()) -> None:
        if style not in STYLES:
            raise ValueError(f"forwarded: expected one of {', '.join(STYLES)}, got {style!r}")
        self.style = style
        self.trusted = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)
        self._verdicts: dict[str, bool] = {}

    def trusts(self, client: str) -> bool:
        """Whether ``client`` (an address) is one of the trusted proxies."""
        verdict = self._verdicts.get(client)
        if verdict is None:
            try:
                address = ipaddress.ip_address(client.split("%", 1)[0])
            except ValueError:
                verdict = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                verdict = any(address in net for net in self.trusted)
            if len(self._verdicts) < 65536:
                self._verdicts[client] = verdict
        return verdict

    def rewrite(self, head: bytes, *, client: str, proto: bytes, host: bytes,
                drop: Collection[bytes] = ()) -> bytes:
        """``head`` (a whole request head, ending with its empty line) with the client's
        forwarding headers dropped (kept when it is trusted) and ours added; the fields named
        in ``drop`` (lower case: the proxy's hop-by-hop fields) go too, in the same pass."""
        trusted = bool(self.trusted) and self.trusts(client)
        lines = head[:-4].split(b"\r\n")
        out = [lines[0]]
        chain: list[bytes] = []
        kept_proto = kept_host = False
        for line in lines[1:]:
            colon = line.find(b":")
            name = line[:colon].lower()
            if name not in _OURS:
                if name not in drop:
                    out.append(line)
                continue
            if not trusted:
                continue  # a client's own claims about where it comes from: dropped
            value = line[colon + 1:].strip()
            if (name == _XFF and self.style == "x-forwarded") or (
                    name == _FWD and self.style == "rfc7239"):
                chain.append(value)
            elif name in (_XFP, _XFH) and self.style == "x-forwarded":
                out.append(line)
                kept_proto = kept_proto or name == _XFP
                kept_host = kept_host or name == _XFH
        address = client.encode()
        if self.style == "x-forwarded":
            out.append(b"X-Forwarded-For: " + b", ".join([*chain, address]))
            if not kept_proto:
                out.append(b"X-Forwarded-Proto: " + proto)
            if not kept_host and host:
                out.append(b"X-Forwarded-Host: " + host)
        else:
            node = b'"[' + address + b']"' if b":" in address else address
            element = b"for=" + node + b";proto=" + proto
            if host:
                element += b';host="' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
            out.append(b"Forwarded: " + b", ".join([*chain, element]))
        return b"\r\n".join(out) + b"\r\n\r\n"
