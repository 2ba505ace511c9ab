"""Instances: launch (plan, readiness, the rollout's join), supervision and restart, stop,
and adoption after a kernel restart.

Instances are not the kernel's children; they are known by (pid, start time) in the ledger,
watched through pidfds, re-adopted after a kernel restart, and restarted with a back-off when
they exit on their own, never without a driver that confines them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from corral import launch as _launch_module
from corral.deploy._drivers import Drivers
from corral.deploy._spread import SATELLITE
from corral.deploy._state import AppState, Live, spec_hash
from corral.deploy._steps import ledger_step
from corral.errors import CorralError, DriverUnavailableError, ErrorCode, LaunchError
from corral.host import HostConfig
from corral.ledger import Ledger
from corral.protocol import (
    AppSpec,
    BindMount,
    InstanceRecord,
    InstanceSpec,
    LaunchPlan,
    PlanFragment,
)

log = structlog.get_logger("corral.deploy")

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_SINGLE_OWNER = ("root", "netns", "address", "stdout", "stderr", "pid_namespace", "seccomp")


class Events(Protocol):
    """Where the kernel publishes what happens (the bus's PUB socket)."""

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish ``data`` under ``topic``."""
        ...


class Launcher(Protocol):
    """The launch path and the process primitives (``corral.launch``)."""

    def launch(self, plan: LaunchPlan) -> tuple[int, float]:
        """Start the plan's process; its (pid, start time)."""
        ...

    def is_alive(self, pid: int, start_time: float) -> bool:
        """Whether that process still runs."""
        ...

    def terminate(self, pid: int, start_time: float, grace: float) -> None:
        """SIGTERM its group, SIGKILL after ``grace``."""
        ...

    def signal_instance(self, pid: int, start_time: float, sig: int, group: bool = True
                        ) -> bool:
        """Signal it (its process group with ``group``)."""
        ...

    def reap(self, pid: int) -> int | None:
        """Collect it if it is our exited child."""
        ...

    def describe_exit(self, code: int | None) -> str:
        """A reap result in words."""
        ...

    async def wait_exit(self, pid: int, start_time: float | None = None) -> None:
        """Return when it has exited."""
        ...

    def take_fd(self, pid: int, start_time: float | None, fd: int) -> int:
        """A copy of one of its descriptors."""
        ...


LAUNCHER: Launcher = _launch_module  # type: ignore[assignment]


class Instances:
    """Launches, watches, restarts, stops and adopts the instances of the apps in ``apps``."""

    def __init__(self, apps: dict[str, AppState], *, ledger: Ledger, drivers: Drivers,
                 events: Events, home: Path, notify_dir: Path, config: HostConfig,
                 launcher: Launcher = LAUNCHER, as_root: bool | None = None) -> None:
        self.apps = apps
        self.ledger = ledger
        self.drivers = drivers
        self.events = events
        self.home = home
        self.notify_dir = notify_dir
        self.config = config
        self.launcher = launcher
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, app: str) -> asyncio.Lock:
        """The lock that serialises deploys, scales, teardowns and restarts of ``app``."""
        return self._locks.setdefault(app, asyncio.Lock())

    def start_timeout(self, doc: dict[str, Any], process: str, override: float | None) -> float:
        """How long a new instance of ``process`` has to be ready (and healthy, in a rollout):
        ``override`` (the deploy's wait_s), else the process's ``start_timeout``, else the
        host's ``start_timeout_s``."""
        if override:
            return override
        per = ((doc.get("processes") or {}).get(process) or {}).get("start_timeout")
        return float(per) if per else self.config.start_timeout_s

    # ---- launch ------------------------------------------------------------------------------

    async def plan(self, spec: AppSpec, ispec: InstanceSpec,
                   secret_env: dict[str, str] | None = None) -> LaunchPlan:
        """Ask the drivers for their fragments and merge them; a field set by two drivers, or
        a launch driver missing from the replies, is refused (nothing starts). ``secret_env``
        (the release's secrets) goes into the plan only, never into the recorded spec."""
        args = {"app": spec.model_dump(mode="json"), "instance": ispec.model_dump(mode="json")}
        replies = await self.drivers.gather("instance.prepare", args)
        missing = self.drivers.missing(replies)
        if missing is not None:  # fail closed: never launch without a launch driver's part
            missing.reason = f"instance {ispec.id} not started: {missing.reason}"
            raise missing
        plan = LaunchPlan(instance=ispec, uid=spec.uid, gid=spec.gid)
        owners: dict[str, str] = {}
        env = dict(ispec.env)
        for driver, raw in replies.items():
            frag = PlanFragment.model_validate(raw)
            env.update(frag.env)
            plan.mounts.extend(frag.mounts)
            plan.cgroup_procs.extend(frag.cgroup_procs)
            for fname in (*_SINGLE_OWNER, "uid", "gid"):
                value = getattr(frag, fname)
                if value is None:
                    continue
                if fname in owners and getattr(plan, fname) != value and fname in _SINGLE_OWNER:
                    raise CorralError(
                        f"drivers {owners[fname]!r} and {driver!r} both set {fname}",
                        code=ErrorCode.INTERNAL, retry=False)
                owners[fname] = driver
                setattr(plan, fname, value)
        if self.as_root and (plan.uid in (None, 0) or plan.gid in (None, 0)):
            raise LaunchError("refusing to run an app as root", step="plan")
        if plan.stdout is None or plan.stderr is None:
            out = self.home / "apps" / ispec.app / "output"
            out.mkdir(parents=True, exist_ok=True)
            plan.stdout = plan.stdout or str(out / f"{ispec.id}.log")
            plan.stderr = plan.stderr or str(out / f"{ispec.id}.log")
        plan.instance = ispec.model_copy(update={"env": env})
        plan.secret_env = dict(secret_env or {})
        return plan

    async def launch(self, state: AppState, ispec: InstanceSpec, generation: int, *,
                     wait_s: float, spec_hash_: str | None = None,
                     listen_fds: Sequence[int] = (), announce: bool = True) -> Live:
        """Plan, launch and wait until one instance is ready; ``listen_fds`` are handed over
        as fd 3.. (the caller keeps its descriptors; the instance's ``Live`` holds copies).

        With ``announce`` the drivers are told ``instance.started`` without waiting on their
        verdict (a restart, an on-demand start); a rollout passes False and calls ``join``.
        """
        notify = NotifySocket(self.notify_dir / f"{ispec.id}.sock", state.spec.uid)
        h = spec_hash_ or spec_hash(ispec)
        ispec = ispec.model_copy(update={"env": {**ispec.env, "NOTIFY_SOCKET": str(notify.path),
                                                 "CORRAL_INSTANCE_ID": ispec.id}})
        # Recorded before the fork: a crash between fork and record leaves a findable trace.
        await ledger_step(self.ledger, self.ledger.put, ispec.app, "instance", ispec.id,
                          {"state": "launching", "spec": ispec.model_dump(mode="json"),
                           "spec_hash": h, "generation": generation})
        try:
            plan = await self.plan(state.spec, ispec, state.secrets)
            if plan.root is not None:  # a sandboxed view must still see its notify socket
                plan.mounts.append(BindMount(source=str(notify.path), target=str(notify.path),
                                             mode="rw"))
            plan.listen_fds = list(listen_fds)
            pid, start_time = await asyncio.to_thread(self.launcher.launch, plan)
        except BaseException:
            notify.close()
            await self.drivers.broadcast("instance.stopped", {"app": ispec.app,
                                                              "instance_id": ispec.id},
                                         strict=False)
            await ledger_step(self.ledger, self.ledger.release, ispec.app,
                              [("instance", ispec.id)])
            raise
        record = InstanceRecord(spec=plan.instance, pid=pid, start_time=start_time,
                                address=plan.address or "127.0.0.1")
        live = Live(record, h, generation, listen_fds=[os.dup(fd) for fd in listen_fds])
        state.instances[ispec.id] = live
        await self.record(live)
        live.watcher = asyncio.ensure_future(self._watch(state, live))
        self.events.publish(f"app.{ispec.app}.instance.started",
                            {"instance": ispec.id, "pid": pid})
        try:
            await self._ready(state, live, notify, wait_s)
        except BaseException:
            await self.stop(state, live)
            raise
        finally:
            notify.close()
        live.record.state = "ready"
        await self.record(live)
        self.events.publish(f"app.{ispec.app}.instance.ready", {"instance": ispec.id, "pid": pid})
        if announce:
            await self.drivers.broadcast("instance.started", _started_args(state, live),
                                         strict=False)
        return live

    async def join(self, state: AppState, live: Live, within: float) -> None:
        """A rollout's gate: ``instance.started`` to every enabled driver serving it, and the
        instance joins only when each has answered and none said it is unhealthy.

        A driver that is (re)connecting is waited for and asked again, up to ``within``
        seconds; one that does not answer in that time, or answers with an error, fails the
        instance: silence is never taken for success.
        """
        rec = live.record
        what = f"instance {rec.spec.id}"

        def gone() -> str | None:
            if live.exit_status or not self.launcher.is_alive(rec.pid, rec.start_time):
                return f"exited before it joined ({live.exit_status or 'gone'})"
            return None

        health: list[str] = []

        def judge(driver: str, reply: dict[str, Any]) -> None:
            if reply.get("healthy") is False:
                detail = str(reply.get("health") or "no check passed")
                self.events.publish(f"app.{rec.spec.app}.instance.unhealthy",
                                    {"instance": rec.spec.id, "driver": driver,
                                     "health": detail})
                raise LaunchError(
                    f"{what} did not turn healthy within {within:.0f}s (driver {driver!r}, "
                    f"last health check: {detail}); the running release was kept",
                    step="health")
            if reply.get("health"):
                health.append(f"{driver}: {reply['health']}")

        await self.drivers.ask_each(
            "instance.started", lambda left: _started_args(state, live, left),
            within=within, abort=gone, what=what, judge=judge)
        self.events.publish(f"app.{rec.spec.app}.instance.healthy",
                            {"instance": rec.spec.id, "pid": rec.pid, "health": "; ".join(health)})

    async def record(self, live: Live) -> None:
        """Write the instance's record to the ledger (``ledger_step``)."""
        await ledger_step(self.ledger, self._put_record, live)

    def _put_record(self, live: Live) -> None:
        self.ledger.put(live.record.spec.app, "instance", live.record.spec.id,
                        {"state": live.record.state,
                         "record": live.record.model_dump(mode="json"),
                         "spec_hash": live.spec_hash, "generation": live.generation})

    async def _ready(self, state: AppState, live: Live, notify: NotifySocket, wait_s: float
                     ) -> None:
        """Port open or READY=1, whichever first; the instance dying first is a failure."""
        rec = live.record
        deadline = time.monotonic() + wait_s
        port = rec.spec.port
        mode = str(((state.spec.manifest.get("processes") or {})
                    .get(rec.spec.process) or {}).get("ready", "auto"))
        if live.listen_fds and mode in ("auto", "port"):
            # socket activation: the socket listens already and queues connections until the
            # program accepts; the program never binds its port, so there is nothing to poll
            mode = "socket"
        if mode == "auto":
            mode = "port" if port is not None else "started"
        quiet_until = time.monotonic() + 0.3  # a 'started' process must survive this long
        while time.monotonic() < deadline:
            if live.exit_status or not self.launcher.is_alive(rec.pid, rec.start_time):
                raise LaunchError(
                    f"instance {rec.spec.id} exited before it was ready"
                    f" ({live.exit_status or 'gone'}); {await self._tail(rec)}", step="ready")
            if notify.ready() or mode == "socket":  # READY=1 always counts, whatever the mode
                return
            if mode == "port" and port is not None:
                if await port_open(rec.address, port):
                    return
            elif mode == "started" and time.monotonic() >= quiet_until:
                return
            await asyncio.sleep(0.01)
        raise LaunchError(f"instance {rec.spec.id} not ready within {wait_s:.0f}s "
                          f"(ready = {mode!r}: port {port} closed, no READY=1)", step="ready")

    async def _tail(self, rec: InstanceRecord) -> str:
        """The instance's last lines (as `systemctl status` shows them): the kernel's own
        capture file, else what the driver capturing output kept."""
        path = self.home / "apps" / rec.spec.app / "output" / f"{rec.spec.id}.log"
        try:
            data = path.read_bytes()[-400:].decode("utf-8", "replace").strip()
        except OSError:
            # the capturing driver drains what the instance wrote last a moment after it died
            # (sooner on an idle host): ask again for up to a second while it has nothing
            data = ""
            for delay in (0.1, 0.2, 0.3, 0.4):
                await asyncio.sleep(delay)
                data = (await self.drivers.output_tail(rec.spec.app, rec.spec.id)
                        )[-400:].strip()
                if data:
                    break
        return f"last output: {data!r}" if data else "it wrote nothing"

    # ---- supervision -------------------------------------------------------------------------

    async def _watch(self, state: AppState, live: Live) -> None:
        """Wait for the instance to exit; restart it with a back-off unless it is stopping."""
        rec = live.record
        await self.launcher.wait_exit(rec.pid, rec.start_time)
        live.exit_status = self.launcher.describe_exit(self.launcher.reap(rec.pid)) or "exited"
        if live.stopping or state.instances.get(rec.spec.id) is not live:
            return
        log.warning("instance exited", instance=rec.spec.id, status=live.exit_status)
        self.events.publish(f"app.{rec.spec.app}.instance.exited",
                            {"instance": rec.spec.id, "status": live.exit_status})
        rec.state = "exited"
        await self.record(live)
        if state.deploying:
            return
        await self._restart(state, live)

    async def _restart(self, state: AppState, live: Live) -> None:
        """Start a crashed instance again, with a back-off, for as long as it is wanted.

        Never unconfined: while a driver it needs is down the instance waits (``ps`` says
        for which driver) and is started, confined, once that driver is back. Other
        failures are retried too, the back-off growing to 30 s (systemd's Restart=always).
        """
        rec = live.record
        attempt = live.restarts
        spec = rec.spec.model_copy(update={"env": {
            k: v for k, v in rec.spec.env.items() if k != "NOTIFY_SOCKET"}})

        def wanted() -> bool:
            return state.instances.get(rec.spec.id) is live and not live.stopping

        while True:
            await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)])
            attempt += 1
            if not wanted():
                return
            try:
                await self.drivers.require(None, doing=f"restart of {rec.spec.id}")
                async with self.lock(state.spec.name):
                    if not wanted():
                        return
                    timeout = self.start_timeout(state.spec.manifest, spec.process, None)
                    new = await self.launch(state, spec, live.generation, wait_s=timeout,
                                            listen_fds=live.listen_fds)
                    new.restarts = live.restarts + 1
                    live.close_listen_fds()  # the new instance holds its own copies
                    return
            except DriverUnavailableError as exc:
                if live.waiting != exc.reason:
                    live.waiting = exc.reason
                    log.error("crashed instance waits for a driver", instance=rec.spec.id,
                              error=exc.reason)
                    self.events.publish(f"app.{rec.spec.app}.instance.waiting",
                                        {"instance": rec.spec.id, "reason": exc.reason})
                attempt = 0  # the driver is back soon or not: retry at once when it is
            except CorralError as exc:
                live.waiting = ""
                log.error("restart failed", instance=rec.spec.id, error=exc.reason)

    # ---- stop --------------------------------------------------------------------------------

    async def stop(self, state: AppState, live: Live, *, release: bool = True) -> None:
        """Drain (``instance.stopping``), SIGTERM the process group, SIGKILL after a grace
        period, tell the drivers, release the instance."""
        live.stopping = True
        rec = live.record
        self.events.publish(f"app.{rec.spec.app}.instance.draining",
                            {"instance": rec.spec.id, "pid": rec.pid})
        await self.drivers.broadcast("instance.stopping", {"app": rec.spec.app,
                                                           "instance_id": rec.spec.id},
                                     strict=False)
        grace = ((state.spec.manifest.get("processes") or {}).get(rec.spec.process) or {}).get(
            "stop_grace") or self.config.stop_grace_s
        await asyncio.to_thread(self.launcher.terminate, rec.pid, rec.start_time, float(grace))
        if live.watcher is not None:
            live.watcher.cancel()
        self.launcher.reap(rec.pid)
        if state.instances.get(rec.spec.id) is live:
            del state.instances[rec.spec.id]
        live.close_listen_fds()
        await self.drivers.broadcast("instance.stopped", {"app": rec.spec.app,
                                                          "instance_id": rec.spec.id},
                                     strict=False)
        def forget() -> None:
            if release or self.ledger.get("instance", rec.spec.id) is not None:
                self.ledger.release(rec.spec.app, [("instance", rec.spec.id)])

        await ledger_step(self.ledger, forget)
        self.events.publish(f"app.{rec.spec.app}.instance.stopped", {"instance": rec.spec.id})

    # ---- restore -----------------------------------------------------------------------------

    def restore(self, find: Callable[[str], tuple[int, float] | None] | None = None) -> None:
        """After a (re)start: adopt live instances from the ledger by (pid, start time).

        Records left *launching* by a crash are matched against live processes carrying
        their ``CORRAL_INSTANCE`` (``find``); anything unmatched is dropped from the ledger.
        """
        find = find or find_by_env
        ledger = self.ledger
        for rec in [*ledger.list(kind="app"), *ledger.list(kind=SATELLITE)]:
            spec = AppSpec.model_validate(rec.value["spec"])
            home = rec.value.get("home") if rec.kind == SATELLITE else None
            self.apps[spec.name] = AppState(spec, home=str(home) if home else None,
                                            follows=rec.value.get("follows") if home else None)
        for rec in ledger.list(kind="instance"):
            state = self.apps.get(rec.owner)
            value = rec.value
            if state is None:
                ledger.release(rec.owner, [("instance", rec.key)])
                continue
            if "record" in value:
                irec = InstanceRecord.model_validate(value["record"])
            else:
                found = find(rec.key)
                if found is None:
                    ledger.release(rec.owner, [("instance", rec.key)])
                    continue
                ispec = InstanceSpec.model_validate(value["spec"])
                irec = InstanceRecord(spec=ispec, pid=found[0], start_time=found[1], state="ready")
            if not self.launcher.is_alive(irec.pid, irec.start_time):
                ledger.release(rec.owner, [("instance", rec.key)])
                continue
            live = Live(irec, str(value.get("spec_hash", "")), int(value.get("generation", 1)),
                        listen_fds=self._recover_listen_fds(irec))
            state.instances[irec.spec.id] = live
            self._put_record(live)  # at start, before the kernel serves: inline
            live.watcher = asyncio.ensure_future(self._watch(state, live))
            log.info("instance adopted", instance=irec.spec.id, pid=irec.pid)

    def _recover_listen_fds(self, rec: InstanceRecord) -> list[int]:
        """A socket-activated instance adopted after a kernel restart: take back a copy of the
        listening sockets it was handed (fds 3..), so a crash can be restarted on them."""
        names = rec.spec.env.get("LISTEN_FDNAMES")  # set by spawn() with the socket it passed
        count = len(names.split(":")) if names else 0
        fds: list[int] = []
        for target in range(3, 3 + count):
            try:
                fd = self.launcher.take_fd(rec.pid, rec.start_time, target)
            except OSError:
                break
            sock = socket.socket(fileno=os.dup(fd))
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            finally:
                sock.close()
            if not listening:
                os.close(fd)
                break
            fds.append(fd)
        return fds


class NotifySocket:
    """An sd_notify datagram socket for one instance (NOTIFY_SOCKET)."""

    def __init__(self, path: Path, uid: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.bind(str(path))
        if uid is not None:
            os.chown(path, uid, -1)
        os.chmod(path, 0o600)
        self._ready = False

    def ready(self) -> bool:
        """Whether READY=1 arrived."""
        while not self._ready:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self._ready = any(line == b"READY=1" for line in data.split(b"\n"))
        return self._ready

    def close(self) -> None:
        """Close and unlink."""
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _started_args(state: AppState, live: Live, join_within: float | None = None
                  ) -> dict[str, Any]:
    args: dict[str, Any] = {"app": state.spec.model_dump(mode="json"),
                            "instance": live.record.model_dump(mode="json")}
    if join_within is not None:
        args["join_within_s"] = join_within
    return args


async def port_open(address: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``address:port`` (within 0.5 s)."""
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(address, port), 0.5)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


def find_by_env(instance_id: str) -> tuple[int, float] | None:
    """A live process group leader whose environment says CORRAL_INSTANCE=instance_id."""
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            # the launcher makes the instance its own process group leader
            env = proc.environ()
            iid = env.get("CORRAL_INSTANCE_ID", env.get("CORRAL_INSTANCE"))
            if iid == instance_id and os.getpgid(proc.pid) == proc.pid:
                return proc.pid, proc.info["create_time"]
        except (psutil.Error, OSError):
            continue
    return None
