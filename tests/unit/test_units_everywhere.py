"""One notation of sizes, durations and instants: every caller reads a text the same way.

Each test feeds the same text to ``corral.units`` and to a place that used to have its own
parser (fs limits, log sinks and ``since``, lb host config, cron jobs, ``corral logs``)."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import pytest

from corral.cli._observe import add_parsers, since_arg
from corral.errors import CorralError, ErrorCode
from corral.units import UnitError, parse_duration, parse_instant, parse_since, parse_size
from corral_cron._duration import parse_duration as cron_duration
from corral_fs._cgroups import Limits
from corral_lb.config import HealthConfig, proxy_limits, proxy_timeouts
from corral_log.reading import since_ns
from corral_log.sinks import HttpSinkSpec, parse_sinks

NOW_NS = 1_714_564_800_000_000_000  # 2024-05-01T12:00:00Z


@pytest.mark.parametrize(("text", "size"), [
    ("100MB", 100_000_000), ("100MiB", 104_857_600), ("1GB", 10**9), ("512M", 512 << 20),
    ("1.5KiB", 1536), ("4096", 4096),
])
def test_a_size_means_the_same_everywhere(text: str, size: int) -> None:
    """"100MB" is 10^8 bytes (and "100MiB" 2^20 * 100) in the fs limits, the log sinks and
    the lb host config alike: the fs driver used to read "100MB" as 104,857,600."""
    assert parse_size(text) == size
    assert Limits.from_manifest({"limits": {"memory": text}}).memory == size
    assert HttpSinkSpec(type="http", url="http://loki/", batch=text).batch_bytes() == size
    assert proxy_limits({"max_body_size": text})[0] == size


@pytest.mark.parametrize(("text", "seconds"), [
    ("1h30m", 5400.0), ("1d", 86400.0), ("250ms", 0.25), ("2d12h", 216000.0), ("90s", 90.0),
])
def test_a_duration_means_the_same_everywhere(text: str, seconds: float) -> None:
    """"1h30m" and "1d" are read alike by the cron jobs, the lb manifest and host config, the
    log sinks and the log driver's ``since`` (lb refused "1d", log refused "1h30m")."""
    assert parse_duration(text) == seconds
    assert cron_duration(text) == timedelta(seconds=seconds)
    assert HealthConfig(interval=text).interval == seconds
    assert proxy_timeouts({"tcp_idle_timeout": text, "http_idle_timeout": text}) == (
        seconds, seconds)
    assert HttpSinkSpec(type="http", url="http://loki/", linger=text).linger_s() == seconds
    assert since_ns(text, NOW_NS) == NOW_NS - int(seconds * 1e9)


@pytest.mark.parametrize("text", ["soon", "10", "1 hour", "-5m", "1w", ""])
def test_an_unreadable_duration_is_refused_everywhere(text: str) -> None:
    """What the notation does not know is refused by every caller, each in its own terms."""
    with pytest.raises(UnitError):
        parse_duration(text)
    with pytest.raises(ValueError):
        cron_duration(text)
    with pytest.raises(ValueError):
        HealthConfig(interval=text)
    with pytest.raises(CorralError) as err:
        proxy_timeouts({"tcp_idle_timeout": text})
    assert err.value.code == ErrorCode.INVALID and "tcp_idle_timeout" in str(err.value)
    with pytest.raises(ValueError):
        parse_sinks([{"type": "file", "path": "x.log", "rotate_every": text}])


def test_an_unreadable_size_is_refused_everywhere() -> None:
    """"100MeB" is refused by the fs limits, the log sinks and the lb host config."""
    with pytest.raises(UnitError, match="unknown unit 'MeB'"):
        Limits.from_manifest({"limits": {"memory": "100MeB"}})
    with pytest.raises(ValueError):
        parse_sinks([{"type": "file", "path": "x.log", "rotate": "100MeB"}])
    with pytest.raises(CorralError, match="max_body_size"):
        proxy_limits({"max_body_size": "100MeB"})


@pytest.mark.parametrize(("text", "ns"), [
    ("2024-05-01T12:00:00Z", NOW_NS),
    ("2024-05-01T12:00:00", NOW_NS),
    ("2024-05-01T14:00:00+02:00", NOW_NS),
    ("2024-05-01T12:00:00.123456789Z", NOW_NS + 123_456_789),
    ("2024-05-01T12:00:00.5Z", NOW_NS + 500_000_000),
])
def test_an_instant_is_iso_8601_utc_unless_it_says_otherwise(text: str, ns: int) -> None:
    """An ISO 8601 ``since`` keeps nanoseconds and its offset; no offset means UTC."""
    assert parse_instant(text) == ns
    assert parse_since(text, now_ns=0) == ns
    assert since_ns(text, now_ns=0) == ns


def test_since_refuses_what_is_neither_a_duration_nor_an_instant() -> None:
    """The log driver answers INVALID, naming ``since`` and what would do."""
    for text in ("yesterday", "2024-13-01T00:00:00Z", "10"):
        with pytest.raises(CorralError) as err:
            since_ns(text, NOW_NS)
        assert err.value.code == ErrorCode.INVALID
        assert 'such as "10m" or "1h30m"' in str(err.value)
    assert since_ns(None) is None and since_ns("") is None
    assert since_ns(1.5) == 1_500_000_000  # epoch seconds, as the query always allowed


def _logs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("text", ["1h30m", "10m", "1d", "2024-05-01T12:00:00Z"])
def test_corral_logs_since_takes_the_notation(text: str) -> None:
    """`corral logs --since 1h30m` is accepted (it was refused) and passed on unchanged."""
    ns: Any = _logs_parser().parse_args(["logs", "shop", "--since", text])
    assert ns.since == text
    assert since_arg(text) == text


def test_corral_logs_since_refuses_a_typo_before_asking_the_kernel(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --since is a usage error (exit 2) that says what would do."""
    with pytest.raises(SystemExit) as exit_:
        _logs_parser().parse_args(["logs", "shop", "--since", "1hour"])
    assert exit_.value.code == 2
    assert 'a duration back from now such as "10m"' in capsys.readouterr().err
