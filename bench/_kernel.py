"""Shared by the kernel benchmarks: a real kernel in a private, world-traversable directory."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.testing import KernelProcess, remove_tree

# no drivers, so no sandbox: a host must say so on purpose (else deploys are refused)
NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


@contextmanager
def kernel(host_toml: str = NO_DRIVERS) -> Iterator[KernelProcess]:
    """Start corrald; tear everything down afterwards."""
    base = Path(tempfile.mkdtemp(prefix="corral-bench-", dir="/tmp"))
    base.chmod(0o755)
    k = KernelProcess(base, host_toml)
    try:
        k.start()
        yield k
    finally:
        k.teardown()
        remove_tree(base)
