"""The routing mesh for real, on three hosts (tests/multihost.py): an app deployed on h1 and
another on h2, both HTTP on frontend port 8081, are each answered on every host's 8081 by
name, h3 running neither, from the instance on their own host; `corral down` of h1's app
stops every other host serving it.

Connecting from h3's lb to an instance on h1 needs the hosts' instance subnets routed to each
other (the net driver's part); the lb's own part is also covered without it by
tests/unit/lb/test_mesh.py and tests/integration/lb/test_mesh.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.testing import wait_for
from multihost import DRIVERS, Cluster, Host, env_echo_toml, multihost, require_multihost

pytestmark = pytest.mark.root


def app_dir(c: Cluster, name: str, port: int) -> Path:
    """The env-echo app ``name`` (answers "$APP $TOKEN") on ``port``, behind name
    ``<name>.corral.test`` on the HTTP frontend 8081."""
    return c.env_echo_app(name, env_echo_toml(name, port=port, extra='mode = "http"\n'))


def deploy(c: Cluster, h: Host, name: str, port: int) -> None:
    """``corral up`` of app ``name`` on ``h``, its APP config var its name."""
    r = h.cli("config", "set", name, f"APP={name}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = h.cli("up", str(app_dir(c, name, port)), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def curl(h: Host, name: str) -> str | None:
    """``curl -H "Host: <name>.corral.test" http://<h>:8081/`` from the test process (the
    root namespace, through the bridge): the body, or None."""
    r = subprocess.run(["curl", "-sf", "--noproxy", "*", "--max-time", "2", "-H",
                        f"Host: {name}.corral.test", f"http://{h.address}:8081/"],
                       capture_output=True, text=True, timeout=10, check=False)
    return r.stdout if r.returncode == 0 else None


def lb_status(h: Host) -> dict[str, Any]:
    """``query.lb.status`` of ``h``'s lb."""
    return h.call("driver.query", {"capability": "lb", "query": "status", "args": {}})


def services(h: Host) -> dict[str, dict[str, Any]]:
    """``h``'s lb services by app."""
    return {s["app"]: s for s in lb_status(h)["services"]}


@contextlib.contextmanager
def logs_on_failure(c: Cluster) -> Iterator[None]:
    """On a failure, print each host's kernel, lb and net driver logs (the cluster's
    directories are gone once ``multihost`` has ended)."""
    try:
        yield
    except BaseException:
        for h in c.hosts:
            print(f"=== {h.name} corrald\n{h.kernel.log()}")
            for name in ("lb", "net"):
                path = h.kernel.home / "drivers" / f"{name}.log"
                if path.exists():
                    print(f"=== {h.name} {name}\n{path.read_text()[-6000:]}")
        raise


@pytest.mark.timeout(300)
def test_every_hosts_lb_serves_every_hosts_apps() -> None:
    """shop on h1 and blog on h2 (HTTP, frontend 8081 each): h3, which runs neither, answers
    each by name from the instance on its own host, and so do h1 for blog and h2 for shop
    (sharing the local app's frontend); h3's lb status names each backend's host; after
    `corral down shop` on h1 no host serves shop any more, blog goes on."""
    require_multihost()
    with multihost(3) as c, logs_on_failure(c):
        h1, h2, h3 = c.host(1), c.host(2), c.host(3)
        for h in (h1, h2, h3):
            h.start_kernel(keyed=True, drivers=DRIVERS)
        deploy(c, h1, "shop", 8080)
        deploy(c, h2, "blog", 8090)
        wait_for(lambda: curl(h1, "shop") == "shop -\n" and curl(h2, "blog") == "blog -\n",
                 timeout=30, what="shop on h1 and blog on h2, each on its own host's lb")

        # h3 runs neither: its lb serves both, from the instances on h1 and h2
        wait_for(lambda: curl(h3, "shop") == "shop -\n" and curl(h3, "blog") == "blog -\n",
                 timeout=30, what="shop and blog answered on h3")
        on_h3 = services(h3)
        assert set(on_h3) == {"shop", "blog"}, on_h3
        assert on_h3["shop"]["remote"] is True and on_h3["blog"]["remote"] is True
        assert [(b["host"], b["state"]) for b in on_h3["shop"]["backends"]] == [
            ("h1", "healthy")], on_h3
        assert [b["host"] for b in on_h3["blog"]["backends"]] == ["h2"], on_h3
        records = json.loads(h3.cli("ledger", "--kind", "backend", "--json").stdout)
        assert sorted((r["key"], r["owner"]) for r in records["records"]) == [
            ("blog/blog.web.1@h2", "blog@h2"), ("shop/shop.web.1@h1", "shop@h1")], records

        # a client may come in on any host
        wait_for(lambda: curl(h1, "blog") == "blog -\n" and curl(h2, "shop") == "shop -\n",
                 timeout=30, what="blog on h1 and shop on h2")

        r = h1.cli("down", "shop")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: "shop" not in services(h2) and "shop" not in services(h3),
                 timeout=15, what="shop no longer served on h2 and h3")
        # the frontend goes on for blog alone (a frontend of one name answers every Host)
        assert curl(h3, "shop") != "shop -\n" and curl(h3, "blog") == "blog -\n"
        assert curl(h1, "blog") == "blog -\n"
        assert lb_status(h3)["unserved"] == {}
