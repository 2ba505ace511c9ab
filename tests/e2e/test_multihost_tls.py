"""HTTPS on every host, for real, on three hosts (tests/multihost.py) with Pebble (Let's
Encrypt's ACME test server, in the root namespace on the bridge's address): an app homed on
h1 orders its certificate, the HTTP-01 challenge is answered by h2 (Pebble resolves the
domain to h2 only), and h2 and h3 serve the domain over HTTPS with h1's certificate,
redirecting HTTP; neither orders one. A spread app's shares (satellites) serve their home's
certificate too. The ledger holds the certificate sealed: no listing ever shows its key.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Any

import pytest

from corral.errors import CorralError
from corral.testing import wait_for
from e2e.test_multihost_lb import lb_status, logs_on_failure
from integration.lb.pebble import Pebble, require_pebble, run_pebble
from multihost import DRIVERS, Cluster, Host, env_echo_toml, multihost, require_multihost

pytestmark = pytest.mark.root

SHOP = "shop.mh.test"
BLOG = "blog.mh.test"


def deploy(c: Cluster, h: Host, name: str, domain: str, *, port: int, frontend: int,
           extra: str = "", instances: int = 1) -> None:
    """``corral up`` on ``h`` of env-echo app ``name`` (answers "<name> -"), HTTP behind
    ``domain`` with ``tls = "auto"`` (and a frontend of its own)."""
    toml = env_echo_toml(name, port=port, frontend=frontend, instances=instances,
                         extra=f'mode = "http"\ndomains = ["{domain}"]\ntls = "auto"\n{extra}')
    r = h.cli("config", "set", name, f"APP={name}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = h.cli("up", str(c.env_echo_app(name, toml)), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def lb_certs(h: Host) -> list[dict[str, Any]]:
    """``query.lb.certs`` of ``h``'s own lb: the certificates it manages (orders, renews)."""
    return list(h.call("driver.query", {"capability": "lb", "query": "certs",
                                        "args": {}})["certs"])


def valid(h: Host, app: str) -> dict[str, Any] | None:
    for cert in lb_certs(h):
        if cert.get("name") == app and cert.get("state") == "valid":
            return cert
    return None


def https_get(pebble: Pebble, h: Host, name: str) -> tuple[int, str, int]:
    """(status, body, certificate serial) of ``GET /`` over HTTPS to ``h``'s port 443 with
    SNI ``name``, the certificate verified against Pebble's root for ``name``."""
    ctx = ssl.create_default_context(cadata=pebble.root_pem().decode())
    sock = ctx.wrap_socket(socket.create_connection((h.address, 443), timeout=5),
                           server_hostname=name)
    der = sock.getpeercert(binary_form=True) or b""
    conn = http.client.HTTPSConnection(h.address, 443, timeout=5, context=ctx)
    conn.sock = sock
    conn.request("GET", "/", headers={"Host": name})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    from cryptography import x509

    return resp.status, body, x509.load_der_x509_certificate(der).serial_number


def https_ok(pebble: Pebble, h: Host, name: str, app: str) -> int | None:
    """The serial of the certificate ``h`` served for ``name`` when it answered ``app``'s
    body, else None."""
    try:
        status, body, serial = https_get(pebble, h, name)
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return None
    return serial if (status, body) == (200, f"{app} -\n") else None


def http_get(h: Host, name: str) -> tuple[int, str | None]:
    """(status, Location) of plain ``GET /path`` to ``h``'s port 80 for ``name``."""
    conn = http.client.HTTPConnection(h.address, 80, timeout=5)
    conn.request("GET", "/path", headers={"Host": name})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, resp.getheader("Location")


def listed(h: Host, kind: str) -> list[dict[str, Any]]:
    """``corral ledger --kind KIND --json`` on ``h`` (a client's listing)."""
    r = h.cli("ledger", "--kind", kind, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return list(json.loads(r.stdout)["records"])


def key_material(h: Host, app: str) -> str:
    """A piece of the private key of ``app``'s certificate in ``h``'s store."""
    pem = (h.kernel.home / "lb" / "certs" / app / "key.pem").read_text()
    return pem.splitlines()[1][:40]


@pytest.mark.timeout(300)
def test_every_host_serves_https_with_the_certificate_its_home_ordered() -> None:
    """shop (spread = 1) homed on h1 with tls = "auto": Pebble resolves its domain to h2, so
    h2 answers the challenge of h1's order; h2 and h3 then serve it over HTTPS (verified
    against Pebble's root, h1's certificate) and redirect HTTP, ordering nothing; blog (three
    instances, one on each host: h2 and h3 run shares of it) is served over HTTPS by its
    shares' hosts with its home's certificate, challenge answered by h3. A client listing
    of the ledger on any host shows the certificates sealed, etcd holds no key, and `corral
    down` releases the record."""
    require_multihost()
    require_pebble()
    with multihost(3) as c, logs_on_failure(c):
        h1, h2, h3 = c.host(1), c.host(2), c.host(3)
        with run_pebble(c.base, 80, address=c.gateway) as pebble:
            # a [drivers.*] table names a driver the host runs: every one of DRIVERS, the
            # lb's with the ACME directory
            toml = "".join(f"[drivers.{d}]\n" for d in DRIVERS if d != "lb") + (
                f'[drivers.lb]\nconfig = {{ acme_directory = "{pebble.directory_url}", '
                f'acme_ca_bundle = "{pebble.ca_bundle}" }}\n')
            for h in (h1, h2, h3):
                h.start_kernel(toml, keyed=True, drivers=DRIVERS)
            pebble.resolve(SHOP, h2.address)
            pebble.resolve(BLOG, h3.address)

            deploy(c, h1, "shop", SHOP, port=8080, frontend=8081, extra="[placement]\nspread = 1\n")
            cert = wait_for(lambda: valid(h1, "shop"), timeout=90,
                            what=f"h1's certificate of shop (challenge answered by h2)\n"
                                 f"{pebble.log()[-3000:]}")
            serial = int(cert["serial"], 16)
            for h in (h1, h2, h3):
                wait_for(lambda h=h: https_ok(pebble, h, SHOP, "shop") == serial, timeout=30,
                         what=f"shop over HTTPS on {h.name}, with h1's certificate")
            for h in (h2, h3):
                assert http_get(h, SHOP) == (308, f"https://{SHOP}/path")
                assert lb_certs(h) == [], lb_certs(h)  # served, never ordered there
                on = {s["app"]: s for s in lb_status(h)["services"]}["shop"]
                assert on["remote"] is True and on["certificate"]["home"] == "h1", on

            # a spread app: its shares on h2 and h3 serve the home's certificate
            deploy(c, h1, "blog", BLOG, port=8090, frontend=8082, instances=3)
            blog = wait_for(lambda: valid(h1, "blog"), timeout=90,
                            what=f"h1's certificate of blog\n{pebble.log()[-3000:]}")
            for h in (h2, h3):
                wait_for(lambda h=h: https_ok(pebble, h, BLOG, "blog") == int(blog["serial"],
                                                                                16),
                         timeout=60, what=f"blog over HTTPS on {h.name}")
                assert [x["name"] for x in lb_certs(h)] == [], lb_certs(h)

            # sealed everywhere a client or etcd looks
            secrets_ = [key_material(h1, "shop"), key_material(h1, "blog")]
            for h in (h1, h2, h3):
                records = {r["key"]: r for r in listed(h, "certificate")}
                assert set(records) == {"shop", "blog"}, records
                assert records["shop"]["value"] == {"sealed": True}, records
                text = json.dumps(records) + h.cli("ledger", "--json").stdout
                assert not any(s in text for s in secrets_)
            stored = h1.etcdctl("get", "--prefix", "/corral").stdout
            assert "certificate" in stored and not any(s in stored for s in secrets_)
            assert "PRIVATE KEY" not in stored
            wait_for(lambda: listed(h1, "acme-challenge") == [], timeout=15,
                     what="the challenges and their acknowledgements released")
            # only the lb driver writes (and reads) certificates: not a client
            with pytest.raises(CorralError, match="the lb driver's to write"):
                h2.call("ledger.claim", {"owner": "shop", "claims": [
                    {"kind": "certificate", "key": "evil", "value": {"key": "x"}}]})

            r = h1.cli("down", "shop")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "shop" not in {x["key"] for x in listed(h2, "certificate")}
            wait_for(lambda: https_ok(pebble, h3, SHOP, "shop") is None, timeout=15,
                     what="shop no longer served on h3")
            assert https_ok(pebble, h3, BLOG, "blog") is not None
