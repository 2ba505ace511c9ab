"""corrald as a process: what it loads, and `corral daemon` being the same thing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corral.errors import CorralError
from corral.testing import KernelProcess, wait_for

# no drivers at all, so no sandbox: said on purpose, as a host must (else deploys are refused)
NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


def openssl_mapped(pid: int) -> list[str]:
    """libssl/libcrypto files mapped into process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines()
                   if len(line.split()) >= 6 and ("libcrypto" in line or "libssl" in line)})


def test_kernel_never_maps_openssl(tmp_path: Path) -> None:
    """The kernel speaks only local IPC: libssl/libcrypto stay out of its address space
    (~6 MiB of its idle-RSS budget), and it still serves requests."""
    with KernelProcess(tmp_path, NO_DRIVERS) as k:
        assert k.proc is not None
        assert k.call("kernel.status")["pid"] == k.proc.pid
        assert openssl_mapped(k.proc.pid) == []


def test_corral_daemon_is_corrald(tmp_path: Path) -> None:
    """`corral daemon` replaces itself with corrald (same pid, for service managers), so the
    kernel it runs is as lean as corrald's, although the CLI loaded asyncio and OpenSSL."""
    k = KernelProcess(tmp_path, NO_DRIVERS)
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "daemon", "--stop-drivers"],
                            env=k.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def status() -> dict[str, object] | None:
            try:
                return k.call("kernel.status", timeout=1.0)
            except CorralError:
                return None

        st = wait_for(status, 20, 0.05, what="corral daemon serving")
        assert st["pid"] == proc.pid
        assert openssl_mapped(proc.pid) == []
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_stopped_kernel_leaves_no_socket_behind(tmp_path: Path) -> None:
    """SIGTERM: the kernel removes its bus and events socket files and its pid file, so no
    client takes a leftover socket for a running kernel (libzmq leaves ipc files behind)."""
    k = KernelProcess(tmp_path, NO_DRIVERS).start()
    sockets = [k.runtime / "bus.sock", k.runtime / "events.sock"]
    assert all(p.exists() for p in sockets)
    k.stop()
    assert [p for p in (*sockets, k.runtime / "kernel.pid") if p.exists()] == []
