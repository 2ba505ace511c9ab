"""Backends of a service and their metrics: requests, active connections, latency, 5xx."""

from __future__ import annotations

import enum
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

# Latency bucket upper bounds in seconds: fine below 10 ms where a loopback proxy lives,
# coarse above where only the order of magnitude matters.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class LatencyHistogram:
    """Fixed-bucket latency histogram; ``observe`` is O(log buckets) and allocation-free."""

    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one sample of ``seconds``."""
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if self.total == 0:
            return None
        rank = q * self.total
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else float("inf")
        return float("inf")

    def snapshot(self) -> dict[str, Any]:
        """Buckets as ``{"le": bound, "count": n}`` (Prometheus-style, not cumulative) + summary."""
        buckets = [
            {"le": LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else "+Inf", "count": n}
            for i, n in enumerate(self.counts)
        ]
        return {
            "count": self.total,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "buckets": buckets,
        }


class BackendState(enum.Enum):
    """Where a backend is in its life: joining until healthy, then in service until drained."""

    JOINING = "joining"  # added, not yet passed `rise` health checks: gets no traffic
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failed `fall` checks: gets no new traffic, may come back
    DRAINING = "draining"  # being removed: no new traffic, existing work finishes


@dataclass(eq=False, slots=True)
class Backend:
    """One upstream address of a service, with live counters the policies read."""

    id: str
    host: str
    port: int
    weight: int = 1
    state: BackendState = BackendState.JOINING
    # live load: `active` is open client connections (L4) or upstream connections in use (HTTP);
    # `outstanding` is requests in flight (HTTP) or connections (L4): what p2c compares.
    active: int = 0
    outstanding: int = 0
    requests: int = 0
    errors_5xx: int = 0
    connect_failures: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    last_health: str = ""

    @property
    def eligible(self) -> bool:
        """True when the backend may receive new connections or requests."""
        return self.state is BackendState.HEALTHY and self.weight > 0

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    def status(self) -> dict[str, Any]:
        """Membership and health, as ``query.lb.status`` reports it."""
        return {
            "id": self.id,
            "address": f"{self.host}:{self.port}",
            "weight": self.weight,
            "state": self.state.value,
            "health": self.last_health,
            "active": self.active,
        }

    def metrics(self) -> dict[str, Any]:
        """Counters and latency, as ``query.lb.metrics`` reports them."""
        return {
            "id": self.id,
            "requests": self.requests,
            "active": self.active,
            "outstanding": self.outstanding,
            "errors_5xx": self.errors_5xx,
            "connect_failures": self.connect_failures,
            "latency": self.latency.snapshot(),
        }
