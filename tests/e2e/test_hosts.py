"""`corral hosts`: each kernel registers its host in the ledger under a lease it keeps alive;
a second live host on one local (SQLite) ledger is refused: several hosts share an etcd
ledger, through host views (tests/e2e/test_multihost.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from corral.testing import KernelProcess, wait_for

BARE = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


def host_toml(ledger: Path, name: str) -> str:
    return BARE + f'ledger = "sqlite:///{ledger}"\n[host]\nname = "{name}"\n' \
        f'address = "10.9.0.{1 if name == "h1" else 2}"\nttl_s = 2\n'


def hosts(k: KernelProcess) -> dict[str, dict[str, object]]:
    r = k.cli("hosts", "--json")
    assert r.returncode == 0, r.stderr
    return {h["name"]: h for h in json.loads(r.stdout)}


def test_hosts_register_keep_alive_and_one_ledger_has_one_live_host(tmp_path: Path) -> None:
    """h1 lists itself ready with its address and capacity; h2 on the same ledger is refused
    at start, naming h1; once h1 stops cleanly (its lease revoked) h1 is "lost" and h2
    starts; after h2 is killed (-9), h1 is refused until h2's lease has expired (ttl 2 s),
    then starts and lists h2 as lost since its last sign of life."""
    ledger = tmp_path / "shared.sqlite3"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = KernelProcess(tmp_path / "a", host_toml(ledger, "h1"))
    b = KernelProcess(tmp_path / "b", host_toml(ledger, "h2"))
    try:
        a.start()
        seen = hosts(a)
        assert seen["h1"]["state"] == "ready" and seen["h1"]["address"] == "10.9.0.1", seen
        assert int(str(seen["h1"]["cpus"])) >= 1 and int(str(seen["h1"]["memory_available"])) > 0
        text = a.cli("hosts").stdout
        assert "h1 (this host)" in text and "ready" in text, text

        with pytest.raises(RuntimeError, match=r"in use by host 'h1'"):
            b.start(timeout=10)

        time.sleep(1.5)  # past a keepalive beat (ttl/3): still ready
        assert hosts(a)["h1"]["state"] == "ready"
        a.stop()
        b.start()
        seen = hosts(b)
        assert seen["h1"]["state"] == "lost" and seen["h2"]["state"] == "ready", seen

        b.kill9()
        with pytest.raises(RuntimeError, match=r"in use by host 'h2'"):
            a.start(timeout=10)
        time.sleep(2.5)  # h2's lease (2 s) runs out
        wait_for(lambda: _starts(a), timeout=20, what="h1 starting once h2's lease expired")
        seen = hosts(a)
        assert seen["h2"]["state"] == "lost" and seen["h1"]["state"] == "ready", seen
        assert float(str(seen["h2"]["lost_since"])) <= time.time()
    finally:
        a.teardown()
        b.teardown()


def _starts(k: KernelProcess) -> bool:
    try:
        k.start(timeout=10)
    except RuntimeError:
        return False
    return True
