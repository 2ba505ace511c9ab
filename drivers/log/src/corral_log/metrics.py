"""Per-instance resource figures (psutil) and the Prometheus text endpoint.

The endpoint also serves figures the log driver polls from the kernel every sample interval:
the kernel's own (``kernel.status``) and the lb's per backend (``driver.query lb metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry


@dataclass
class Usage:
    """One instance's figures at the last sample (its process and all descendants)."""

    app: str
    process: str
    instance: str
    pid: int
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    open_files: int = 0
    threads: int = 0
    connections: int = 0
    processes: int = 0
    sampled_at: float = 0.0
    alive: bool = True


class InstanceSampler:
    """Keeps one psutil.Process per pid (cpu_percent needs the previous sample) and samples
    each with ``oneshot()``; the instance's descendants are summed into it."""

    def __init__(self) -> None:
        self.instances: dict[str, tuple[psutil.Process, Usage]] = {}
        self._procs: dict[tuple[int, float], psutil.Process] = {}
        self._lock = threading.Lock()  # the periodic sample and an on-demand one (top) may meet

    def track(self, app: str, process: str, instance: str, pid: int, start_time: float) -> None:
        """Sample ``pid`` as ``instance`` if it is the process that started at ``start_time``."""
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - start_time) > 1.0:
                return  # pid reused: not our instance
        except psutil.Error:
            return
        self.instances[instance] = (p, Usage(app, process, instance, pid))

    def forget(self, instance: str) -> None:
        """Stop sampling an instance."""
        self.instances.pop(instance, None)

    def _proc(self, p: psutil.Process) -> psutil.Process:
        key = (p.pid, p.create_time())
        return self._procs.setdefault(key, p)

    def sample(self) -> None:
        """Refresh every instance's figures (blocking; a few hundred µs per process)."""
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        seen: set[tuple[int, float]] = set()
        for _instance, (root, usage) in list(self.instances.items()):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                usage.alive = False
                continue
            cpu = 0.0
            rss = fds = threads = conns = count = 0
            for child in procs:
                try:
                    p = self._proc(child)
                    with p.oneshot():
                        seen.add((p.pid, p.create_time()))
                        cpu += p.cpu_percent(None)
                        rss += p.memory_info().rss
                        with contextlib.suppress(psutil.AccessDenied):
                            fds += p.num_fds()
                        threads += p.num_threads()
                        with contextlib.suppress(psutil.AccessDenied):
                            conns += len(p.net_connections(kind="inet"))
                        count += 1
                except psutil.Error:
                    continue
            usage.cpu_percent, usage.rss_bytes, usage.open_files = round(cpu, 1), rss, fds
            usage.threads, usage.connections, usage.processes = threads, conns, count
            usage.sampled_at = time.time()
            usage.alive = count > 0
        for key in [k for k in self._procs if k not in seen]:
            del self._procs[key]

    def top(self, app: str | None = None) -> list[dict[str, Any]]:
        """The last sample of each instance (of ``app``), highest CPU first."""
        rows = [asdict(u) for _, u in self.instances.values() if app is None or u.app == app]
        return sorted(rows, key=lambda r: (-r["cpu_percent"], r["instance"]))


KernelCall = Callable[[str, dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]
POLL_TIMEOUT_S = 2.0


class PolledFigures:
    """The kernel's status and the lb's per-backend metrics as last polled (None: the kernel
    or the lb did not answer, e.g. no lb driver is installed)."""

    def __init__(self) -> None:
        self.kernel: dict[str, Any] | None = None
        self.lb: dict[str, Any] | None = None
        self.polled_at = 0.0

    async def poll(self, call: KernelCall) -> None:
        """Ask the kernel for both; a failure blanks that part until the next poll."""
        self.kernel = await _answer(call("kernel.status", {}))
        self.lb = await _answer(call("driver.query", {"capability": "lb", "query": "metrics",
                                                      "args": {}}))
        self.polled_at = time.time()


async def _answer(request: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await asyncio.wait_for(request, POLL_TIMEOUT_S)
    except Exception:  # unavailable, timed out, refused: the endpoint shows it as down
        return None


def kernel_families(status: dict[str, Any] | None) -> list[Metric]:
    """``corral_kernel_*``: up, uptime, peers, ledger revision, apps, instances, drivers by
    state, bus messages received/refused and handling errors."""
    up = GaugeMetricFamily("corral_kernel_up", "1 if the kernel answered the last poll")
    up.add_metric([], 1.0 if status else 0.0)
    fams: list[Metric] = [up]
    if not status:
        return fams
    fams += _scalars(GaugeMetricFamily, status, (
        ("uptime_seconds", "uptime_s", "seconds since the kernel started"),
        ("peers", "peers", "peers connected to the bus (drivers and clients)"),
        ("ledger_revision", "revision", "the ledger's revision"),
        ("apps", "apps", "deployed apps"),
        ("instances", "instances", "instances the kernel watches"),
    ))
    drivers = GaugeMetricFamily("corral_kernel_drivers", "drivers by state", labels=["state"])
    for state, n in sorted((status.get("drivers") or {}).items()):
        drivers.add_metric([state], float(n))
    fams.append(drivers)
    fams += _scalars(CounterMetricFamily, status.get("bus") or {}, (
        ("bus_messages_received", "received", "messages received on the bus"),
        ("bus_messages_refused", "refused", "messages refused (peer not admitted)"),
        ("bus_errors", "errors", "messages whose handling failed"),
    ))
    return fams


def _scalars(family: type[GaugeMetricFamily] | type[CounterMetricFamily],
             source: dict[str, Any], table: tuple[tuple[str, str, str], ...]) -> list[Metric]:
    """One unlabelled ``corral_kernel_<name>`` family per (name, key, doc) whose key is in
    ``source``."""
    out: list[Metric] = []
    for name, key, doc in table:
        if source.get(key) is not None:  # a revision the ledger could not give: none
            f = family(f"corral_kernel_{name}", doc)
            f.add_metric([], float(source[key]))
            out.append(f)
    return out


def lb_families(metrics: dict[str, Any] | None) -> list[Metric]:
    """``corral_lb_*`` per backend: requests, active, outstanding, 5xx, connect failures,
    the latency histogram (seconds) and its p50/p99; per proxy frontend (``frontend_*``,
    labelled with the address it listens on): client connections accepted and open, and
    those cut by restarts of the lb driver."""
    up = GaugeMetricFamily("corral_lb_up", "1 if the lb driver answered the last poll")
    up.add_metric([], 1.0 if metrics is not None else 0.0)
    labels = ["app", "name", "backend"]
    requests = CounterMetricFamily("corral_lb_requests", "requests (tcp: connections) forwarded",
                                   labels=labels)
    errors = CounterMetricFamily("corral_lb_errors_5xx", "5xx answers", labels=labels)
    failures = CounterMetricFamily("corral_lb_connect_failures", "failed connects to the backend",
                                   labels=labels)
    active = GaugeMetricFamily("corral_lb_active", "active connections", labels=labels)
    outstanding = GaugeMetricFamily("corral_lb_outstanding", "requests in flight", labels=labels)
    latency = HistogramMetricFamily("corral_lb_latency_seconds",
                                    "request latency (tcp: connection lifetime)", labels=labels)
    p50 = GaugeMetricFamily("corral_lb_latency_p50_seconds", "median latency (bucket bound)",
                            labels=labels)
    p99 = GaugeMetricFamily("corral_lb_latency_p99_seconds", "99th percentile latency "
                            "(bucket bound)", labels=labels)
    flabels = ["app", "name", "listen"]
    accepted = CounterMetricFamily("corral_lb_frontend_accepted", "client connections accepted "
                                   "by the current lb process", labels=flabels)
    open_ = GaugeMetricFamily("corral_lb_frontend_connections", "client connections open",
                              labels=flabels)
    cut = CounterMetricFamily("corral_lb_frontend_cut_by_restart", "client connections open "
                              "when an lb driver process ended (a crash or a restart cut "
                              "them), summed since boot", labels=flabels)
    cut_last = GaugeMetricFamily("corral_lb_frontend_cut_by_last_restart", "client "
                                 "connections open when the previous lb process ended",
                                 labels=flabels)
    for svc in (metrics or {}).get("services", []):
        fe = svc.get("frontend")
        if isinstance(fe, dict):
            fv = [str(svc.get("app", "")), str(svc.get("name", "")), str(fe.get("listen", ""))]
            accepted.add_metric(fv, float(fe.get("accepted", 0)))
            open_.add_metric(fv, float(fe.get("active", 0)))
            cut.add_metric(fv, float(fe.get("cut_by_restart", 0)))
            cut_last.add_metric(fv, float(fe.get("cut_by_last_restart", 0)))
        for b in svc.get("backends", []):
            lv = [str(svc.get("app", "")), str(svc.get("name", "")), str(b.get("id", ""))]
            requests.add_metric(lv, float(b.get("requests", 0)))
            errors.add_metric(lv, float(b.get("errors_5xx", 0)))
            failures.add_metric(lv, float(b.get("connect_failures", 0)))
            active.add_metric(lv, float(b.get("active", 0)))
            outstanding.add_metric(lv, float(b.get("outstanding", 0)))
            lat = b.get("latency") or {}
            cumulative, buckets = 0, []
            for bucket in lat.get("buckets", []):
                cumulative += int(bucket["count"])
                le = bucket["le"]
                buckets.append(("+Inf" if le == "+Inf" else repr(float(le)), float(cumulative)))
            if buckets:
                latency.add_metric(lv, buckets, float(lat.get("sum", 0.0)))
            for fam, key in ((p50, "p50"), (p99, "p99")):
                if lat.get(key) is not None:
                    fam.add_metric(lv, float(lat[key]))
    return [up, requests, errors, failures, active, outstanding, latency, p50, p99,
            accepted, open_, cut, cut_last]


class DriverCollector(Collector):
    """Exposes instance usage, the driver's own counters, and the polled kernel and lb
    figures to prometheus_client."""

    def __init__(self, sampler: InstanceSampler, stats: Callable[[], dict[str, Any]],
                 figures: PolledFigures | None = None) -> None:
        self.sampler = sampler
        self.stats = stats
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        """One family per figure."""
        labels = ["app", "process", "instance"]
        fams = {
            "cpu_percent": GaugeMetricFamily(
                "corral_instance_cpu_percent", "CPU use of the instance's processes", labels=labels
            ),
            "rss_bytes": GaugeMetricFamily(
                "corral_instance_rss_bytes", "resident memory of the instance", labels=labels
            ),
            "open_files": GaugeMetricFamily(
                "corral_instance_open_fds", "open file descriptors", labels=labels
            ),
            "threads": GaugeMetricFamily("corral_instance_threads", "threads", labels=labels),
            "connections": GaugeMetricFamily(
                "corral_instance_connections", "inet sockets", labels=labels
            ),
        }
        for _, u in self.sampler.instances.values():
            for key, fam in fams.items():
                fam.add_metric([u.app, u.process, u.instance], float(getattr(u, key)))
        yield from fams.values()
        st = self.stats()
        records = CounterMetricFamily("corral_log_records", "records captured", labels=["app"])
        nbytes = CounterMetricFamily(
            "corral_log_bytes", "bytes stored by the default sink", labels=["app"]
        )
        for app, a in st["apps"].items():
            records.add_metric([app], a["records"])
            nbytes.add_metric([app], a["bytes"])
        yield records
        yield nbytes
        sl = ["app", "sink"]
        delivered = CounterMetricFamily(
            "corral_log_sink_delivered_lines", "lines delivered", labels=sl
        )
        dropped = CounterMetricFamily(
            "corral_log_sink_dropped_lines", "lines dropped (spool full)", labels=sl
        )
        rejected = CounterMetricFamily(
            "corral_log_sink_rejected_lines", "lines refused by the receiver", labels=sl
        )
        spooled = GaugeMetricFamily(
            "corral_log_sink_spooled_bytes", "bytes waiting in the spool", labels=sl
        )
        up = GaugeMetricFamily(
            "corral_log_sink_up", "1 if the sink's last delivery worked", labels=sl
        )
        for app, a in st["apps"].items():
            for name, s in a["sinks"].items():
                delivered.add_metric([app, name], s["delivered_lines"])
                dropped.add_metric([app, name], s["dropped_lines"])
                rejected.add_metric([app, name], s["rejected_lines"])
                spooled.add_metric([app, name], s["spooled_bytes"])
                up.add_metric([app, name], 1.0 if s["up"] else 0.0)
        yield from (delivered, dropped, rejected, spooled, up)
        if self.figures is not None:
            yield from kernel_families(self.figures.kernel)
            yield from lb_families(self.figures.lb)


def serve_metrics(collector: DriverCollector, address: str, port: int) -> tuple[Any, int]:
    """Start the /metrics HTTP endpoint on a thread; (server, bound port)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, int(server.server_port)
