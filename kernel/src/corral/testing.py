"""Test support shipped for users and driver authors: a real kernel in a private directory.

``KernelProcess`` starts ``corrald`` as a separate process with its own home, runtime
directory and host config, so tests (ours and third-party drivers') exercise the real bus,
ledger and supervisor. Nothing here is a fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from corral.client import KernelClient
from corral.errors import CorralError
from corral.protocol import CAPABILITIES


class KernelProcess:
    """A corrald process rooted at ``base`` (home, run, host.toml beneath it)."""

    def __init__(self, base: Path, host_toml: str = "", *, extra_env: dict[str, str] | None = None
                 ) -> None:
        self.base = base
        self.home = base / "home"
        self.runtime = base / "run"
        self.config = base / "host.toml"
        self.config.write_text(host_toml)
        self.log_path = base / "corrald.log"
        self.env = {
            **os.environ,
            "CORRAL_HOME": str(self.home),
            "CORRAL_RUNTIME_DIR": str(self.runtime),
            "CORRAL_HOST_CONFIG": str(self.config),
            "CORRAL_BUS": f"ipc://{self.runtime / 'bus.sock'}",
            "CORRAL_EVENTS": f"ipc://{self.runtime / 'events.sock'}",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The kernel's bus endpoint."""
        return self.env["CORRAL_BUS"]

    def start(self, timeout: float = 15.0, *, stop_drivers: bool = True) -> KernelProcess:
        """Start corrald and wait until it answers ``kernel.status``."""
        args = [sys.executable, "-m", "corral.daemon"]
        if stop_drivers:
            args.append("--stop-drivers")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corrald exited {self.proc.returncode}: {self.log()}")
            try:
                self.call("kernel.status", timeout=1.0)
                return self
            except CorralError:
                time.sleep(0.05)
        self.proc.kill()  # __exit__ will not run when __enter__ raises: leave nothing behind
        self.proc.wait(5)
        raise RuntimeError(f"corrald did not become ready: {self.log()}")

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0
             ) -> dict[str, Any]:
        """One request to this kernel."""
        return KernelClient(self.endpoint).call(op, args, timeout=timeout)

    def cli(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``corral`` CLI against this kernel."""
        return subprocess.run([sys.executable, "-m", "corral.cli", *argv], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def log(self) -> str:
        """What corrald printed so far."""
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the kernel (drivers and apps are left running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def teardown(self) -> None:
        """Take every app down, stop the kernel and its drivers, kill any app left over."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                for app in self.call("app.ps")["apps"]:
                    self.call("app.down", {"name": app["app"]}, timeout=60)
            except CorralError:
                pass
        self.stop()
        for proc in leftover_apps(self.home):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def __enter__(self) -> KernelProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()


def drivers_running(k: KernelProcess, names: Sequence[str]) -> bool:
    """Whether every driver in ``names`` is running (connected) in kernel ``k``."""
    try:
        states = {d["name"]: d["state"] for d in k.call("drivers.list")["drivers"]}
    except CorralError:
        return False
    return all(states.get(n) == "running" for n in names)


@contextmanager
def running_kernel(base: Path, host_toml: str = "", *, drivers: Sequence[str] = (),
                   timeout: float = 20.0, extra_env: dict[str, str] | None = None
                   ) -> Iterator[KernelProcess]:
    """The one test harness of a real kernel: corrald under ``base`` with ``host_toml``,
    started and waited for until the ``drivers`` named are running, then taken down on exit
    (every app, the kernel, its drivers, and any app process left over). When the drivers do
    not come up, the kernel's and their logs are printed before the failure."""
    base.mkdir(parents=True, exist_ok=True)
    k = KernelProcess(base, host_toml, extra_env=extra_env).start()
    try:
        if drivers:
            try:
                wait_for(lambda: drivers_running(k, drivers), timeout,
                         what=f"drivers {', '.join(drivers)} running")
            except BaseException:
                print(k.log())
                for name in drivers:
                    log = k.home / "drivers" / f"{name}.log"
                    if log.exists():
                        print(f"--- {name}\n{log.read_text()[-3000:]}")
                raise
        yield k
    finally:
        k.teardown()


def _polls(timeout: float, what: str) -> Iterator[None]:
    """Yield until ``timeout`` seconds have passed, then raise AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        yield
    raise AssertionError(f"{what} not met in {timeout}s")


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, step: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (returned); AssertionError on timeout."""
    for _ in _polls(timeout, what):
        if value := cond():
            return value
        time.sleep(step)


async def wait_for_async(cond: Callable[[], Any], timeout: float = 20.0, step: float = 0.01,
                         what: str = "condition") -> Any:
    """:func:`wait_for` inside an event loop: sleeps with ``asyncio.sleep`` so the loop that
    makes ``cond`` true keeps running."""
    for _ in _polls(timeout, what):
        if value := cond():
            return value
        await asyncio.sleep(step)


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, picked by the kernel (bind to port 0 and close),
    never one this process was given before (the kernel may pick a port it just freed
    again: two calls in a row could give one port twice).

    ``"::"`` checks IPv4 and IPv6 at once (a dual-stack socket). Another process may take
    the port before the caller binds it; tests accept that small race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a test directory, but never through a mount: unmount what is below it first.

    A sandbox root left behind by a failed test holds bind mounts of host directories; a
    plain rmtree would walk into them (and into rw grants, deleting host data).
    """
    import shutil

    for target in mounts_below(path):
        subprocess.run(["umount", "--recursive", "--lazy", target], check=False,
                       capture_output=True)
    left = mounts_below(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left[:3]}")
    shutil.rmtree(path, ignore_errors=True)


def leftover_apps(home: Path) -> list[psutil.Process]:
    """Live processes launched for apps of the kernel rooted at ``home``."""
    found = []
    prefix = str(home)
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CORRAL_MANIFEST", "").startswith(prefix):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@dataclass
class NetHost:
    """Names and address ranges unique to one test's kernel."""

    tag: str
    pool4: str
    pool6: str
    table: str
    netns_prefix: str
    link_prefix: str
    lb_table: str
    resolvers: tuple[str, ...] = ()

    def host_toml(self, drivers: tuple[str, ...] = ("net", "fs", "lb", "log")) -> str:
        """The kernel's host config: exactly ``drivers``, net and lb scoped to this tag."""
        sections = {
            "net": f'config = {{ pool4 = "{self.pool4}", pool6 = "{self.pool6}", '
                   f'table = "{self.table}", netns_prefix = "{self.netns_prefix}", '
                   f'link_prefix = "{self.link_prefix}"'
                   + (f", resolvers = {json.dumps(list(self.resolvers))}" if self.resolvers
                      else "") + " }",
            "lb": f'config = {{ nft_table = "{self.lb_table}" }}',
        }
        out = [f'address_pool = "{self.pool4}"', f'address_pool6 = "{self.pool6}"']
        sandboxed = any(CAPABILITIES[d].confinement for d in drivers if d in CAPABILITIES)
        if not sandboxed:  # no sandbox driver: a host must say so, or deploys are refused
            out.append("unconfined = true")
        for name in drivers:
            out.append(f"[drivers.{name}]")
            if name in sections:
                out.append(sections[name])
        return "\n".join(out) + "\n"


def new_net_host() -> NetHost:
    """Random, collision-resistant names for one test's or benchmark's kernel: 'z' + 4 hex
    digits never prefixes another tag's; address ranges drawn at random so that kernels
    side by side (and leftovers of a crashed one) do not meet."""
    tag = secrets.token_hex(2)
    draw = secrets.SystemRandom()
    return NetHost(tag=tag,
                   pool4=f"10.{draw.randint(150, 199)}.{draw.randint(0, 255)}.0/24",
                   pool6=f"fd63:6f72:7262:{draw.randint(0x100, 0xFFFE):x}::/64",
                   table=f"ze{tag}", netns_prefix=f"ze{tag}-", link_prefix=f"z{tag}",
                   lb_table=f"zlb{tag}")
