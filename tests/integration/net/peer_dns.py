"""A tiny authoritative DNS server for tests: answers from a JSON zone file re-read per query.

argv: zone file, address to bind (UDP 53). Zone: {"name": {"ttl": N, "addrs": [..]}}.
"""

import json
import socket
import sys

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

zone_file, address = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, 53))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(4096)
    try:
        query = dns.message.from_wire(data)
    except Exception:
        continue
    reply = dns.message.make_response(query)
    question = query.question[0]
    with open(zone_file) as handle:
        zone = json.load(handle)
    record = zone.get(question.name.to_text().rstrip(".").lower())
    if record is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    else:
        rdtype = dns.rdatatype.to_text(question.rdtype)
        values = [a for a in record["addrs"] if (":" in a) == (rdtype == "AAAA")]
        if values and rdtype in ("A", "AAAA"):
            reply.answer.append(
                dns.rrset.from_text(question.name, record["ttl"], "IN", rdtype, *values))
    sock.sendto(reply.to_wire(), peer)
