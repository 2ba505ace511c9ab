"""A balanced service: one registered name, its backends, their health and the policy.

Both data planes read the same ``Service``: the proxy asks it to ``pick`` per connection or
request, the nft plane listens for membership changes and rewrites its slot map.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from corral_lb.backend import Backend, BackendState
from corral_lb.config import LbConfig
from corral_lb.health import HealthCounter, probe
from corral_lb.policy import Policy, make_policy

log = structlog.get_logger("corral_lb")

# While a backend is joining, probe it this often (HAProxy's "fastinter"), so that a rolling
# deploy or an on-demand start does not wait a whole interval for the first pass.
JOINING_PROBE_INTERVAL = 0.05
ON_DEMAND_PROBE_INTERVAL = 0.002


class ConnectionPicker(Protocol):
    """An asynchronous per-connection choice (a policy program); None means use the default."""

    async def pick(self, service: Service, client: str, host: str) -> Backend | None:
        """Return an eligible backend of ``service`` or None (the caller falls back)."""
        ...


class Activation(Protocol):
    """Starts an instance on demand (see ``corral_lb.activation.OnDemand``)."""

    async def activate(self) -> None:
        """Make sure an instance is starting or running; return once it was asked to start."""
        ...

    async def close(self) -> None:
        """Stop watching for idleness and stop the instance this activation started."""
        ...


class Service:
    """Backends of one lb name, their health, and the choice among them."""

    def __init__(
        self, config: LbConfig, *, app: str = "", policy: Policy | None = None
    ) -> None:
        self.config = config
        self.app = app
        self.name = config.name
        self.policy: Policy = policy or make_policy(config.policy_name)
        self.hash_header = (config.hash_header or "").lower().encode()
        self.backends: dict[str, Backend] = {}
        self.eligible: list[Backend] = []
        self.connections = 0  # client connections currently bound to this service
        self.last_activity = time.monotonic()
        self.picker: ConnectionPicker | None = None
        self.activation: Activation | None = None
        self.weight_overrides: dict[str, int] = {}
        # callbacks: membership changed (nft plane, policy program); backend removed (proxies
        # close what they still hold); counters of connections the proxy cannot see (nft).
        self.on_change: list[Callable[[Service], None]] = []
        self.on_remove: list[Callable[[Backend], None]] = []
        self.active_probe: Callable[[Backend], int] | None = None
        self._ready = asyncio.Event()
        self._health: dict[str, asyncio.Task[None]] = {}

    # -- membership -------------------------------------------------------------------------

    def add(
        self, backend_id: str, host: str, port: int, *, weight: int = 1, healthy: bool = False
    ) -> Backend:
        """Add a backend (idempotent per id); it gets traffic once its health checks pass."""
        existing = self.backends.get(backend_id)
        if existing is not None and existing.address == (host, port):
            return existing
        if existing is not None:
            self.remove(backend_id)
        b = Backend(
            id=backend_id,
            host=host,
            port=port,
            weight=self.weight_overrides.get(backend_id, weight),
            state=BackendState.HEALTHY if healthy else BackendState.JOINING,
        )
        self.backends[backend_id] = b
        self._health[backend_id] = asyncio.get_running_loop().create_task(
            self._watch_health(b, up=healthy), name=f"health {self.name} {backend_id}"
        )
        log.info("backend added", service=self.name, backend=backend_id, address=f"{host}:{port}")
        self._recompute()
        return b

    def remove(self, backend_id: str) -> Backend | None:
        """Remove a backend at once, closing whatever the proxies still hold to it."""
        b = self.backends.pop(backend_id, None)
        task = self._health.pop(backend_id, None)
        if task is not None:
            task.cancel()
        if b is None:
            return None
        b.state = BackendState.DRAINING
        self._recompute()
        for close in list(self.on_remove):
            close(b)
        log.info("backend removed", service=self.name, backend=backend_id)
        return b

    async def drain(self, backend_id: str, timeout: float | None = None) -> bool:
        """Stop new traffic to a backend, wait for its active work (up to ``timeout``), remove.

        Returns True when the backend finished its work in time, False when it was cut off.
        """
        b = self.backends.get(backend_id)
        if b is None:
            return True
        b.state = BackendState.DRAINING
        self._recompute()
        deadline = time.monotonic() + (self.config.drain if timeout is None else timeout)
        clean = True
        while self._busy(b):
            if time.monotonic() >= deadline:
                clean = False
                log.warning("drain timed out", service=self.name, backend=backend_id,
                            active=b.active, outstanding=b.outstanding)
                break
            await asyncio.sleep(0.01)
        self.remove(backend_id)
        return clean

    def _busy(self, b: Backend) -> bool:
        if b.active or b.outstanding:
            return True
        return self.active_probe is not None and self.active_probe(b) > 0

    def set_weights(self, weights: dict[str, int]) -> None:
        """Apply a weights table (from a policy program); unknown ids are kept for later."""
        self.weight_overrides = {k: max(0, int(v)) for k, v in weights.items()}
        for b in self.backends.values():
            if b.id in self.weight_overrides:
                b.weight = self.weight_overrides[b.id]
        self._recompute()

    def _recompute(self) -> None:
        self.eligible = sorted(
            (b for b in self.backends.values() if b.eligible), key=lambda b: b.id
        )
        if self.eligible:
            self._ready.set()
        else:
            self._ready.clear()
        for notify in list(self.on_change):
            notify(self)

    # -- choosing -------------------------------------------------------------------------

    def pick(self, key: bytes | None = None) -> Backend | None:
        """The policy's choice among eligible backends (None when there is none)."""
        return self.policy.pick(self.eligible, key)

    async def acquire(
        self, key: bytes | None = None, *, client: str = "", host: str = "", timeout: float = 10.0
    ) -> Backend | None:
        """Choose a backend, starting one on demand or waiting for one to turn healthy."""
        if self.picker is not None and self.eligible:
            chosen = await self.picker.pick(self, client, host)
            if chosen is not None and chosen.eligible:
                return chosen
        b = self.policy.pick(self.eligible, key)
        if b is not None:
            return b
        if self.activation is not None:
            await self.activation.activate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.eligible:
                    await self._ready.wait()
        return self.policy.pick(self.eligible, key)

    def touch(self) -> None:
        """Note client activity (on-demand idleness is measured from the last one)."""
        self.last_activity = time.monotonic()

    # -- health ---------------------------------------------------------------------------

    async def _watch_health(self, b: Backend, *, up: bool) -> None:
        cfg = self.config.health
        counter = HealthCounter(cfg.rise, cfg.fall, up=up)
        fast = ON_DEMAND_PROBE_INTERVAL if self.activation is not None else JOINING_PROBE_INTERVAL
        hostname = self.name
        while True:
            failure = await probe(b.host, b.port, cfg, hostname)
            b.last_health = failure or "ok"
            change = counter.record(not failure)
            if change is not None and b.state is not BackendState.DRAINING:
                b.state = BackendState.HEALTHY if change else BackendState.UNHEALTHY
                log.info("backend health", service=self.name, backend=b.id,
                         state=b.state.value, detail=b.last_health)
                self._recompute()
            if counter.up:
                await asyncio.sleep(cfg.interval)
            elif b.state is BackendState.JOINING:
                await asyncio.sleep(min(cfg.interval, fast))
            else:
                await asyncio.sleep(cfg.interval)

    # -- reporting / teardown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Name, frontend, plane, policy and every backend with its health."""
        return {
            "name": self.name,
            "app": self.app,
            "frontend": "{}:{}".format(*self.config.listen),
            "plane": self.config.plane,
            "mode": self.config.mode,
            "policy": self.policy.name,
            "activation": self.config.activation,
            "connections": self.connections,
            "backends": [b.status() for b in self.backends.values()],
        }

    def metrics(self) -> dict[str, Any]:
        """Per-backend counters and latency histograms."""
        return {"app": self.app, "name": self.name,
                "backends": [b.metrics() for b in self.backends.values()]}

    async def close(self) -> None:
        """Stop health checks and any on-demand instance; remove every backend."""
        if self.activation is not None:
            await self.activation.close()
        for bid in list(self.backends):
            self.remove(bid)
