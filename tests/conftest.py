"""Suite-wide rules: tests marked ``root`` run for real, and under CI=true they fail, not skip."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, why: str) -> None:
    """Skip the running test when ``condition`` is false; under CI=true, fail it instead.

    Use it for every facility a real test depends on (root, nftables, cgroups, a binary), so
    that CI can never turn green by skipping enforcement tests.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"cannot run under CI=true: {why}", pytrace=False)
    pytest.skip(why)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require(os.geteuid() == 0, "needs root (netns, nftables, mounts, cgroups, uids)")
