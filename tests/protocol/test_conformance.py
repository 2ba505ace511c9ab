"""The conformance kit passes a conforming driver, fails broken ones, and checks the real five."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from corral.conformance import CHECKS, run_kit
from corral.conformance._checks import GARBAGE, HOSTILE, MALFORMED_ARGS
from corral.errors import CorralError
from corral.protocol import LIFECYCLE_OPS, DriverDescription, decode

SAMPLE = Path(__file__).with_name("sample_driver.py")


def sample(mode: str) -> list[str]:
    return [sys.executable, str(SAMPLE), mode]


def test_malformed_args_cover_every_lifecycle_op_and_are_invalid() -> None:
    """Each lifecycle operation has malformed arguments its model refuses."""
    assert set(MALFORMED_ARGS) == set(LIFECYCLE_OPS)
    for name, args in MALFORMED_ARGS.items():
        with pytest.raises(ValueError):
            LIFECYCLE_OPS[name].args.model_validate(args)


def test_garbage_is_garbage() -> None:
    """Every garbage message either fails the codec or is a command a kernel never sends."""
    kernel_never_sends = {"HELLO", "REPLY", "ERROR"}  # REPLY/ERROR to ids never requested
    for label, frames in GARBAGE:
        try:
            body = decode(frames)
        except CorralError:
            continue
        assert frames[1].decode() in kernel_never_sends | {"WELCOME"}, (label, body)


def test_hostile_json_is_refused_by_the_codec() -> None:
    """The reference codec refuses hostile bodies with a CorralError (never another error)."""
    for label, frames in HOSTILE:
        with pytest.raises(CorralError):
            decode(frames)
        del label


def test_conforming_driver_passes() -> None:
    """The SDK-based sample driver passes every check."""
    result = run_kit(sample("good"), capability="log")
    assert [o.check for o in result.outcomes] == [c.name for c in CHECKS]
    assert result.passed, result.report()


@pytest.mark.parametrize(
    ("mode", "failing"),
    [
        ("wrong-token", "hello.token"),
        ("bad-capability", "hello.capability"),
        ("crash-on-sync", "sync.empty"),
        ("mute", "heartbeat.interval"),
        ("no-reconnect", "reconnect.after_silence"),
    ],
)
def test_broken_driver_fails(mode: str, failing: str) -> None:
    """A driver broken in one way fails the check for that way, and the run does not pass."""
    result = run_kit(sample(mode), capability="log")
    assert result.status_of(failing) == "FAIL", result.report()
    assert not result.passed


def test_refused_hello_skips_the_rest() -> None:
    """After a refused HELLO there is no connection: the later checks are SKIP, not PASS."""
    result = run_kit(sample("wrong-token"))
    after = [o for o in result.outcomes if o.check not in {"hello.arrives", "hello.role",
                                                           "hello.protocol", "hello.token"}]
    assert after and all(o.status == "SKIP" for o in after), result.report()


def test_silent_process_fails_hello() -> None:
    """A process that never speaks CDP/1 fails hello.arrives."""
    result = run_kit([sys.executable, "-c", "import time; time.sleep(60)"])
    assert result.status_of("hello.arrives") == "FAIL"
    assert "no message within 5 s" in result.outcomes[0].reason


def test_expected_capability_is_enforced() -> None:
    """--capability names the capability the driver must declare."""
    result = run_kit(sample("good"), capability="cron")
    assert result.status_of("hello.capability") == "FAIL"


def test_cli_exit_status_and_lines() -> None:
    """The CLI prints one line per check and exits 1 when a check fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "corral.conformance", "--", *sample("wrong-token")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.split(" ")[0] in
             {"PASS", "FAIL", "SKIP"}]
    assert len(lines) == len(CHECKS)
    assert lines[3].startswith("FAIL hello.token:")


def _installed() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group="corral.drivers"), key=lambda e: e.name)


@pytest.mark.parametrize("entry_point", _installed(), ids=lambda e: e.name)
def test_installed_driver_conforms(entry_point: importlib.metadata.EntryPoint) -> None:
    """Each installed driver, started from its DriverDescription, passes every check."""
    desc = entry_point.load()
    assert isinstance(desc, DriverDescription), f"{entry_point.value} is not a DriverDescription"
    result = run_kit(desc.command(), capability=desc.capability)
    assert result.passed, result.report()
