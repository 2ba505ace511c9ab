"""corrald as a process: what it loads."""

from __future__ import annotations

from pathlib import Path

from corral.testing import KernelProcess

NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\n'


def test_kernel_never_maps_openssl(tmp_path: Path) -> None:
    """The kernel speaks only local IPC: libssl/libcrypto stay out of its address space
    (~6 MiB of its idle-RSS budget), and it still serves requests."""
    with KernelProcess(tmp_path, NO_DRIVERS) as k:
        assert k.proc is not None
        assert k.call("kernel.status")["pid"] == k.proc.pid
        maps = Path(f"/proc/{k.proc.pid}/maps").read_text()
        mapped = {line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6}
        assert not [p for p in mapped if "libcrypto" in p or "libssl" in p], sorted(mapped)
