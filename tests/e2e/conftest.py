"""Fixtures for end-to-end tests: directories an unprivileged app uid can reach."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing import KernelProcess, new_net_host, remove_tree, running_kernel


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory under /tmp with mode 0755 (pytest's tmp_path sits under a 0700 dir,
    which an app's dynamic uid cannot traverse)."""
    d = Path(tempfile.mkdtemp(prefix="corral-e2e-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    remove_tree(d)


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    """A real kernel with the net, fs, lb and log drivers, scoped to names of its own (a
    module that needs another kernel defines its own ``kernel`` fixture, which wins)."""
    from e2e.test_lb_deployed import DRIVERS, require_net

    require_net()
    with running_kernel(public_dir / "k", new_net_host().host_toml(DRIVERS),
                        drivers=DRIVERS) as k:
        yield k
