"""Policy programs in another language: the Node.js example speaking CLBP/1 for real."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from pathlib import Path

from conftest import require
from corral.testing import free_port, wait_for_async
from corral_lb.balancer import Balancer
from corral_lb.config import load_lb_config
from integration.lb._harness import backends, get

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "policy-js"
FAST_HEALTH = {"interval": "100ms", "timeout": "500ms", "rise": 1, "fall": 1}


def need_node() -> None:
    require(shutil.which("node") is not None, "needs node (Debian nodejs)")
    require((EXAMPLE / "node_modules" / "zeromq").is_dir(),
            f"needs `npm ci` in {EXAMPLE} (the zeromq npm package)")


def attach_config(port: int, mode: str, policy_mode: str) -> dict[str, object]:
    os.environ["POLICY_MODE"] = policy_mode  # inherited by the program the lb starts
    return {"name": "canary.test", "frontend": f"127.0.0.1:{port}", "mode": mode,
            "health": FAST_HEALTH, "policy": {"exec": ["node", str(EXAMPLE / "policy.js")],
                                              "deadline": "200ms"}}


def test_node_program_picks_per_connection() -> None:
    """In pick mode the program decides: all traffic to 'a-stable', none to 'b-stable'."""
    need_node()
    pa, pb, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        with backends(("a-stable", pa), ("b-stable", pb)):
            await lb.attach("svc", load_lb_config(attach_config(fe, "tcp", "pick"), app="svc"))
            prog = lb._programs["svc"]
            assert await prog.wait_ready(20), "policy.js never said HELLO"
            await lb.add_backend("svc", "a-stable", "127.0.0.1", pa, wait=5)
            await lb.add_backend("svc", "b-stable", "127.0.0.1", pb, wait=5)
            await asyncio.sleep(0.2)  # BACKENDS reaches the program
            seen = Counter([(await get(fe))[1] for _ in range(20)])
            # p2c alone would split 20 connections between both; the program pins them
            assert seen[b"a-stable"] >= 18, (seen, prog.picks, prog.timeouts)
            assert prog.answered >= 18
            await lb.close()

    asyncio.run(main())


def test_node_program_pushes_weights() -> None:
    """In weights mode the program's table becomes the backends' weights."""
    need_node()
    pa, pb, fe = free_port(), free_port(), free_port()

    async def main() -> None:
        lb = Balancer()
        with backends(("app-canary", pa), ("app-stable", pb)):
            await lb.attach("svc", load_lb_config(attach_config(fe, "http", "weights"),
                                                  app="svc"))
            assert await lb._programs["svc"].wait_ready(20)
            await lb.add_backend("svc", "app-canary", "127.0.0.1", pa, wait=5)
            await lb.add_backend("svc", "app-stable", "127.0.0.1", pb, wait=5)
            s = lb.service("svc")
            await wait_for_async(lambda: s.backends["app-stable"].weight == 9
                             and s.backends["app-canary"].weight == 1)
            await lb.close()

    asyncio.run(main())
