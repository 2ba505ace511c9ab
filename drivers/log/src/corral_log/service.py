"""The log service: captures instances, runs the pipeline, answers queries (no bus code).

The driver class (``corral_log.driver``) maps CDP/1 operations onto this object; tests and
the standalone runner (``python -m corral_log.service``) use it directly.

Pipeline per chunk read from an instance's FIFO (all on the event loop thread):
frame lines -> encode once -> default file (synchronous) -> every sink's spool (append) ->
traceback detectors (stderr) -> live-tail buffer. Only after this returns is the chunk
consumed from the FIFO.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.units import parse_duration, parse_size
from corral_log import capture
from corral_log.errorstore import ErrorStore
from corral_log.framing import DEFAULT_MAX_LINE, LineFramer
from corral_log.metrics import DriverCollector, InstanceSampler, PolledFigures, serve_metrics
from corral_log.reading import DEFAULT_NAME, app_log_dir, read_logs
from corral_log.records import DRIVER_INSTANCE, Record, encode_block, encode_lines, process_of
from corral_log.sinks import (
    HttpSinkSpec,
    JournaldSinkSpec,
    RotatingFile,
    SinkUnavailable,
    build_sink,
    journald_present,
    parse_sinks,
)
from corral_log.spool import SinkRunner, Spool
from corral_log.tracebacks import TraceCollector

log = logging.getLogger("corral_log")
Publish = Callable[[str, dict[str, Any]], Coroutine[Any, Any, None]]
KernelCall = Callable[[str, dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]

TAIL_MAX_RECORDS = 2000  # per app per flush window: beyond it live tail says "skipped": n
TAIL_EVENT_RECORDS = 500  # records per EVENT (bodies stay far below CDP/1's 1 MiB limit)


def _unset_on_data(data: bytes) -> None:
    raise RuntimeError("reader used before its stream was set up")


@dataclass
class StreamState:
    """One captured stream of one instance."""

    stream: str
    reader: capture.FifoReader
    framer: LineFramer
    traces: TraceCollector | None
    last_data: float = field(default_factory=time.monotonic)
    paused: bool = False


@dataclass
class InstanceCapture:
    """An instance whose output the driver captures."""

    app: str
    id: str
    streams: dict[str, StreamState]
    records: int = 0
    nbytes: int = 0


@dataclass
class AppLog:
    """An app's sinks: the default file and the declared ones (each behind a spool)."""

    name: str
    directory: Path | None
    default: RotatingFile
    runners: dict[str, SinkRunner]
    skipped: dict[str, str]
    sinks_key: str
    records: int = 0
    nbytes: int = 0
    default_failures: int = 0
    tail: list[tuple[str, str, int, list[bytes], frozenset[int]]] = field(default_factory=list)
    tail_count: int = 0
    tail_skipped: int = 0


class LogService:
    """Everything the log driver does, callable without a bus."""

    def __init__(
        self,
        home: Path,
        *,
        runtime: Path | None = None,
        config: dict[str, Any] | None = None,
        publish: Publish | None = None,
        call: KernelCall | None = None,
    ) -> None:
        self.home = home
        self.config = dict(config or {})
        self.runtime = Path(self.config.get("runtime_dir") or runtime or home / "run" / "log")
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.publish = publish
        self.call = call  # the kernel, for its own and the lb's figures on /metrics
        self.figures = PolledFigures()
        self.pipe_size = parse_size(self.config.get("pipe_size", "1MiB"))
        self.max_line = parse_size(self.config.get("max_line", DEFAULT_MAX_LINE))
        self.idle_flush_s = parse_duration(self.config.get("idle_flush", "1s"))
        self.sample_s = parse_duration(self.config.get("sample_interval", "5s"))
        self.use_keepers = bool(self.config.get("keepers", True))
        self.tracebacks = bool(self.config.get("tracebacks", True))
        self.apps: dict[str, AppLog] = {}
        self.instances: dict[str, InstanceCapture] = {}
        self.errors = ErrorStore(home / "log.sqlite3")
        self.sampler = InstanceSampler()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics_server: Any = None
        self.metrics_port: int | None = None

    # ---- lifecycle of the service ------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop, start periodic work and the /metrics endpoint."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks = [
            asyncio.create_task(self._every(self.idle_flush_s / 2, self._flush_idle)),
            asyncio.create_task(self._every(self.sample_s, self._sample)),
            asyncio.create_task(self._every(self.sample_s, self._poll_figures)),
            asyncio.create_task(self._every(0.1, self._flush_tail)),
        ]
        self.recover()
        metrics = self.config.get("metrics", "127.0.0.1:9464")
        if metrics:
            addr, _, port = str(metrics).rpartition(":")
            try:
                self.metrics_server, self.metrics_port = serve_metrics(
                    DriverCollector(self.sampler, self.stats, self.figures),
                    addr or "127.0.0.1", int(port)
                )
            except OSError as exc:
                log.warning("metrics endpoint %s not started: %s", metrics, exc)

    async def close(self) -> None:
        """Drain what is readable, stop sinks (briefly draining), leave FIFOs and keepers."""
        for inst in list(self.instances.values()):
            for st in inst.streams.values():
                with contextlib.suppress(Exception):
                    self._drain(inst, st)
                self._unwatch(st)
                st.reader.close()
        self.instances.clear()
        for t in self._tasks:
            t.cancel()
        for app in list(self.apps.values()):
            self._close_app(app, drain_s=1.0)
        self.apps.clear()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.errors.close()

    async def _every(self, interval: float, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:  # a periodic job must not die of one bad round
                log.exception("periodic job %s failed", getattr(fn, "__name__", fn))

    def recover(self) -> list[str]:
        """After a restart: resume draining every instance whose keeper still holds its FIFOs,
        at once, with the app's sinks as last attached (saved in the runtime dir).

        Nothing waits for the kernel's ``state.sync``: an app blocked on a full pipe resumes as
        soon as the driver is up. ``state.sync`` later starts sampling and collects the
        instances that are gone."""
        resumed = []
        for iid in capture.live_keepers(self.runtime):
            out, _err = capture.fifo_paths(self.runtime, iid)
            if iid in self.instances or not out.exists():
                continue
            if capture.find_keeper(self.runtime, iid) is None:
                continue  # the keeper is gone: state.sync decides (adopt or collect)
            app = iid.split(".", 1)[0]
            if app not in self.apps:
                saved = self._saved_app(app)
                self.attach(app, {"logs": saved.get("logs")}, saved.get("directory"))
            self._capture(app, iid)
            resumed.append(iid)
        if resumed:
            log.info("resumed capture of %s", ", ".join(resumed))
        return resumed

    def _app_file(self, app: str) -> Path:
        return self.runtime / "apps" / f"{app}.json"

    def _saved_app(self, app: str) -> dict[str, Any]:
        try:
            data = json.loads(self._app_file(app).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_app(self, app: str, logs: Any, directory: str | None) -> None:
        path = self._app_file(app)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"logs": logs, "directory": directory}))
        os.replace(tmp, path)

    # ---- apps and sinks ----------------------------------------------------------------------

    def attach(
        self, app: str, manifest: dict[str, Any], directory: str | None = None
    ) -> dict[str, Any]:
        """Set up the app's sinks from ``manifest['logs']['sinks']`` (idempotent)."""
        raw = (manifest.get("logs") or {}).get("sinks") or []
        key = json.dumps(raw, sort_keys=True)
        current = self.apps.get(app)
        if current is not None and current.sinks_key == key:
            return self._app_summary(current)
        specs = parse_sinks(raw)  # raises ValueError with the sink index on a bad spec
        if current is not None:
            self._close_app(current, drain_s=2.0)
        default = RotatingFile(
            app_log_dir(self.home, app) / DEFAULT_NAME,
            max_bytes=parse_size(self.config.get("default_rotate", "64MiB")),
            max_age_s=(
                parse_duration(self.config["default_rotate_every"])
                if self.config.get("default_rotate_every")
                else None
            ),
            keep=int(self.config.get("default_keep", 10)),
        )
        app_dir = Path(directory) if directory else None
        appl = AppLog(app, app_dir, default, {}, {}, key)
        self.apps[app] = appl
        built: list[SinkRunner] = []
        try:
            for spec in specs:
                name = spec.name or spec.type
                if isinstance(spec, JournaldSinkSpec) and not journald_present(spec.socket):
                    appl.skipped[name] = f"no journal socket at {spec.socket}"
                    self.notice(
                        app,
                        f"sink {name!r} skipped: this host has no journald ({spec.socket} absent)",
                    )
                    continue
                sink = build_sink(spec, app_dir=app_dir)
                batch, linger = 1 << 20, 0.0
                if isinstance(spec, HttpSinkSpec):
                    batch, linger = spec.batch_bytes(), spec.linger_s()
                spool = Spool(self.home / "spool" / app / name, max_bytes=parse_size(spec.spool))
                runner = SinkRunner(
                    app, sink, spool, notice=self.notice, batch_bytes=batch, linger_s=linger
                )
                built.append(runner)
                appl.runners[name] = runner
        except Exception:
            for r in built:
                r.stop()
            default.close()
            del self.apps[app]
            raise
        for r in built:
            r.start()
        self._save_app(app, manifest.get("logs"), directory)
        return self._app_summary(appl)

    def _app_summary(self, appl: AppLog) -> dict[str, Any]:
        return {
            "app": appl.name,
            "sinks": sorted(appl.runners),
            "skipped": appl.skipped,
            "default": str(appl.default.path),
        }

    def _close_app(self, appl: AppLog, drain_s: float) -> None:
        for r in appl.runners.values():
            r.stop(drain_s)
        appl.default.close()

    def detach(self, app: str) -> dict[str, Any]:
        """Stop capturing the app's instances and its sinks; its log files stay (history)."""
        for inst in [i for i in self.instances.values() if i.app == app]:
            self.stopped(app, inst.id)
        appl = self.apps.pop(app, None)
        if appl is not None:
            self._close_app(appl, drain_s=5.0)
        self._app_file(app).unlink(missing_ok=True)
        return {"app": app, "detached": appl is not None}

    def _app(self, app: str) -> AppLog:
        appl = self.apps.get(app)
        if appl is None:  # an instance of an app we were not told about: default sink only
            self.attach(app, {})
            appl = self.apps[app]
        return appl

    # ---- instances ---------------------------------------------------------------------------

    def prepare(self, app: str, instance_id: str) -> tuple[str, str]:
        """Create (or reuse) the instance's FIFOs, start reading them; their paths."""
        out, err = capture.fifo_paths(self.runtime, instance_id)
        if instance_id in self.instances:
            return str(out), str(err)
        self._app(app)
        made: list[Path] = []
        try:
            for p in (out, err):
                if not p.exists():
                    made.append(p)
                capture.make_fifo(p)
            self._capture(app, instance_id)
        except Exception:
            self._release(instance_id)
            for p in made:
                p.unlink(missing_ok=True)
            raise
        return str(out), str(err)

    def _capture(self, app: str, instance_id: str) -> InstanceCapture:
        out, err = capture.fifo_paths(self.runtime, instance_id)
        inst = InstanceCapture(app, instance_id, {})
        self.instances[instance_id] = inst
        for stream, path in (("stdout", out), ("stderr", err)):
            reader = capture.FifoReader(path, _unset_on_data, pipe_size=self.pipe_size)
            st = StreamState(
                stream,
                reader,
                LineFramer(self.max_line),
                TraceCollector() if stream == "stderr" and self.tracebacks else None,
            )
            reader.on_data = functools.partial(self._on_data, inst, st)
            inst.streams[stream] = st
            self._watch(inst, st)
        if self.use_keepers and capture.find_keeper(self.runtime, instance_id) is None:
            capture.spawn_keeper(
                self.runtime,
                instance_id,
                (inst.streams["stdout"].reader.fd, inst.streams["stderr"].reader.fd),
            )
        return inst

    def _watch(self, inst: InstanceCapture, st: StreamState) -> None:
        if self.loop is not None:
            self.loop.add_reader(st.reader.fd, self._on_readable, inst, st)
            st.paused = False

    def _unwatch(self, st: StreamState) -> None:
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(st.reader.fd)

    def _on_readable(self, inst: InstanceCapture, st: StreamState) -> None:
        try:
            for _ in range(16):  # bounded, so one busy instance cannot starve the others
                if not st.reader.read_once():
                    break
        except SinkUnavailable as exc:
            # the default sink cannot store: leave the data in the FIFO (the app blocks once
            # the pipe is full) and retry shortly; nothing is consumed, nothing is lost
            st.reader.discard_copy()
            appl = self.apps.get(inst.app)
            if appl is not None:
                appl.default_failures += 1
            log.warning("default sink of %s failing, pausing %s: %s", inst.app, inst.id, exc)
            self._unwatch(st)
            st.paused = True
            assert self.loop is not None
            self.loop.call_later(1.0, self._watch, inst, st)

    def _drain(self, inst: InstanceCapture, st: StreamState) -> None:
        while st.reader.read_once():
            pass

    def _on_data(self, inst: InstanceCapture, st: StreamState, data: bytes) -> None:
        saved = st.framer.pending
        try:
            block, lines, partial = st.framer.feed_block(data)
            if block is not None:
                self._emit_block(inst, st, block)
            elif lines:
                self._emit(inst, st, lines, partial)
        except BaseException:
            st.framer.pending = saved  # the chunk stays in the FIFO and will be fed again
            raise
        st.last_data = time.monotonic()

    def _emit_block(self, inst: InstanceCapture, st: StreamState, block: bytes) -> None:
        """The hot path: complete lines, none over the cap, encoded with one replace()."""
        if st.traces is not None or self.publish is not None:
            # per-line consumers need line objects; stdout without live tail does not
            self._emit(inst, st, block.split(b"\n"), frozenset())
            return
        appl = self._app(inst.app)
        encoded = encode_block(inst.id, st.stream, time.time_ns(), block)
        self._store(appl, inst, encoded, block.count(b"\n") + 1)

    def _store(self, appl: AppLog, inst: InstanceCapture, encoded: bytes, n: int) -> None:
        appl.default.write(encoded)  # may raise SinkUnavailable: see _on_readable
        size = len(encoded)
        appl.records += n
        appl.nbytes += size
        inst.records += n
        inst.nbytes += size
        for runner in appl.runners.values():
            try:
                runner.submit(encoded)
            except OSError as exc:  # the spool's disk failed: count it, never stall the app
                runner.stats.dropped_lines += n
                runner.stats.last_error = f"spool: {exc}"

    def _emit(
        self, inst: InstanceCapture, st: StreamState, lines: list[bytes], partial: frozenset[int]
    ) -> None:
        appl = self._app(inst.app)
        now = time.time_ns()
        n = len(lines)
        self._store(appl, inst, encode_lines(inst.id, st.stream, now, lines, partial), n)
        if st.traces is not None:
            for line in lines:
                for trace in st.traces.feed(line.decode("utf-8", "replace")):
                    self._trace(inst, trace, now)
        if self.publish is not None:
            if appl.tail_count < TAIL_MAX_RECORDS:
                appl.tail.append((inst.id, st.stream, now, lines, partial))
                appl.tail_count += n
            else:
                appl.tail_skipped += n

    def _trace(self, inst: InstanceCapture, trace: Any, now: int) -> None:
        new = self.errors.record(inst.app, inst.id, trace, now)
        if new and self.publish is not None and self.loop is not None:
            self.loop.create_task(
                self.publish(
                    f"log.{inst.app}",
                    {
                        "app": inst.app,
                        "error": {
                            "fingerprint": trace.fingerprint,
                            "type": trace.type,
                            "language": trace.language,
                            "instance": inst.id,
                            "message": trace.message,
                        },
                    },
                )
            )

    def notice(self, app: str, text: str) -> None:
        """Emit a record from the driver itself into an app's log (callable from any thread)."""
        if self.loop is not None and threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.notice, app, text)
            return
        appl = self.apps.get(app)
        if appl is None:
            log.warning("%s: %s", app, text)
            return
        rec = Record(app, DRIVER_INSTANCE, "corral", time.time_ns(), text)
        encoded = rec.encode()
        try:
            appl.default.write(encoded)
        except SinkUnavailable:
            appl.default_failures += 1
        for runner in appl.runners.values():
            with contextlib.suppress(OSError):
                runner.submit(encoded, quiet=True)
        if self.publish is not None:
            appl.tail.append((DRIVER_INSTANCE, "corral", rec.time_ns, [text.encode()], frozenset()))
            appl.tail_count += 1

    def started(self, app: str, instance_id: str, pid: int, start_time: float) -> dict[str, Any]:
        """Sample the instance's resources from now on."""
        self.sampler.track(app, process_of(app, instance_id), instance_id, pid, start_time)
        return {"instance": instance_id, "sampling": instance_id in self.sampler.instances}

    def stopped(self, app: str, instance_id: str) -> dict[str, Any]:
        """Drain and close the instance's capture, stop its keeper, remove its FIFOs."""
        inst = self.instances.get(instance_id)
        if inst is None:
            # not captured by this run (e.g. stopped while we were down): drain leftovers
            out, _err = capture.fifo_paths(self.runtime, instance_id)
            if out.exists():
                inst = self._capture(app, instance_id)
        if inst is not None:
            for st in inst.streams.values():
                self._unwatch(st)
                with contextlib.suppress(SinkUnavailable):
                    self._drain(inst, st)
                lines, partial = st.framer.flush(final=True)
                if lines:
                    with contextlib.suppress(SinkUnavailable):
                        self._emit(inst, st, lines, partial)
                if st.traces is not None:
                    for trace in st.traces.flush():
                        self._trace(inst, trace, time.time_ns())
        self._release(instance_id)
        self.sampler.forget(instance_id)
        return {"instance": instance_id, "records": inst.records if inst else 0}

    def _release(self, instance_id: str) -> None:
        inst = self.instances.pop(instance_id, None)
        if inst is not None:
            for st in inst.streams.values():
                self._unwatch(st)
                st.reader.close()
        capture.stop_keeper(self.runtime, instance_id)
        for p in capture.fifo_paths(self.runtime, instance_id):
            p.unlink(missing_ok=True)

    def sync(
        self,
        apps: list[tuple[str, dict[str, Any], str | None]],
        instances: list[tuple[str, str, int, float]],
        launching: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """Re-adopt live instances (re-open their FIFOs, drain what piled up), collect the
        leftovers of instances and apps that are gone. ``launching`` instances (prepared, not
        started yet) are left as they are: neither adopted nor collected."""
        for name, manifest, directory in apps:
            self.attach(name, manifest, directory)
        live = {iid: (app, pid, st) for app, iid, pid, st in instances}
        adopted, collected = [], []
        for iid, (app, pid, start) in live.items():
            out, _err = capture.fifo_paths(self.runtime, iid)
            if iid not in self.instances:
                if out.exists():
                    self._capture(app, iid)
                    adopted.append(iid)
                else:
                    self.notice(
                        app,
                        f"instance {iid}: no capture FIFO to re-adopt "
                        "(its output is not captured until it restarts)",
                    )
            self.started(app, iid, pid, start)
        for iid in [i for i in self.instances if i not in live and i not in launching]:
            self.stopped(self.instances[iid].app, iid)
            collected.append(iid)
        for iid in capture.live_keepers(self.runtime):
            if iid not in live and iid not in launching:
                app = iid.split(".", 1)[0]
                self.stopped(app, iid)
                collected.append(iid)
        wanted = {name for name, _, _ in apps}
        for name in [a for a in self.apps if a not in wanted]:
            if not any(i.app == name for i in self.instances.values()):
                self.detach(name)
        return {"adopted": adopted, "collected": sorted(set(collected))}

    # ---- periodic work -----------------------------------------------------------------------

    async def _flush_idle(self) -> None:
        now = time.monotonic()
        for inst in list(self.instances.values()):
            for st in inst.streams.values():
                if now - st.last_data < self.idle_flush_s:
                    continue
                if st.framer.pending:
                    lines, partial = st.framer.flush(final=False)
                    with contextlib.suppress(SinkUnavailable):
                        self._emit(inst, st, lines, partial)
                if st.traces is not None:
                    for trace in st.traces.flush():
                        self._trace(inst, trace, time.time_ns())

    async def _poll_figures(self) -> None:
        """Fetch the kernel's status and the lb's per-backend figures for /metrics."""
        if self.call is not None:
            await self.figures.poll(self.call)

    async def _sample(self) -> None:
        if self.sampler.instances:
            await asyncio.to_thread(self.sampler.sample)

    async def _flush_tail(self) -> None:
        if self.publish is None:
            return
        for appl in list(self.apps.values()):
            if not appl.tail and not appl.tail_skipped:
                continue
            pieces, skipped = appl.tail, appl.tail_skipped
            appl.tail, appl.tail_count, appl.tail_skipped = [], 0, 0
            records: list[dict[str, Any]] = []
            for iid, stream, ts, lines, partial in pieces:
                for i, line in enumerate(lines):
                    records.append(
                        Record(
                            appl.name,
                            iid,
                            stream,
                            ts,
                            line.decode("utf-8", "replace"),
                            partial=i in partial,
                        ).to_dict()
                    )
            for k in range(0, max(1, len(records)), TAIL_EVENT_RECORDS):
                body: dict[str, Any] = {
                    "app": appl.name,
                    "records": records[k : k + TAIL_EVENT_RECORDS],
                }
                if skipped and k == 0:
                    body["skipped"] = skipped  # tail is a view; the files have every line
                await self.publish(f"log.{appl.name}", body)

    # ---- queries -----------------------------------------------------------------------------

    def read(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query.log.read`` (see ``corral_log.reading.read_logs``)."""
        limit, cursor = args.get("limit", 200), args.get("cursor")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise CorralError("limit: expected an integer", code=ErrorCode.INVALID, retry=False)
        if cursor is not None and not isinstance(cursor, str):
            raise CorralError("cursor: expected a string", code=ErrorCode.INVALID, retry=False)
        return read_logs(
            self.home,
            str(args["app"]),
            since=args.get("since"),
            grep=args.get("grep"),
            instance=args.get("instance"),
            limit=limit,
            as_json=bool(args.get("json", True)),
            cursor=cursor,
        )

    def error_groups(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query.log.errors``."""
        return {
            "app": args["app"],
            "groups": self.errors.groups(str(args["app"]), int(args.get("limit", 100))),
        }

    def top(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query.log.top``."""
        return {"instances": self.sampler.top(args.get("app"))}

    def stats(self) -> dict[str, Any]:
        """``query.log.stats``: per app records, bytes, sinks (up, spooled, dropped)."""
        apps: dict[str, Any] = {}
        for name, appl in self.apps.items():
            apps[name] = {
                "records": appl.records,
                "bytes": appl.nbytes,
                "default": str(appl.default.path),
                "default_failures": appl.default_failures,
                "sinks": {n: r.snapshot() for n, r in appl.runners.items()},
                "skipped_sinks": dict(appl.skipped),
                "instances": {
                    i.id: {
                        "records": i.records,
                        "bytes": i.nbytes,
                        "paused": any(s.paused for s in i.streams.values()),
                    }
                    for i in self.instances.values()
                    if i.app == name
                },
            }
        for a in apps.values():  # what `corral ps` shows per app
            a["dropped_lines"] = sum(s["dropped_lines"] for s in a["sinks"].values())
        dropped = sum(a["dropped_lines"] for a in apps.values())
        return {"apps": apps, "shown": ["dropped_lines"], "dropped_lines": dropped,
                "metrics_port": self.metrics_port}


# ---- standalone runner (tests, debugging): the service without a kernel -------------------------


async def _standalone(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    svc = LogService(
        Path(args.home), runtime=Path(args.runtime), config=spec.get("config", {"metrics": False})
    )
    await svc.start()
    apps = [(a["name"], a.get("manifest", {}), a.get("directory")) for a in spec["apps"]]
    for name, manifest, directory in apps:
        svc.attach(name, manifest, directory)
    for inst in spec["instances"]:
        out, _ = capture.fifo_paths(svc.runtime, inst["id"])
        if not out.exists():
            svc.prepare(inst["app"], inst["id"])
    svc.sync(
        apps,
        [
            (i["app"], i["id"], i.get("pid", os.getpid()), i.get("start_time", 0.0))
            for i in spec["instances"]
        ],
    )
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(15, stop.set)
    await stop.wait()
    await svc.close()


def main() -> None:
    """``python -m corral_log.service --home H --runtime R --spec spec.json``."""
    p = argparse.ArgumentParser(description="run the log service without a kernel")
    p.add_argument("--home", required=True)
    p.add_argument("--runtime", required=True)
    p.add_argument("--spec", required=True, help="JSON: {apps: [...], instances: [...]}")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_standalone(args))


if __name__ == "__main__":
    main()
