"""The C reference driver (examples/driver-c) builds and passes the conformance kit."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require
from corral.conformance import StandIn, run_kit
from corral.protocol import Hello, Reply

SOURCE = Path(__file__).parents[2] / "examples" / "driver-c"


def _has_libraries() -> bool:
    if shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "libzmq", "jansson"],
                          check=False).returncode == 0


@pytest.fixture(scope="module")
def c_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver, built out of tree with make."""
    require(shutil.which("make") is not None and shutil.which("cc") is not None,
            "needs make and a C compiler (Debian: make gcc)")
    require(_has_libraries(), "needs libzmq and jansson (Debian: libzmq3-dev libjansson-dev "
                              "pkg-config)")
    build = tmp_path_factory.mktemp("driver-c")
    proc = subprocess.run(["make", "-C", str(SOURCE), f"BUILD={build}"], capture_output=True,
                          text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return build / "hello-driver"


def test_c_driver_passes_the_kit(c_driver: Path) -> None:
    """Every conformance check passes for the C driver."""
    result = run_kit([str(c_driver)], capability="cron")
    assert result.passed, result.report()


def test_c_driver_answers_its_query(c_driver: Path) -> None:
    """query.cron.hello answers a greeting with the name it was given."""

    async def ask() -> dict[str, object]:
        kernel = StandIn([str(c_driver)])
        await kernel.start()
        try:
            await kernel.launch()
            hello = await kernel.next(5.0)
            assert hello is not None and isinstance(hello.body, Hello)
            await kernel.welcome(hello)
            answer = await kernel.request("query.cron.hello", {"name": "corral"})
            assert answer is not None and isinstance(answer.body, Reply), answer
            return answer.body.result
        finally:
            await kernel.close()

    result = asyncio.run(ask())
    assert result == {"greeting": "hello, corral, from C", "driver": "hello-c"}
