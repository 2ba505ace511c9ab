"""What a backend is told of the client: our forwarding headers, a client's own dropped unless
it is a trusted proxy; the rest of the head byte for byte."""

from __future__ import annotations

import pytest

from corral_lb.forwarded import Forwarding
from corral_lb.http_framing import HOP_BY_HOP, without_hop_by_hop

HEAD = (b"GET /a?b=c HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"x-forwarded-proto: gopher\r\nForwarded: for=7.7.7.7\r\nAccept: */*\r\n\r\n")


def _fields(head: bytes) -> list[bytes]:
    return head[:-4].split(b"\r\n")[1:]


def test_untrusted_client_claims_are_dropped_and_ours_added() -> None:
    out = Forwarding().rewrite(HEAD, client="203.0.113.9", proto=b"https", host=b"shop.test")
    assert out.startswith(b"GET /a?b=c HTTP/1.1\r\n") and out.endswith(b"\r\n\r\n")
    assert _fields(out) == [b"Host: shop.test", b"Accept: */*",
                            b"X-Forwarded-For: 203.0.113.9", b"X-Forwarded-Proto: https",
                            b"X-Forwarded-Host: shop.test"]


def test_a_trusted_proxy_keeps_its_chain_and_we_append() -> None:
    fwd = Forwarding(trusted=["10.0.0.0/8"])
    out = fwd.rewrite(HEAD, client="10.1.2.3", proto=b"http", host=b"shop.test")
    fields = _fields(out)
    assert b"X-Forwarded-For: 6.6.6.6, 10.1.2.3" in fields
    assert b"x-forwarded-proto: gopher" in fields and b"X-Forwarded-Proto: http" not in fields
    assert not any(f.lower().startswith(b"forwarded:") for f in fields)
    # an address outside the range is not trusted
    assert b"6.6.6.6" not in fwd.rewrite(HEAD, client="11.0.0.1", proto=b"http", host=b"x")


def test_rfc7239_style_quotes_ipv6_and_keeps_a_trusted_chain() -> None:
    fwd = Forwarding("rfc7239", trusted=["::1/128"])
    out = fwd.rewrite(HEAD, client="2001:db8::7", proto=b"https", host=b"shop.test")
    assert _fields(out)[-1] == b'Forwarded: for="[2001:db8::7]";proto=https;host="shop.test"'
    assert b"X-Forwarded-For" not in out and b"6.6.6.6" not in out
    trusted = fwd.rewrite(HEAD, client="::1", proto=b"http", host=b"")
    assert _fields(trusted)[-1] == b'Forwarded: for=7.7.7.7, for="[::1]";proto=http'


def test_fields_named_in_drop_go_in_the_same_pass() -> None:
    """drop=HOP_BY_HOP: the client's connection-management lines go too, as if the head had
    been through without_hop_by_hop first; every other line stays as it was."""
    head = (b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close, X-Keep\r\n"
            b"X-Keep: 1\r\nkeep-alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    fwd = Forwarding()
    out = fwd.rewrite(head, client="203.0.113.9", proto=b"https", host=b"shop.test",
                      drop=HOP_BY_HOP)
    assert out == fwd.rewrite(without_hop_by_hop(head), client="203.0.113.9",
                              proto=b"https", host=b"shop.test")
    assert _fields(out) == [b"Host: shop.test", b"X-Keep: 1",
                            b"X-Forwarded-For: 203.0.113.9", b"X-Forwarded-Proto: https",
                            b"X-Forwarded-Host: shop.test"]


def test_ipv4_mapped_clients_match_ipv4_ranges() -> None:
    assert Forwarding(trusted=["192.0.2.0/24"]).trusts("::ffff:192.0.2.5")
    assert not Forwarding(trusted=["192.0.2.0/24"]).trusts("not an address")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        Forwarding("via")
    with pytest.raises(ValueError):
        Forwarding(trusted=["not-a-range"])
