"""Shared by the kernel benchmarks: a real kernel in a private, world-traversable directory."""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from corral.testing import KernelProcess, drivers_running, new_net_host, remove_tree

# no drivers, so no sandbox: a host must say so on purpose (else deploys are refused)
NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


@contextmanager
def kernel(host_toml: str = NO_DRIVERS, *, drivers: Sequence[str] = (),
           timeout: float = 30.0) -> Iterator[KernelProcess]:
    """Start corrald; tear everything down afterwards. ``drivers``: wait until these are
    running (connected) before yielding."""
    base = Path(tempfile.mkdtemp(prefix="corral-bench-", dir="/tmp"))
    base.chmod(0o755)
    k = KernelProcess(base, host_toml)
    try:
        k.start()
        deadline = time.monotonic() + timeout
        while drivers and not drivers_running(k, drivers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"drivers {', '.join(drivers)} did not start: {k.log()}")
            time.sleep(0.1)
        yield k
    finally:
        k.teardown()
        remove_tree(base)


def scoped_host_toml(drivers: Sequence[str]) -> str:
    """A host config enabling exactly ``drivers``, the net and lb drivers' address pools,
    nft tables, netns and link names unique to this run (as the e2e tests scope theirs), so
    other kernels on this machine are never touched."""
    return new_net_host().host_toml(tuple(drivers))


def exit_on_sigterm() -> None:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so ``finally`` blocks clean up."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
