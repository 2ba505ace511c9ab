"""Making releases: snapshot the source, build it in the app's sandbox, run processes of a
release that are not instances (the build, the release phase, one-off commands).

``Releaser.make`` is the part of ``corral up`` before the rollout: it copies the source into a
new release directory (or finds the source, manifest and config unchanged: no release, a
no-op), builds it as the app's uid in a sandbox whose only egress is the host's package
indexes (a pseudo-app ``<app>_build<N>``: app names are DNS labels, so it is never a real
app's name), and seals it (root-owned, read-only to the app). A failed build makes no release
and touches nothing that runs. ``Releaser.run`` starts a process of the app's release in its
sandbox and returns its exit status: the release phase and ``corral run``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from corral.deploy._drivers import Drivers
from corral.deploy._instances import Events, Instances, Launcher
from corral.deploy._steps import ledger_step
from corral.errors import CorralError, ErrorCode, LaunchError
from corral.host import HostConfig
from corral.ledger import Ledger
from corral.protocol import AppSpec, InstanceSpec
from corral.release import (
    AppConfig,
    BuildPlan,
    ConfigStore,
    ReleaseStore,
    build_plan,
    remove_tree,
    snapshot,
)

log = structlog.get_logger("corral.release")

BUILD_SUFFIX = "_build"  # a build's pseudo-app: "<app>_build<N>", never a valid app name
OUTPUT_POLL_S = 0.1


@dataclass
class Outcome:
    """How a sandboxed process ended."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    tail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Exited with 0."""
        return self.exit_code == 0

    def last_lines(self, count: int = 10) -> str:
        """The end of its output, a few whole lines."""
        return "\n".join(self.tail.rstrip("\n").splitlines()[-count:])

    def describe(self) -> str:
        """The end in words."""
        if self.timed_out:
            return "was stopped: it ran out of time"
        if self.signal is not None:
            return f"was killed by signal {self.signal}"
        return f"exited with {self.exit_code}"


def manifest_digest(doc: dict[str, Any]) -> str:
    """Identity of a resolved manifest (what a release deploys besides its files)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def seal(directory: Path) -> None:
    """Make a built release root's and read-only to everyone else: files and directories
    owned by root, nothing group- or world-writable, no set-user-ID, set-group-ID or sticky
    bit (a build must never leave a root set-user-ID program on the host), everything
    readable (and directories and executables enterable) by the app's uid. Links are not
    followed. The caller makes sure nothing of the build runs any more."""
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            os.lchown(path, 0, 0)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode) & 0o755
            if stat.S_ISDIR(st.st_mode) or mode & 0o100:
                mode |= 0o555
            else:
                mode |= 0o444
            # a chown may clear set-ID bits but never sets any: the mode before it tells
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(path, mode)
    os.chown(directory, 0, 0)
    os.chmod(directory, 0o755)


def _chown_tree(directory: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)
    os.chown(directory, uid, gid)


class Releaser:
    """Makes releases of apps and runs their non-instance processes."""

    def __init__(self, *, ledger: Ledger, drivers: Drivers, events: Events, home: Path,
                 config: HostConfig, instances: Instances, launcher: Launcher,
                 as_root: bool) -> None:
        self.ledger = ledger
        self.drivers = drivers
        self.events = events
        self.home = home
        self.config = config
        self.instances = instances
        self.launcher = launcher
        self.as_root = as_root
        self.store = ReleaseStore(ledger, home, config.releases_kept)
        self.configs = ConfigStore(home)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for what runs in the background (the teardown of build sandboxes): before a
        release directory one of them may still hold is removed."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def lock(self, app: str) -> asyncio.Lock:
        """Serialises the making of an app's releases (two deploys never interleave)."""
        return self._locks.setdefault(app, asyncio.Lock())

    def recover(self) -> list[str]:
        """At start: drop releases whose build the previous kernel did not finish."""
        def kill(builder: dict[str, Any]) -> None:
            try:
                self.launcher.signal_instance(int(builder["pid"]), float(builder["start_time"]),
                                              signal.SIGKILL, group=True)
            except (KeyError, ValueError, OSError):
                pass
        gone = self.store.recover(kill)
        if gone:
            log.info("unfinished releases removed", releases=gone)
        return gone

    def purge(self, name: str) -> bool:
        """Forget an app that is down: its releases, config, secrets and build cache; True
        if there was anything."""
        found = bool(self.store.list(name)) or bool(self.configs.current(name).keys())
        for value in self.store.list(name):
            self.store.drop(name, int(value["number"]))
        self.configs.purge(name)
        for d in (self.store.root(name), self.home / "cache" / name):
            if d.exists():
                found = True
                remove_tree(d)
        return found

    def collect_abandoned(self) -> list[str]:
        """Remove the releases whose build died with a previous kernel, once nothing holds
        their directory any more (after the drivers collected the dead build's sandbox)."""
        apps = {str(r.value.get("app")) for r in self.ledger.list(kind="release")
                if r.value.get("status") == "abandoned"}
        return [gone for app in sorted(apps)
                for gone in self.store.collect(app, strays=False)]

    # ---- making a release --------------------------------------------------------------------

    async def make(self, name: str, source: Path, doc: dict[str, Any], *, config: AppConfig,
                   current: dict[str, Any] | None, uid: int | None, gid: int | None,
                   by: str, changes: list[str] | None = None,
                   exclude: list[Path] | None = None,
                   uploaded: str | None = None,
                   commit: str | None = None) -> tuple[dict[str, Any], bool]:
        """A release of ``source`` with the resolved manifest ``doc`` and ``config``: the
        ``current`` one (and False) when none of the three changed, else a new one, built
        (and True). Raises with the build's reason, leaving no release behind.
        ``uploaded``: how the source arrived when it came over SSH (``git push``, ``upload``):
        git is not run in it and ``commit`` is what was pushed."""
        digest = manifest_digest(doc)
        root = self.store.prepare_root(name)
        await asyncio.to_thread(self.store.collect, name)  # what a crash left behind
        # a release made but never deployed (a deploy cut short, or refused at the rollout
        # and since fixed outside it) of the same source, manifest and config is reused
        made = await ledger_step(self.ledger, self.store.list, name)
        candidates = [c for c in (current, *made[-1:]) if c is not None]
        staging = root / f".new-{secrets.token_hex(6)}"
        try:
            snap = await asyncio.to_thread(snapshot, source, staging, exclude=exclude or [],
                                           vcs=uploaded is None, commit=commit)
        except BaseException:
            await asyncio.to_thread(remove_tree, staging)
            raise
        for known in candidates:
            if known.get("status") in ("built", "deployed") and (
                    (known.get("source") or {}).get("digest") == snap.digest
                    and known.get("manifest_digest") == digest
                    and AppConfig.from_json(known.get("config")) == config):
                await asyncio.to_thread(remove_tree, staging)
                return known, False
        what = changes or _changes(current, snap.digest, digest, config)
        number = await ledger_step(self.ledger, self.store.allocate, name, {
            "app": name, "by": by, "files": "", "changes": what,
            "source": {"path": uploaded or str(source), "digest": snap.digest,
                       "commit": snap.commit,
                       "dirty": snap.dirty, "files": snap.files, "size": snap.size,
                       "describe": snap.describe()},
            "manifest_digest": digest, "config": config.as_json()})
        directory = self.store.directory(name, number)
        try:
            os.rename(staging, directory)
            await ledger_step(self.ledger, self.store.update, name, number,
                              files=directory.name)
            self.events.publish(f"app.{name}.release.created",
                                {"release": number, "changes": what,
                                 "source": snap.describe()})
            build = await self._build(name, number, directory, doc, uid, gid)
            await ledger_step(self.ledger, self.store.update, name, number, status="built",
                              build=build, manifest=doc)
        except BaseException as exc:
            log.error("release not made", app=name, release=number, error=str(exc))
            self.events.publish(f"app.{name}.build.failed",
                                {"release": number, "reason": _reason(exc)})
            await asyncio.to_thread(remove_tree, staging)
            await self.settle()  # the build's sandbox may still hold its directory
            await ledger_step(self.ledger, self.store.drop, name, number)
            raise
        return await ledger_step(self.ledger, self.store.get, name, number), True

    def config_release(self, name: str, current: dict[str, Any], config: AppConfig,
                       changes: list[str], by: str) -> dict[str, Any]:
        """A new release of the current one's files and manifest with another config (a
        config change: no copy, no build)."""
        number = self.store.allocate(name, {
            "app": name, "by": by, "files": current.get("files") or f"v{current['number']}",
            "changes": changes, "source": current.get("source") or {},
            "manifest_digest": current.get("manifest_digest"),
            "manifest": current.get("manifest"), "config": config.as_json(),
            "build": current.get("build")})
        self.store.update(name, number, status="built")
        self.events.publish(f"app.{name}.release.created",
                            {"release": number, "changes": changes})
        return self.store.get(name, number)

    async def _build(self, name: str, number: int, directory: Path, doc: dict[str, Any],
                     uid: int | None, gid: int | None) -> dict[str, Any] | None:
        """Build release ``number`` in its directory; its summary, or None (nothing to do)."""
        cache = self.home / "cache" / name
        (cache / "tmp").mkdir(parents=True, exist_ok=True)
        os.chmod(self.home / "cache", 0o711)
        build_cfg = self.config.build
        plan = await asyncio.to_thread(build_plan, directory, doc, cache=cache, config=build_cfg)
        if plan is None:
            if self.as_root:
                await asyncio.to_thread(seal, directory)
            return None
        started = time.monotonic()
        self.events.publish(f"app.{name}.build.started", {
            "release": number, "steps": [s.label for s in plan.steps], "python": plan.python})
        if uid is not None:
            await asyncio.to_thread(_chown_tree, directory, uid, gid if gid is not None else uid)
            if any(p.stat().st_uid != uid for p in (cache, cache / "tmp")):  # new, or re-owned
                await asyncio.to_thread(_chown_tree, cache, uid,
                                        gid if gid is not None else uid)
        timeout = float(((doc.get("build") or {}).get("timeout")) or build_cfg.timeout_s)
        spec = self._build_spec(name, number, directory, cache, plan, uid, gid)
        ispec = InstanceSpec(id=f"{spec.name}.build.v{number}", app=spec.name, process="build",
                             index=0, kind="job", argv=["/bin/sh", "-c", plan.script()],
                             env=dict(plan.env), cwd=str(directory))
        out = self.store.log(name, number, "build")
        sealed: dict[str, float] = {}

        async def seal_built(outcome: Outcome) -> None:
            # nothing of the build runs any more: its pid namespace ended with its first
            # process, and its group was killed; the sandbox's teardown goes on meanwhile
            if outcome.ok and self.as_root:
                t_seal = time.monotonic()
                await asyncio.to_thread(seal, directory)
                sealed["seal_s"] = round(time.monotonic() - t_seal, 3)

        # the build's sandbox and its network policy go after it, off the critical path:
        # each build is a pseudo-app of its own, so nothing that follows meets its teardown
        outcome = await self.run(spec, ispec, output=out, timeout_s=timeout,
                                 topic=f"app.{name}.build.output", release=number,
                                 record=(name, number), on_exit=seal_built,
                                 teardown="background")
        if not outcome.ok:
            raise CorralError(
                f"the build of release v{number} {outcome.describe()}; nothing was deployed "
                f"and what runs is untouched (its output: {out}). Its last lines:\n"
                f"{outcome.last_lines()}", code=ErrorCode.INVALID)
        seconds = round(time.monotonic() - started, 3)
        self.events.publish(f"app.{name}.build.finished",
                            {"release": number, "seconds": seconds})
        return {"kinds": plan.kinds, "python": plan.python, "seconds": seconds,
                "steps": [s.label for s in plan.steps],
                "phases": {**outcome.extra, "seal_s": sealed.get("seal_s", 0.0)}}

    def _build_spec(self, name: str, number: int, directory: Path, cache: Path,
                    plan: BuildPlan, uid: int | None, gid: int | None) -> AppSpec:
        """The build's sandbox: the release directory and the cache writable, the build
        tools readable, egress only to the package indexes; no port, no config, no secret."""
        paths: dict[str, Any] = {
            "release": {"path": str(directory), "mode": "rw"},
            "cache": {"path": str(cache), "mode": "rw"},
        }
        for n, tool in enumerate(plan.tools):
            if not tool.startswith(("/usr/", "/bin/", "/sbin/", "/lib")):
                paths[f"tool{n}"] = {"path": tool, "mode": "ro"}
        manifest = {
            "app": {"name": f"{name}{BUILD_SUFFIX}{number}"},
            "processes": {}, "ports": {}, "paths": paths,
            "network": {"egress": [{"rule": e} for e in plan.egress]},
            "limits": {"processes": 512},
            "resolved": {"directory": str(directory), "file": "(build)", "offset": 0,
                         "env": {}, "claims": [], "on_demand": []},
        }
        return AppSpec(name=f"{name}{BUILD_SUFFIX}{number}", directory=str(directory),
                       manifest=manifest,
                       uid=uid, gid=gid)

    # ---- running a process of a release ------------------------------------------------------

    async def run(self, spec: AppSpec, ispec: InstanceSpec, *, output: Path | None,
                  timeout_s: float | None, topic: str | None = None,
                  release: int | None = None, secret_env: dict[str, str] | None = None,
                  stdio: list[str] | None = None, stdio_owner: int | None = None,
                  tty: bool = False, record: tuple[str, int] | None = None,
                  on_exit: Callable[[Outcome], Awaitable[None]] | None = None,
                  teardown: Literal["wait", "background"] = "wait") -> Outcome:
        """Run one process of ``spec`` in its sandbox to its end. Its output goes to
        ``output`` (each line also published on ``topic``) or to the caller's ``stdio``.
        ``timeout_s``: then its process group is killed. ``record``: (app, release) whose
        record keeps the process's identity while it runs (for a restarted kernel to end
        it). ``on_exit``: awaited with the outcome once the process and its group are gone,
        alongside the sandbox's teardown. ``teardown``: ``wait`` for it (the drivers'
        ``instance.stopped``), or ``background``: it goes on after this returns, followed by
        ``app.detach`` of ``spec`` (a pseudo-app of its own, a build's)."""
        t_plan = time.monotonic()
        plan = await self.instances.plan(spec, ispec, secret_env)
        if stdio is not None:
            plan.stdio, plan.stdio_owner, plan.tty = list(stdio), stdio_owner, tty
        elif output is not None:
            plan.stdout = plan.stderr = str(output)
        started = time.monotonic()
        try:
            pid, start_time = await asyncio.to_thread(self.launcher.launch, plan)
        except BaseException:
            await self.drivers.broadcast("instance.stopped", {
                "app": spec.name, "instance_id": ispec.id}, strict=False)
            raise
        if record is not None:
            await ledger_step(self.ledger, self.store.update, *record,
                              builder={"pid": pid, "start_time": start_time})
        follower = (asyncio.ensure_future(self._follow(output, topic, release))
                    if output is not None and topic else None)
        outcome = Outcome(exit_code=None)
        after: asyncio.Future[None] | None = None
        try:
            try:
                await asyncio.wait_for(self.launcher.wait_exit(pid, start_time), timeout_s)
            except TimeoutError:
                outcome.timed_out = True
                self.launcher.signal_instance(pid, start_time, signal.SIGKILL, group=True)
                await self.launcher.wait_exit(pid, start_time)
            code = self.launcher.reap(pid)
            if code is not None and code < 0:
                outcome.signal = -code
            else:
                outcome.exit_code = code
            # what it left in its process group ends with it
            self.launcher.signal_instance(pid, start_time, signal.SIGKILL, group=True)
            if on_exit is not None:
                after = asyncio.ensure_future(on_exit(outcome))
        finally:
            ended = time.monotonic()
            outcome.seconds = round(ended - started, 3)
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            stopped = self.drivers.broadcast("instance.stopped", {
                "app": spec.name, "instance_id": ispec.id}, strict=False)
            if teardown == "background":
                self._background(self._then_detach(stopped, spec.name))
            else:
                await stopped
            if after is not None:
                await after
            # where the time went: the sandbox's making, the process, its teardown
            outcome.extra = {"sandbox_s": round(started - t_plan, 3),
                             "process_s": outcome.seconds,
                             "teardown_s": round(time.monotonic() - ended, 3)}
        if output is not None:
            outcome.tail = _tail(output)
        return outcome

    async def _then_detach(self, stopped: Awaitable[Any], app: str) -> None:
        await stopped
        await self.drivers.broadcast("app.detach", {"app": app}, strict=False)

    async def _follow(self, output: Path, topic: str | None, release: int | None) -> None:
        """Publish each new line of ``output`` on ``topic`` as it is written; when cancelled
        (the process ended), what is left in the file is published before it returns."""
        offset = 0
        pending = b""

        def drain(final: bool) -> bool:
            nonlocal offset, pending
            try:
                with open(output, "rb") as f:
                    f.seek(offset)
                    chunk = f.read() if final else f.read(1 << 16)
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if final and pending:
                lines.append(pending)
            for line in lines:
                self.events.publish(str(topic), {
                    "release": release, "line": line.decode("utf-8", "replace")})
            return bool(chunk)

        try:
            while True:
                if not drain(False):
                    await asyncio.sleep(OUTPUT_POLL_S)
        except asyncio.CancelledError:
            drain(True)
            raise


def _changes(current: dict[str, Any] | None, source: str, manifest: str,
             config: AppConfig) -> list[str]:
    if current is None:
        return ["first release"]
    out = []
    if (current.get("source") or {}).get("digest") != source:
        out.append("code")
    if current.get("manifest_digest") != manifest:
        out.append("manifest")
    if AppConfig.from_json(current.get("config")) != config:
        out.append("config")
    return out or ["rebuild"]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CorralError):
        return exc.reason.split("\n", 1)[0]
    if isinstance(exc, LaunchError):
        return str(exc)
    return str(exc) or type(exc).__name__


def _tail(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
