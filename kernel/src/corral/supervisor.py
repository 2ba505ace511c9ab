"""Driver supervision: discover drivers, start each as its own process, restart the fallen.

Drivers are found through stevedore entry points in the group ``corral.drivers`` (each targets
a cheap ``DriverDescription``) or named as exec commands in the host config. Each runs in its
own session with a one-time token in ``CORRAL_DRIVER_TOKEN``; its HELLO must carry that token,
so only the process the supervisor started can speak as that driver. A driver whose process
exits is restarted at once (a ``kill -9`` is back well within a second) unless it failed
``restart_limit`` times within ``restart_window_s``: then it is marked failed (flapping), like
Circus' flapping plugin. A driver package that cannot be loaded is disabled with a clear
message; the kernel keeps running.

Drivers outlive the kernel: their pid, start time and token are kept in the ledger (kind
"driver"), and a restarted kernel adopts the live ones instead of starting duplicates; they
reconnect by themselves.

A driver's process inherits the listening sockets the kernel keeps for that driver
(``corral.socketstore``), named in ``CORRAL_KEPT_FDS``; a driver marked failed loses them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from corral.bus import Peer
from corral.errors import CorralError, DriverUnavailableError, ErrorCode
from corral.host import DriverConfig, HostConfig
from corral.launch import describe_exit, is_alive, reap, signal_instance, wait_exit
from corral.ledger import Ledger
from corral.protocol import (
    CAPABILITIES,
    KEPT_FDS_ENV,
    PROTOCOL,
    DriverDescription,
    Hello,
    check_driver_ops,
)
from corral.socketstore import SocketStore

log = structlog.get_logger("corral.supervisor")

NAMESPACE = "corral.drivers"
OWNER = "kernel:supervisor"


@dataclass
class DriverSlot:
    """One configured driver and what the supervisor knows of it."""

    name: str
    capability: str
    command: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""
    state: str = "stopped"  # stopped|starting|running|restarting|failed|disabled
    reason: str = ""
    pid: int | None = None
    start_time: float | None = None
    token: str = ""
    peer: Peer | None = None
    restarts: deque[float] = field(default_factory=deque)
    restart_count: int = 0
    ops: list[str] = field(default_factory=list)
    features: frozenset[str] = field(default_factory=frozenset)
    # connected and its state.sync answered: only then may launches use it (a prepare racing
    # the driver's re-sync would meet state the sync is about to collect)
    synced: bool = False
    sections: frozenset[str] = field(default_factory=frozenset)  # manifest sections it owns
    connected_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The view `corral drivers --json` prints."""
        return {
            "name": self.name,
            "capability": self.capability,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
            "pid": self.pid,
            "restarts": self.restart_count,
            "ops": self.ops,
            "features": sorted(self.features),
            "sections": sorted(self.sections),
            "command": self.command,
        }


def discover(config: HostConfig) -> tuple[list[DriverSlot], list[DriverSlot]]:
    """The enabled drivers, and the disabled ones with the reason (broken packages included)."""
    from stevedore import ExtensionManager  # imported here: the CLI never needs it

    failures: dict[str, str] = {}

    def on_failure(_mgr: Any, ep: Any, exc: BaseException) -> None:
        failures[ep.name] = f"cannot load entry point {ep.value!r}: {type(exc).__name__}: {exc}"

    mgr = ExtensionManager(
        namespace=NAMESPACE, invoke_on_load=False, on_load_failure_callback=on_failure
    )
    found: dict[str, DriverDescription] = {}
    for ext in mgr:
        desc: Any = ext.plugin
        if not isinstance(desc, DriverDescription):
            failures[ext.name] = (
                f"entry point {ext.name!r} does not target a DriverDescription "
                f"(got {type(desc).__name__})"
            )
            continue
        found[ext.name] = desc

    enabled: list[DriverSlot] = []
    disabled: list[DriverSlot] = []
    wanted: dict[str, DriverConfig | None] = dict(config.drivers) or {
        name: None for name in sorted(set(found) | set(failures))
    }
    for name, dconf in wanted.items():
        if name in config.disabled:
            continue
        if dconf is not None and dconf.exec:
            if not dconf.capability:
                disabled.append(DriverSlot(name, "?", list(dconf.exec), state="disabled",
                                           reason="an exec driver needs `capability`"))
                continue
            enabled.append(DriverSlot(name, dconf.capability, list(dconf.exec),
                                      config=dict(dconf.config), env=dict(dconf.env)))
            continue
        ep_name = (dconf.entry_point if dconf and dconf.entry_point else name)
        desc = found.get(ep_name)
        if desc is None:
            reason = failures.get(ep_name, f"no entry point {ep_name!r} in {NAMESPACE}")
            disabled.append(DriverSlot(name, "?", [], state="disabled", reason=reason))
            log.error("driver disabled", driver=name, reason=reason)
            continue
        enabled.append(DriverSlot(name, desc.capability, desc.command(), version=desc.version,
                                  config=dict(dconf.config) if dconf else {},
                                  env=dict(dconf.env) if dconf else {},
                                  sections=frozenset(desc.sections)))
    return enabled, disabled


class Supervisor:
    """Starts, watches, adopts and restarts driver processes."""

    def __init__(
        self,
        config: HostConfig,
        ledger: Ledger,
        *,
        env: dict[str, str],
        log_dir: Path,
        on_ready: Callable[[DriverSlot], Awaitable[None]],
        forget: Callable[[bytes, str], None] = lambda _identity, _why: None,
        sockets: SocketStore | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.env = env
        self.log_dir = log_dir
        self.on_ready = on_ready
        self.forget = forget
        self.sockets = sockets if sockets is not None else SocketStore()
        self.slots: dict[str, DriverSlot] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    def load(self) -> None:
        """Discover drivers (a broken package disables only itself)."""
        enabled, disabled = discover(self.config)
        for slot in [*enabled, *disabled]:
            self.slots[slot.name] = slot

    async def start(self) -> None:
        """Adopt live drivers recorded in the ledger; start the others."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.slots.values():
            if slot.state == "disabled":
                continue
            rec = self.ledger.get("driver", slot.name)
            if rec is not None and _alive(rec.value.get("pid"), rec.value.get("start_time")):
                slot.pid = int(rec.value["pid"])
                slot.start_time = float(rec.value["start_time"])
                slot.token = str(rec.value["token"])
                slot.state = "starting"
                log.info("driver adopted", driver=slot.name, pid=slot.pid)
                self._watch(slot)
            else:
                self._spawn(slot)

    def _spawn(self, slot: DriverSlot) -> None:
        slot.token = secrets.token_hex(16)
        env = {**self.env, **slot.env, "CORRAL_DRIVER_TOKEN": slot.token,
               "CORRAL_DRIVER_NAME": slot.name,
               "PYTHONUNBUFFERED": "1"}  # a driver killed with -9 still leaves its last words
        # the sockets kept for this driver, at the numbers they have here (pass_fds)
        kept = self.sockets.inherited(slot.name)
        if kept:
            env[KEPT_FDS_ENV] = json.dumps(kept)
        out = open(self.log_dir / f"{slot.name}.log", "ab")
        try:
            proc = subprocess.Popen(
                slot.command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, close_fds=True, pass_fds=tuple(kept.values()),
            )
        except OSError as exc:
            slot.state = "failed"
            slot.reason = f"cannot start {slot.command[0]!r}: {exc.strerror}"
            log.error("driver failed to start", driver=slot.name, reason=slot.reason)
            self.sockets.drop(slot.name)
            return
        finally:
            out.close()
        slot.pid = proc.pid
        try:
            slot.start_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            slot.start_time = 0.0
        slot.state = "restarting" if slot.state == "restarting" else "starting"
        slot.peer = None
        self.ledger.claim(OWNER, [_record(slot)])
        log.info("driver started", driver=slot.name, pid=slot.pid)
        self._watch(slot)

    def _watch(self, slot: DriverSlot) -> None:
        assert slot.pid is not None
        self._watchers[slot.name] = asyncio.ensure_future(self._wait_exit(slot, slot.pid))

    async def _wait_exit(self, slot: DriverSlot, pid: int) -> None:
        """Wait for the driver's exit through a pidfd (child or adopted), then restart."""
        await wait_exit(pid)
        status = describe_exit(reap(pid)) or "exited (not our child)"
        if self._closing or slot.pid != pid:
            return
        if slot.peer is not None:  # requests in flight to the dead driver fail now
            self.forget(slot.peer.identity, f"driver {slot.name!r} exited ({status})")
        slot.peer = None
        slot.pid = None
        now = time.monotonic()
        slot.restarts.append(now)
        while slot.restarts and now - slot.restarts[0] > self.config.restart_window_s:
            slot.restarts.popleft()
        if len(slot.restarts) > self.config.restart_limit:
            slot.state = "failed"
            slot.reason = (
                f"exited {len(slot.restarts)} times in {self.config.restart_window_s:.0f}s "
                f"(last: {status}); not restarted. See {self.log_dir / (slot.name + '.log')}"
            )
            log.error("driver flapping", driver=slot.name, reason=slot.reason)
            self.ledger.release(OWNER, [("driver", slot.name)])
            # nobody will accept on its sockets: clients are refused, not left in a backlog
            self.sockets.drop(slot.name)
            return
        slot.restart_count += 1
        slot.state = "restarting"
        slot.reason = f"exited ({status}); restarted"
        log.warning("driver exited", driver=slot.name, status=status)
        self._spawn(slot)

    def accept(self, hello: Hello, peer_uid: int) -> DriverSlot:
        """Check a driver's HELLO: token, capability contract, protocol. Raise to refuse."""
        if PROTOCOL not in hello.protocols:
            raise CorralError(
                f"no common protocol: kernel speaks {PROTOCOL}, driver offers {hello.protocols}",
                code=ErrorCode.VERSION,
            )
        slot = next((s for s in self.slots.values() if s.token and s.token == hello.token), None)
        if slot is None:
            raise CorralError(
                f"driver {hello.name!r}: unknown or missing CORRAL_DRIVER_TOKEN "
                "(drivers are started by the kernel)",
                code=ErrorCode.UNAUTHENTICATED,
            )
        problem = check_driver_ops(hello.capability, hello.ops, hello.features, hello.sections)
        if problem is None:
            problem = self._sections_taken(slot, hello.sections)
        if problem is None and hello.capability != slot.capability:
            problem = (f"configured as capability {slot.capability!r}, "
                       f"HELLO says {hello.capability!r}")
        if problem is not None:
            slot.state = "failed"
            slot.reason = f"HELLO refused: {problem}"
            raise CorralError(f"driver {hello.name!r}: {problem}", code=ErrorCode.INVALID)
        slot.ops = list(hello.ops)
        slot.features = frozenset(hello.features)
        slot.sections = frozenset(hello.sections)
        slot.version = hello.version
        return slot

    def _sections_taken(self, slot: DriverSlot, sections: Iterable[str]) -> str | None:
        """Why ``slot`` may not own ``sections`` (another enabled driver owns one), or None."""
        for other in self.slots.values():
            both = sorted(set(sections) & other.sections)
            if other is not slot and other.state != "disabled" and both:
                return f"sections {both} are owned by driver {other.name!r}"
        return None

    async def connected(self, slot: DriverSlot, peer: Peer) -> None:
        """The driver was welcomed: mark it running and let the kernel sync its state."""
        slot.peer = peer
        slot.synced = False
        slot.state = "running"
        slot.reason = ""
        slot.connected_at = time.time()
        try:
            await self.on_ready(slot)
        finally:
            # only for this session: a state.sync to an earlier session of the same driver
            # that ends late (it reconnected meanwhile) must not touch the current one's flag
            if slot.peer is peer:
                slot.synced = True

    async def lost(self, peer: Peer) -> None:
        """A driver stopped answering heartbeats: kill it, the watcher restarts it."""
        for slot in self.slots.values():
            if slot.peer is peer:
                slot.peer = None
                if slot.pid and not self._closing:
                    log.warning("driver unresponsive, killing", driver=slot.name)
                    _kill(slot.pid, slot.start_time)

    def needed(self, sections: Iterable[str] = ()) -> list[DriverSlot]:
        """The enabled drivers a launch needs, from the host config and the manifest alone.

        Every enabled driver of a capability that takes part in launches (CAPABILITIES'
        ``launch``: net, fs, log), plus, for a deploy, every enabled driver that owns one of
        the manifest's ``sections`` (declared in its description or HELLO: an lb for
        ``[lb]``). Whether a driver happens to be connected right now plays no part: that is
        what is waited for.
        """
        wanted = set(sections)
        out = []
        for slot in self.slots.values():
            if slot.state == "disabled":
                continue
            cap = CAPABILITIES.get(slot.capability)
            if cap is not None and (cap.launch or wanted & slot.sections):
                out.append(slot)
        return out

    def confined(self) -> bool:
        """Whether an enabled driver confines apps (a sandbox capability, e.g. fs)."""
        return any(slot.state != "disabled" and CAPABILITIES.get(slot.capability) is not None
                   and CAPABILITIES[slot.capability].confinement for slot in self.slots.values())

    async def require(self, slots: Iterable[DriverSlot], timeout: float, *, doing: str) -> None:
        """Wait up to ``timeout`` until every slot is connected; else raise, naming each one
        still missing with its state and reason (``corral drivers`` shows the same).

        A failed driver is not waited for: it comes back only by ``corral drivers restart``.
        """
        slots = list(slots)
        deadline = time.monotonic() + timeout
        while True:
            missing = [s for s in slots if s.peer is None or not s.synced]
            if not missing:
                return
            if (time.monotonic() >= deadline
                    or all(s.state in ("failed", "disabled") for s in missing)):
                break
            await asyncio.sleep(0.05)
        first = missing[0]
        parts = [f"driver {s.name!r} ({s.capability}) is "
                 + (s.state if s.peer is None else "connected but not yet synced")
                 + (f": {s.reason}" if s.reason else "") for s in missing]
        hint = ("`corral drivers restart " + first.name + "` starts it again"
                if first.state == "failed" else "retry when `corral drivers` shows it running")
        raise DriverUnavailableError(
            f"{doing} refused: {'; '.join(parts)}; {hint}",
            driver=first.name, state=first.state, driver_reason=first.reason)

    async def wait_settled(self, timeout: float) -> list[str]:
        """Wait until no enabled driver is starting or restarting; the names still pending."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            pending = [s.name for s in self.slots.values()
                       if s.state in ("starting", "restarting")]
            if not pending:
                return []
            await asyncio.sleep(0.05)
        return pending

    async def restart(self, name: str) -> DriverSlot:
        """``corral drivers restart NAME``: forget a failed driver's flapping history and start
        it again, or restart a running one (systemctl reset-failed + restart)."""
        slot = self.slots.get(name)
        if slot is None:
            raise CorralError(f"no driver named {name!r} (known: {', '.join(sorted(self.slots))})",
                              code=ErrorCode.UNKNOWN_OPERATION)
        if slot.state == "disabled":
            raise CorralError(f"driver {name!r} is disabled: {slot.reason}",
                              code=ErrorCode.INVALID)
        slot.restarts.clear()
        if slot.pid is not None and _alive(slot.pid, slot.start_time):
            # the watcher sees the exit and restarts it (the window was just cleared)
            _kill(slot.pid, slot.start_time, signal.SIGKILL)
            return slot
        self._spawn(slot)
        return slot

    def serving(self, op: str) -> list[DriverSlot]:
        """Connected drivers that declared ``op`` and whose state.sync has been answered."""
        return [s for s in self.slots.values()
                if s.peer is not None and s.synced and op in s.ops]

    def by_capability(self, capability: str) -> DriverSlot | None:
        """The connected driver of ``capability``, if any."""
        for s in self.slots.values():
            if s.capability == capability and s.peer is not None:
                return s
        return None

    async def stop(self, *, kill_drivers: bool) -> None:
        """Stop watching; with ``kill_drivers`` also terminate them (else they outlive us)."""
        self._closing = True
        for task in self._watchers.values():
            task.cancel()
        if not kill_drivers:
            return
        for slot in self.slots.values():
            if slot.pid:
                _kill(slot.pid, slot.start_time, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for slot in self.slots.values():
            while slot.pid and _alive(slot.pid, slot.start_time) and time.monotonic() < deadline:
                reap(slot.pid)
                await asyncio.sleep(0.05)
            if slot.pid and _alive(slot.pid, slot.start_time):
                _kill(slot.pid, slot.start_time, signal.SIGKILL)
            if slot.pid:
                reap(slot.pid)
        self.ledger.release(OWNER, [("driver", s.name) for s in self.slots.values()
                                    if self.ledger.get("driver", s.name) is not None])


def _record(slot: DriverSlot) -> Any:
    from corral.ledger import Claim

    return Claim(kind="driver", key=slot.name,
                 value={"pid": slot.pid, "start_time": slot.start_time, "token": slot.token,
                        "command": slot.command})


def _alive(pid: Any, start_time: Any) -> bool:
    """Identity by (pid, start time), as for instances; tolerant of missing ledger values."""
    return bool(pid) and is_alive(int(pid), float(start_time or 0))


def _kill(pid: int, start_time: float | None, sig: int = signal.SIGKILL) -> None:
    signal_instance(pid, float(start_time or 0), sig, group=False)
