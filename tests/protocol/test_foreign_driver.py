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


def test_c_driver_owns_and_checks_its_section_through_a_kernel(c_driver: Path,
                                                               tmp_path: Path) -> None:
    """The C driver declares [hello] in HELLO; `corral check` and `corral up` through a real
    kernel have it validated by manifest.check: the default greeting is filled in, a bad one
    is refused with file:line:field (exit 2), and an unowned section is refused too."""
    import json

    from corral.testing import KernelProcess, wait_for

    base = tmp_path / "k"
    base.mkdir()
    host = (f'unconfined = true\n[drivers.hello]\nexec = ["{c_driver}"]\n'
            'capability = "cron"\n')
    app = tmp_path / "app"
    app.mkdir()
    toml = app / "corral.toml"
    with KernelProcess(base, host) as k:
        wait_for(lambda: k.call("drivers.list")["drivers"][0]["state"] == "running", 15,
                 what="the C driver running")
        toml.write_text('[app]\nname = "greeter"\n\n[hello]\n')
        r = k.cli("check", str(app))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["hello"] == {"greeting": "hello"}
        toml.write_text('[app]\nname = "greeter"\n\n[hello]\ngreeting = ""\nvolume = 11\n')
        r = k.cli("check", str(app))
        assert r.returncode == 2, r.stdout
        assert f"{toml}:5: hello.greeting: expected a non-empty string" in r.stderr, r.stderr
        assert f"{toml}:6: hello.volume: unknown key" in r.stderr, r.stderr
        r = k.cli("up", str(app))
        assert r.returncode == 2 and "hello.greeting" in r.stderr, r.stderr
        assert k.call("ledger.list", {"owner": "greeter"})["records"] == []
        toml.write_text('[app]\nname = "greeter"\n\n[lb]\nfrontend = 80\n')
        r = k.cli("check", str(app))
        assert r.returncode == 2 and "no enabled driver owns a [lb] section" in r.stderr, \
            r.stderr
