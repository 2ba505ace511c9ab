"""Queries (read, errors, top, stats), /metrics, and the driver's operation table."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from corral.protocol import check_driver_ops
from corral_log.service import LogService

APP = """
import json, sys, time
print("plain start")
print(json.dumps({"level": "info", "msg": "structured", "user": 7}))
sys.stdout.flush()
time.sleep(1.0)
int("nope")
"""


def test_read_errors_top_stats_and_metrics(tmp_path: Path) -> None:
    """An app's output is readable with filters, its traceback is grouped, its process is
    sampled, and /metrics exposes instance and pipeline figures."""

    async def main() -> None:
        events: list[tuple[str, dict[str, Any]]] = []

        async def publish(topic: str, body: dict[str, Any]) -> None:
            events.append((topic, body))

        svc = LogService(
            tmp_path / "home",
            publish=publish,
            config={"metrics": "127.0.0.1:0", "sample_interval": "0.2s"},
        )
        await svc.start()
        out, err = svc.prepare("shop", "shop.web.1")
        fo, fe = os.open(out, os.O_WRONLY), os.open(err, os.O_WRONLY)
        p = subprocess.Popen([sys.executable, "-c", APP], stdout=fo, stderr=fe)
        os.close(fo)
        os.close(fe)
        svc.started("shop", "shop.web.1", p.pid, __import__("psutil").Process(p.pid).create_time())
        await asyncio.sleep(0.45)
        top = svc.top({"app": "shop"})["instances"]
        assert top and top[0]["instance"] == "shop.web.1" and top[0]["rss_bytes"] > 1 << 20
        assert top[0]["threads"] >= 1 and top[0]["open_files"] >= 3
        assert svc.metrics_port
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'corral_instance_rss_bytes{app="shop",instance="shop.web.1",process="web"}' in body
        assert 'corral_log_records_total{app="shop"}' in body
        while p.poll() is None:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        svc.stopped("shop", "shop.web.1")
        await asyncio.sleep(0.25)  # one tail flush

        recs = svc.read({"app": "shop"})["records"]
        assert recs[0]["message"] == "plain start"
        assert recs[1]["fields"] == {"level": "info", "msg": "structured", "user": 7}
        assert svc.read({"app": "shop", "grep": "struct"})["records"][0]["fields"]["user"] == 7
        assert svc.read({"app": "shop", "instance": "web", "limit": 1})["records"][0][
            "message"
        ].startswith("ValueError")
        assert svc.read({"app": "shop", "instance": "worker"})["records"] == []
        assert svc.read({"app": "shop", "since": "1h"})["records"]
        assert svc.read({"app": "shop", "since": "2999-01-01T00:00:00Z"})["records"] == []
        lines = svc.read({"app": "shop", "json": False})["lines"]
        assert " shop.web.1 out plain start" in lines[0]

        (g,) = svc.error_groups({"app": "shop"})["groups"]
        assert g["type"] == "ValueError" and g["count"] == 1 and "'nope'" in g["sample"]

        topics = {t for t, _ in events}
        assert topics == {"log.shop"}
        tail = [r for _, b in events for r in b.get("records", [])]
        assert [r["message"] for r in tail][:2] == ["plain start", recs[1]["message"]]
        assert any("error" in b for _, b in events)
        st = svc.stats()["apps"]["shop"]
        assert st["records"] == len(svc.read({"app": "shop"})["records"])
        await svc.close()

    asyncio.run(main())


def test_driver_declares_a_valid_operation_table() -> None:
    """The driver's HELLO ops pass the kernel's capability check and include every op."""
    from corral_log import DRIVER
    from corral_log.driver import LogDriver

    ops = sorted(LogDriver.operations)
    assert check_driver_ops("log", ops) is None
    assert set(ops) == {
        "app.attach",
        "app.detach",
        "instance.prepare",
        "instance.started",
        "instance.stopped",
        "manifest.check",
        "state.sync",
        "query.log.read",
        "query.log.errors",
        "query.log.top",
        "query.log.stats",
    }
    assert DRIVER.capability == "log" and DRIVER.module == "corral_log"


def test_import_of_the_description_is_cheap() -> None:
    """Importing corral_log (the entry point target) does not import the driver's deps."""
    code = (
        "import sys, corral_log; bad = {'prometheus_client', 'psutil', 'corral_log.service'}"
        " & set(sys.modules); print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.perf_counter() - t < 5
