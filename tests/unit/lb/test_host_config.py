"""The lb driver's host config keys that are read as durations."""

from __future__ import annotations

import pytest

from corral.errors import CorralError, ErrorCode
from corral_lb.config import HTTP_IDLE_TIMEOUT, TCP_IDLE_TIMEOUT, proxy_timeouts


def test_proxy_timeouts_defaults_values_and_off() -> None:
    assert proxy_timeouts({}) == (TCP_IDLE_TIMEOUT, HTTP_IDLE_TIMEOUT) == (3600.0, 75.0)
    assert proxy_timeouts({"tcp_idle_timeout": "10m", "http_idle_timeout": 30}) == (600.0, 30.0)
    assert proxy_timeouts({"tcp_idle_timeout": 0, "http_idle_timeout": "0s"}) == (0.0, 0.0)


@pytest.mark.parametrize(("key", "value"), [
    ("tcp_idle_timeout", "soon"), ("http_idle_timeout", -5), ("http_idle_timeout", True),
    ("tcp_idle_timeout", ["1h"]),
])
def test_a_bad_timeout_names_its_key(key: str, value: object) -> None:
    with pytest.raises(CorralError) as e:
        proxy_timeouts({key: value})
    assert e.value.code == ErrorCode.INVALID
    assert f"[drivers.lb] config: {key}:" in str(e.value)
