"""Observing a deployed system: the lb's per-backend figures in `corral top`, and the
kernel's and the lb's figures on the log driver's Prometheus endpoint, through the real kernel
with the net, fs, lb and log drivers."""

from __future__ import annotations

import json
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing import KernelProcess, free_port
from e2e.test_lb_deployed import (
    NetHost,
    driver_logs,
    drivers_running,
    http_get,
    new_net_host,
    require_net,
    up,
    wait_for,
    web_app,
)

pytestmark = pytest.mark.root

DRIVERS = ("net", "fs", "lb", "log")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


@pytest.fixture
def observed(public_dir: Path) -> Iterator[tuple[KernelProcess, int]]:
    """A kernel whose log driver serves /metrics on a free port and polls every 0.3 s."""
    require_net()
    host: NetHost = new_net_host()
    metrics_port = free_port()
    toml = host.host_toml(DRIVERS).replace(
        "[drivers.log]\n",
        f'[drivers.log]\nconfig = {{ metrics = "127.0.0.1:{metrics_port}", '
        'sample_interval = "0.3s" }\n')
    base = public_dir / "k"
    base.mkdir()
    k = KernelProcess(base, toml)
    k.start()
    try:
        wait_for(lambda: drivers_running(k, DRIVERS), 20, what="drivers running")
        yield k, metrics_port
    finally:
        k.teardown()


def scrape(port: int) -> dict[str, dict[str, float]]:
    """/metrics as {metric name: {label text: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def by_label(series: dict[str, float], label: str = "backend") -> dict[str, float]:
    """{label value: sample} of a series with one sample per value of ``label``."""
    out = {}
    for labels, value in series.items():
        m = re.search(label + r'="([^"]*)"', labels)
        assert m, labels
        out[m.group(1)] = value
    return out


def test_lb_and_kernel_figures_in_top_and_on_metrics(observed: tuple[KernelProcess, int],
                                                     public_dir: Path) -> None:
    """After 60 requests through the lb: `corral top` shows each backend's requests, active,
    5xx and p99 beside its instance figures; /metrics has corral_lb_* per backend (requests
    summing to 60, a latency histogram whose count matches) and corral_kernel_* (up, uptime,
    peers, ledger revision, drivers running, bus messages) with sane values."""
    k, port = observed
    front = free_port()
    lb_name = f"obs-{secrets.token_hex(3)}.test"
    d = web_app(public_dir / "obs", "obs", free_port(), f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "1s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''')
    try:
        up(k, d)
    except AssertionError:
        print(driver_logs(k))
        raise
    ids = {"obs.web.1", "obs.web.2"}
    for _ in range(60):
        assert http_get("127.0.0.1", front, lb_name).split()[0] in ids

    # top: every instance row carries its lb figures
    r = k.cli("top", "--once", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["instance"]: row for row in json.loads(r.stdout)}
    assert ids <= set(rows), rows
    assert sum(rows[i]["lb"]["requests"] for i in ids) == 60, rows
    for i in ids:
        row = rows[i]
        assert row["lb"]["name"] == lb_name and row["lb"]["active"] == 0, row
        assert row["lb"]["errors_5xx"] == 0
        assert row["lb"]["requests"] > 0, row  # p2c spreads 60 requests over both
        assert 0 < row["lb"]["p99_s"] <= 10, row
        assert row["rss_bytes"] > 5 * 2**20, row  # and the log driver's figures beside them
    table = k.cli("top", "obs", "--once")
    assert table.returncode == 0, table.stderr
    assert "REQS" in table.stdout and "P99 ms" in table.stdout
    for i in ids:
        line = next(ln for ln in table.stdout.splitlines() if ln.startswith(i))
        assert int(line.split()[7]) == rows[i]["lb"]["requests"], line

    # /metrics: polled every 0.3 s; wait for a poll after the traffic
    def polled() -> dict[str, dict[str, float]] | None:
        m = scrape(port)
        reqs = by_label(m.get("corral_lb_requests_total", {}))
        return m if sum(reqs.get(i, 0) for i in ids) == 60 else None

    m = wait_for(polled, 10, 0.2, what="lb figures on /metrics")
    reqs = by_label(m["corral_lb_requests_total"])
    assert {i: int(reqs[i]) for i in ids} == {i: rows[i]["lb"]["requests"] for i in ids}
    assert set(by_label(m["corral_lb_errors_5xx_total"]).values()) == {0.0}
    assert set(by_label(m["corral_lb_active"]).values()) == {0.0}
    counts = by_label(m["corral_lb_latency_seconds_count"])
    assert {i: counts[i] for i in ids} == {i: reqs[i] for i in ids}
    inf = {k_: v for k_, v in m["corral_lb_latency_seconds_bucket"].items() if 'le="+Inf"' in k_}
    assert sum(inf.values()) == 60
    assert all(0 < v <= 10 for v in by_label(m["corral_lb_latency_p99_seconds"]).values())
    assert f'name="{lb_name}"' in next(iter(m["corral_lb_requests_total"]))
    assert m["corral_lb_up"][""] == 1.0

    assert m["corral_kernel_up"][""] == 1.0
    status = k.call("kernel.status")
    assert 0 < m["corral_kernel_uptime_seconds"][""] <= status["uptime_s"]
    assert m["corral_kernel_peers"][""] >= len(DRIVERS)
    assert 0 < m["corral_kernel_ledger_revision"][""] <= status["revision"]
    assert m["corral_kernel_drivers"]['{state="running"}'] == len(DRIVERS)
    assert m["corral_kernel_apps"][""] == 1.0
    assert m["corral_kernel_instances"][""] == 2.0
    received = m["corral_kernel_bus_messages_received_total"][""]
    assert received > 60, received  # at least the lb's and log's own traffic and our CLI calls
    assert m["corral_kernel_bus_messages_refused_total"][""] == 0
    assert m["corral_kernel_bus_errors_total"][""] == 0
    assert status["bus"]["received"] >= received
    # instance figures are still there beside them
    assert set(by_label(m["corral_instance_rss_bytes"], "instance")) >= ids

