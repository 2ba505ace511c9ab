"""The deploy and teardown sequence (ARCHITECTURE.md §6), and the instances it keeps running.

``corral up`` -> ``Deployer.deploy``: 1. resolve the manifest; 2. claim app name, ports,
rw paths, lb name and frontend, and the app's uid in ONE ledger transaction; 3. ``app.attach``
on the drivers; 4. per instance: record it in the ledger as *launching*, ask the drivers to
``instance.prepare`` in parallel, merge their fragments into a ``LaunchPlan`` and launch;
5. wait for readiness (the port answers, or sd_notify ``READY=1``); 6. ``instance.started``,
then stop instances of the previous generation. A failure undoes the earlier steps in
reverse and names the step. Deploys are idempotent: rerunning one keeps every live instance
whose spec did not change, so a deploy cut short by a crash is completed by a rerun without
killing what runs.

Instances are not the kernel's children; they are known by (pid, start time) in the ledger,
watched through pidfds, re-adopted after a kernel restart, and restarted with a back-off when
they exit on their own.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from corral import launch as launcher
from corral.errors import (
    CorralError,
    DriverUnavailableError,
    ErrorCode,
    LaunchError,
    NotFoundError,
)
from corral.ledger import Claim, Record, Txn
from corral.protocol import (
    AppSpec,
    BindMount,
    InstanceRecord,
    InstanceSpec,
    LaunchPlan,
    PlanFragment,
)
from corral.protocol._ops import Deploy, Scale, Spawn

if TYPE_CHECKING:
    from corral.kernel import Kernel

log = structlog.get_logger("corral.deploy")

STOP_GRACE_S = 5.0
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Live:
    """A running instance the kernel watches."""

    record: InstanceRecord
    spec_hash: str
    generation: int
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False
    restarts: int = 0
    exit_status: str = ""
    waiting: str = ""  # why a crashed instance is not restarted yet (a driver it needs is down)
    launched_at: float = field(default_factory=time.monotonic)
    # socket activation: the kernel's copies of the sockets the instance got as fd 3.., kept
    # so that a restart hands it the same sockets (the lb still routes to them)
    listen_fds: list[int] = field(default_factory=list)

    def age(self) -> float:
        """Seconds since the instance was launched."""
        return time.monotonic() - self.launched_at

    def close_listen_fds(self) -> None:
        """Drop the kernel's copies of the instance's sockets (it is gone for good)."""
        fds, self.listen_fds = self.listen_fds, []
        for fd in fds:
            os.close(fd)


@dataclass
class Job:
    """A spawned job (cron run): watched until it ends; its status kept for instance.wait."""

    record: InstanceRecord
    output: str | None
    done: asyncio.Future[dict[str, Any]]
    watcher: asyncio.Task[None] | None = None


@dataclass
class AppState:
    """An app as the kernel keeps it in memory (the ledger has the same, durably)."""

    spec: AppSpec
    instances: dict[str, Live] = field(default_factory=dict)
    deploying: bool = False


def spec_hash(spec: InstanceSpec) -> str:
    """Identity of an instance's configuration: same hash, no need to replace it."""
    data = spec.model_dump(mode="json", exclude={"env", "id"})
    env = {k: v for k, v in spec.env.items() if k not in ("NOTIFY_SOCKET", "CORRAL_INSTANCE_ID")}
    raw = json.dumps([data, env], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


class Deployer:
    """Deploys, tears down, spawns and watches app instances for the kernel."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.apps: dict[str, AppState] = {}
        self.jobs: dict[str, Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- deploy ------------------------------------------------------------------------------

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    async def deploy(self, args: Deploy) -> dict[str, Any]:
        """``app.deploy``: the whole sequence; returns the app and its instances."""
        started = time.monotonic()
        directory = Path(args.directory)
        from corral import manifest as manifests  # loaded on first use: an idle kernel is small

        resolved = manifests.load(directory, set_=args.set, offset=args.offset, env=args.env)
        doc = resolved.as_json()
        name = str(doc["app"]["name"])
        await self._require(doc, doing=f"deploy of {name!r}")
        async with self._lock(name):
            return await self._deploy(name, resolved, doc, args, started)

    async def scale(self, args: Scale) -> dict[str, Any]:
        """``app.scale``: the deployed manifest (not the directory's current corral.toml) with
        new instance counts, deployed like ``corral up``: new instances start and join, surplus
        ones are drained and stopped, the rest are kept as they are."""
        started = time.monotonic()
        from corral import manifest as manifests

        state = self.apps.get(args.name)
        if state is None:
            raise NotFoundError(f"no app named {args.name!r} is deployed")
        await self._require(state.spec.manifest, doing=f"scale of {args.name!r}")
        async with self._lock(args.name):
            state = self.apps.get(args.name)
            if state is None:
                raise NotFoundError(f"no app named {args.name!r} is deployed")
            doc = copy.deepcopy(state.spec.manifest)
            processes: dict[str, Any] = doc.get("processes") or {}
            unknown = sorted(set(args.counts) - set(processes))
            if unknown:
                raise NotFoundError(
                    f"app {args.name!r} has no process {', '.join(map(repr, unknown))} "
                    f"(it has {', '.join(map(repr, sorted(processes))) or 'none'})")
            for process, count in args.counts.items():
                processes[process]["instances"] = count
            resolved = manifests.ResolvedManifest.from_json(doc)
            deploy = Deploy(directory=state.spec.directory, wait_s=args.wait_s)
            return await self._deploy(args.name, resolved, resolved.as_json(), deploy, started)

    async def _deploy(
        self, name: str, resolved: Any, doc: dict[str, Any], args: Deploy, started: float
    ) -> dict[str, Any]:
        k = self.kernel
        previous = self.apps.get(name)  # the same AppState this deploy updates in place
        previous_spec = previous.spec if previous is not None else None
        old_rec = k.ledger.get("app", name)
        generation = int(old_rec.value.get("generation", 0)) + 1 if old_rec else 1
        uid, gid = self._app_ids(name)
        if uid is not None:
            _check_reachable(Path(resolved.directory), uid)
        spec = AppSpec(name=name, directory=str(resolved.directory), manifest=doc,
                       uid=uid, gid=gid, generation=generation)
        # What a failed redeploy restores while the previous generation keeps running.
        held_before = k.ledger.list(owner=name)
        manifest_path = self._write_manifest(spec)

        # 2. one transaction: everything the app holds, and the release of what it no longer does
        try:
            k.ledger.commit(self._claims(spec, manifest_path))
        except BaseException:
            if previous_spec is not None:
                self._write_manifest(previous_spec)
            raise
        attached: list[str] = []
        launched: list[Live] = []
        replaced: list[Live] = []  # previous instances stopped before their replacement started
        state = self.apps.setdefault(name, AppState(spec))
        state.spec = spec
        state.deploying = True
        step = "attach"
        k.bus.publish(f"app.{name}.deploy.started", {"generation": generation})
        try:
            # 3. drivers set up app-wide state
            attached = await self._broadcast("app.attach", {"app": spec.model_dump(mode="json")})
            # 4.-5. instances: keep unchanged live ones, launch the rest
            step = "launch"
            # An on-demand process has no instance until the lb asks for one (instance.spawn).
            lazy = _on_demand_process(doc)
            wanted = [w for w in self._instance_specs(spec, resolved, manifest_path)
                      if w.process != lazy]
            # With the net driver every instance has its own address: new instances start
            # beside the old ones (Heroku's preboot, Kamal's rollout), and only once every
            # one of them is ready and healthy are the old ones drained and stopped; one that
            # is not fails the deploy while the old ones serve on, untouched. Without it they
            # share 127.0.0.1:PORT, so an old instance must go before its replacement starts.
            rolling = self.kernel.supervisor.by_capability("net") is not None
            retiring: list[Live] = []
            for ispec in wanted:  # one slot at a time
                h = spec_hash(ispec)
                olds = [lv for lv in state.instances.values() if _slot(lv) == ispec.id]
                if any(lv.spec_hash == h and launcher.is_alive(lv.record.pid,
                                                                lv.record.start_time)
                       for lv in olds):
                    for lv in olds:  # unchanged and alive: keep it (a rerun kills nothing)
                        lv.generation = generation
                    continue
                if not rolling:
                    for old in olds:
                        await self._stop_instance(state, old)
                        replaced.append(old)
                    olds = []
                iid = ispec.id if ispec.id not in state.instances else f"{ispec.id}-g{generation}"
                new = ispec.model_copy(update={"id": iid})
                timeout = self._start_timeout(doc, ispec.process, args.wait_s)
                live = await self._launch(state, new, generation, wait_s=timeout,
                                          spec_hash_=h, announce=False)
                launched.append(live)
                retiring.extend(olds)
            # 5b. join: every new instance healthy (in parallel, each within its own time)
            step = "health"
            joins = [self._join(state, lv, self._start_timeout(doc, lv.record.spec.process,
                                                                args.wait_s) - lv.age())
                     for lv in launched]
            await _all_or_first_failure(joins)
            step = "retire"
            await asyncio.gather(*(self._stop_instance(state, old) for old in retiring))
            # 6. instances of slots no longer wanted (scaled down, renamed processes) go
            slots = {w.id for w in wanted}
            for live in [lv for lv in state.instances.values() if _slot(lv) not in slots]:
                await self._stop_instance(state, live)
            k.ledger.put(name, "app", name, self._app_value(spec, manifest_path, "running"))
        except BaseException as exc:
            log.error("deploy failed, undoing", app=name, step=step, error=str(exc))
            for live in reversed(launched):
                await self._stop_instance(state, live)
            if previous_spec is not None and (state.instances or replaced):
                # the previous generation runs on: its claims, manifest and spec come back,
                # and what this deploy stopped to make room is started again
                await self._revert(state, previous_spec, held_before, attached)
                for old in replaced:
                    try:
                        await self._launch(state, old.record.spec, old.generation,
                                           wait_s=self._start_timeout(
                                               previous_spec.manifest, old.record.spec.process,
                                               args.wait_s), spec_hash_=old.spec_hash)
                    except Exception as again:  # reported; the undo goes on
                        log.error("redeploy undo: a previous instance did not come back",
                                  instance=old.record.spec.id, error=str(again))
            if previous_spec is None or not state.instances:
                await self._broadcast("app.detach", {"app": name}, only=attached, strict=False)
                for live in list(state.instances.values()):
                    await self._stop_instance(state, live)
                k.ledger.release(name)
                self.apps.pop(name, None)
                Path(manifest_path).unlink(missing_ok=True)
            k.bus.publish(f"app.{name}.deploy.failed", {
                "generation": generation, "step": step, "reason": str(exc) or repr(exc),
                "kept": previous_spec.generation if name in self.apps and previous_spec
                else None})
            if isinstance(exc, CorralError):
                exc.reason = f"deploy of {name!r} failed at step {step!r}: {exc.reason}"
                raise
            raise
        finally:
            state.deploying = False
        k.bus.publish(f"app.{name}.deployed", {"generation": generation})
        return {
            "app": name,
            "generation": generation,
            "instances": [self._view(live) for live in state.instances.values()],
            "seconds": round(time.monotonic() - started, 3),
            "confined": self.kernel.supervisor.confined(),
        }

    async def _revert(self, state: AppState, spec: AppSpec, held: list[Record],
                      attached: list[str]) -> None:
        """Undo a failed redeploy whose previous generation is still running.

        The ledger gets back exactly what the app ``held`` before (claims the redeploy added are
        released, released ones re-claimed with their old values; instance records are left
        to the instances), the app's manifest file and spec are the previous ones again, and
        the drivers that attached the new spec attach the previous one.
        """
        name = spec.name
        kept = {"app", "port", "path", "lbname", "uid"}
        before = {(r.kind, r.key): r for r in held if r.kind in kept}
        txn = Txn()
        for rec in self.kernel.ledger.list(owner=name):
            if rec.kind in kept and (rec.kind, rec.key) not in before:
                txn.release(name, rec.kind, rec.key)
        for rec in before.values():
            txn.claim(name, rec.kind, rec.key, rec.value)
        try:
            self.kernel.ledger.commit(txn)
        except CorralError as exc:  # a released claim was taken meanwhile: say so, keep going
            log.error("redeploy undo: previous claims not restored", app=name, error=exc.reason)
        self._write_manifest(spec)
        state.spec = spec
        for live in state.instances.values():  # kept instances were relabelled as the new one
            live.generation = spec.generation
        await self._broadcast("app.attach", {"app": spec.model_dump(mode="json")},
                              only=attached, strict=False)

    async def _require(self, manifest: dict[str, Any] | None, *, doing: str) -> None:
        """Fail closed: wait (bounded) for every driver this launch needs, or refuse.

        What is needed follows from the host config and, for a deploy, the ``manifest``'s
        sections (``Supervisor.needed``), never from what happens to be connected. A host
        with no sandbox driver enabled refuses unless its config says ``unconfined = true``.
        """
        sup = self.kernel.supervisor
        if not sup.confined() and not self.kernel.config.unconfined:
            raise CorralError(
                f"{doing} refused: no sandbox driver (fs) is enabled on this host, so the app "
                "would run unconfined; enable it, or set `unconfined = true` in the host "
                "config to run apps without a sandbox on purpose", code=ErrorCode.INVALID,
                retry=False)
        sections = [k for k, v in (manifest or {}).items() if v] if manifest else []
        await sup.require(sup.needed(sections), self.kernel.config.driver_wait_s, doing=doing)

    def _start_timeout(self, doc: dict[str, Any], process: str, override: float | None
                       ) -> float:
        """How long a new instance of ``process`` has to be ready (and healthy, in a rollout):
        the deploy's ``wait_s``, else the process's ``start_timeout``, else the host's."""
        if override:
            return override
        per = ((doc.get("processes") or {}).get(process) or {}).get("start_timeout")
        return float(per) if per else self.kernel.config.start_timeout_s

    def _app_ids(self, name: str) -> tuple[int | None, int | None]:
        """The app's uid/gid: as root a dynamic uid claimed in the ledger; else our own."""
        if os.geteuid() != 0:
            return None, None
        held = self.kernel.ledger.list(owner=name, kind="uid")
        if held:
            uid = int(held[0].key)
            return uid, uid
        lo, hi = self.kernel.config.app_uids
        taken = {int(r.key) for r in self.kernel.ledger.list(kind="uid")}
        for uid in range(lo, hi + 1):
            if uid not in taken:
                return uid, uid
        raise CorralError(f"no free app uid in {lo}..{hi}", code=ErrorCode.CONFLICT)

    def _claims(self, spec: AppSpec, manifest_path: str) -> Txn:
        doc = spec.manifest
        name = spec.name
        claims: list[Claim] = [Claim("app", name, self._app_value(spec, manifest_path,
                                                                  "deploying"))]
        for pname, port in sorted((doc.get("ports") or {}).items()):
            claims.append(Claim("port", str(port), {"app": name, "name": pname}))
        for pname, p in sorted((doc.get("paths") or {}).items()):
            if p.get("mode") == "rw":
                claims.append(Claim("path", str(p["path"]), {"app": name, "name": pname}))
        lb = doc.get("lb")
        if lb:
            claims.append(Claim("lbname", str(lb["name"]), {"app": name}))
            claims.append(Claim("port", str(lb["frontend"]), {"app": name, "name": "lb"}))
        if spec.uid is not None:
            claims.append(Claim("uid", str(spec.uid), {"app": name}))
        wanted = {(c.kind, c.key) for c in claims}
        txn = Txn()
        for rec in self.kernel.ledger.list(owner=name):
            if rec.kind in {"port", "path", "lbname", "uid"} and (rec.kind, rec.key) not in wanted:
                txn.release(name, rec.kind, rec.key)
        for c in claims:
            txn.claim(name, c.kind, c.key, c.value)
        return txn

    @staticmethod
    def _app_value(spec: AppSpec, manifest_path: str, status: str) -> dict[str, Any]:
        return {"spec": spec.model_dump(mode="json"), "manifest_path": manifest_path,
                "generation": spec.generation, "status": status}

    def _write_manifest(self, spec: AppSpec) -> str:
        """Write the resolved manifest where the app can read it (CORRAL_MANIFEST)."""
        d = self.kernel.home / "apps" / spec.name
        d.mkdir(parents=True, exist_ok=True)
        path = d / "manifest.json"
        tmp = d / "manifest.json.tmp"
        tmp.write_text(json.dumps(spec.manifest, indent=2, sort_keys=True))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        os.chmod(self.kernel.home / "apps", 0o711)
        os.chmod(d, 0o711)
        return str(path)

    def _instance_specs(self, spec: AppSpec, resolved: Any, manifest_path: str
                        ) -> list[InstanceSpec]:
        out = []
        for process, index, command, port in resolved.instances():
            from corral import manifest as manifests

            env = manifests.app_environment(resolved, process=process, index=index,
                                            manifest_path=Path(manifest_path))
            out.append(InstanceSpec(
                id=f"{spec.name}.{process}.{index}", app=spec.name, process=process, index=index,
                argv=["/bin/sh", "-c", f"exec {command}"], env=env, cwd=spec.directory,
                port=port,
            ))
        return out

    # ---- launch ------------------------------------------------------------------------------

    async def _plan(self, state: AppState, ispec: InstanceSpec) -> LaunchPlan:
        """Ask the drivers for their fragments and merge them (conflicts are errors)."""
        args = {"app": state.spec.model_dump(mode="json"),
                "instance": ispec.model_dump(mode="json")}
        replies = await self._gather("instance.prepare", args)
        # fail closed: a driver that gates launches and dropped out since _require must not
        # be skipped silently (the instance would run without its sandbox or network rules)
        for slot in self.kernel.supervisor.needed():
            if slot.name not in replies:
                raise DriverUnavailableError(
                    f"instance {ispec.id} not started: driver {slot.name!r} ({slot.capability})"
                    f" is {slot.state}" + (f": {slot.reason}" if slot.reason else ""),
                    driver=slot.name, state=slot.state, driver_reason=slot.reason)
        plan = LaunchPlan(instance=ispec, uid=state.spec.uid, gid=state.spec.gid)
        owners: dict[str, str] = {}
        env = dict(ispec.env)
        for driver, raw in replies.items():
            frag = PlanFragment.model_validate(raw)
            env.update(frag.env)
            plan.mounts.extend(frag.mounts)
            plan.cgroup_procs.extend(frag.cgroup_procs)
            for fname in ("root", "netns", "address", "stdout", "stderr", "pid_namespace",
                          "seccomp", "uid", "gid"):
                value = getattr(frag, fname)
                if value is None:
                    continue
                if fname in owners and getattr(plan, fname) != value and fname not in ("uid",
                                                                                       "gid"):
                    raise CorralError(
                        f"drivers {owners[fname]!r} and {driver!r} both set {fname}",
                        code=ErrorCode.INTERNAL, retry=False)
                owners[fname] = driver
                setattr(plan, fname, value)
        if os.geteuid() == 0 and (plan.uid in (None, 0) or plan.gid in (None, 0)):
            raise LaunchError("refusing to run an app as root", step="plan")
        if plan.stdout is None or plan.stderr is None:
            out = self.kernel.home / "apps" / ispec.app / "output"
            out.mkdir(parents=True, exist_ok=True)
            plan.stdout = plan.stdout or str(out / f"{ispec.id}.log")
            plan.stderr = plan.stderr or str(out / f"{ispec.id}.log")
        plan.instance = ispec.model_copy(update={"env": env})
        return plan

    async def _launch(self, state: AppState, ispec: InstanceSpec, generation: int, *,
                      wait_s: float, spec_hash_: str | None = None,
                      listen_fds: Sequence[int] = (), announce: bool = True) -> Live:
        """Plan, launch and wait until one instance is ready; ``listen_fds`` are handed over
        as fd 3.. (the caller keeps its descriptors; the instance's ``Live`` holds copies).

        With ``announce`` the drivers are told ``instance.started`` without waiting on their
        verdict (a restart, an on-demand start); a rollout passes False and calls ``_join``.
        """
        k = self.kernel
        notify = _NotifySocket(k.notify_dir / f"{ispec.id}.sock", state.spec.uid)
        h = spec_hash_ or spec_hash(ispec)
        ispec = ispec.model_copy(update={"env": {**ispec.env, "NOTIFY_SOCKET": str(notify.path),
                                                 "CORRAL_INSTANCE_ID": ispec.id}})
        # Recorded before the fork: a crash between fork and record leaves a findable trace.
        k.ledger.put(ispec.app, "instance", ispec.id,
                     {"state": "launching", "spec": ispec.model_dump(mode="json"),
                      "spec_hash": h, "generation": generation})
        try:
            plan = await self._plan(state, ispec)
            if plan.root is not None:  # a sandboxed view must still see its notify socket
                plan.mounts.append(BindMount(source=str(notify.path), target=str(notify.path),
                                             mode="rw"))
            plan.listen_fds = list(listen_fds)
            pid, start_time = await asyncio.to_thread(launcher.launch, plan)
        except BaseException:
            notify.close()
            await self._broadcast("instance.stopped", {"app": ispec.app, "instance_id": ispec.id},
                                  strict=False)
            k.ledger.release(ispec.app, [("instance", ispec.id)])
            raise
        record = InstanceRecord(spec=plan.instance, pid=pid, start_time=start_time,
                                address=plan.address or "127.0.0.1")
        live = Live(record, h, generation, listen_fds=[os.dup(fd) for fd in listen_fds])
        state.instances[ispec.id] = live
        self._record(live)
        live.watcher = asyncio.ensure_future(self._watch(state, live))
        k.bus.publish(f"app.{ispec.app}.instance.started", {"instance": ispec.id, "pid": pid})
        try:
            await self._ready(live, notify, wait_s)
        except BaseException:
            await self._stop_instance(state, live)
            raise
        finally:
            notify.close()
        live.record.state = "ready"
        self._record(live)
        k.bus.publish(f"app.{ispec.app}.instance.ready", {"instance": ispec.id, "pid": pid})
        if announce:
            await self._broadcast("instance.started", self._started_args(state, live),
                                  strict=False)
        return live

    @staticmethod
    def _started_args(state: AppState, live: Live, join_within: float | None = None
                      ) -> dict[str, Any]:
        args: dict[str, Any] = {"app": state.spec.model_dump(mode="json"),
                                "instance": live.record.model_dump(mode="json")}
        if join_within is not None:
            args["join_within_s"] = join_within
        return args

    async def _join(self, state: AppState, live: Live, within: float) -> None:
        """A rollout's gate: ``instance.started`` to every enabled driver serving it, and the
        instance joins only when each has answered and none said it is unhealthy.

        A driver that is (re)connecting is waited for and asked again, up to ``within``
        seconds; one that does not answer in that time, or answers with an error, fails the
        instance: silence is never taken for success.
        """
        rec = live.record
        deadline = time.monotonic() + max(within, 1.0)
        slots = [s for s in self.kernel.supervisor.slots.values()
                 if s.state != "disabled" and "instance.started" in s.ops]
        health: list[str] = []
        for slot in slots:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchError(
                        f"instance {rec.spec.id} did not join within {within:.0f}s: driver "
                        f"{slot.name!r} is {slot.state}, it never answered instance.started",
                        step="health")
                if live.exit_status or not launcher.is_alive(rec.pid, rec.start_time):
                    raise LaunchError(f"instance {rec.spec.id} exited before it joined "
                                      f"({live.exit_status or 'gone'}); {self._tail(rec)}",
                                      step="health")
                if slot.peer is None:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    reply = await self.kernel.bus.call(
                        slot.peer, "instance.started",
                        self._started_args(state, live, round(left, 3)), timeout=left + 5.0)
                except CorralError as exc:
                    if exc.code == ErrorCode.UNAVAILABLE:  # lost meanwhile: ask it again
                        log.warning("driver lost during a rollout, waiting for it",
                                    driver=slot.name, instance=rec.spec.id)
                        await asyncio.sleep(0.05)
                        continue
                    raise LaunchError(f"instance {rec.spec.id}: driver {slot.name!r} failed "
                                      f"instance.started: {exc.reason}", step="health") from None
                if reply.get("healthy") is False:
                    detail = str(reply.get("health") or "no check passed")
                    self.kernel.bus.publish(f"app.{rec.spec.app}.instance.unhealthy",
                                            {"instance": rec.spec.id, "driver": slot.name,
                                             "health": detail})
                    raise LaunchError(
                        f"instance {rec.spec.id} did not turn healthy within {within:.0f}s "
                        f"(driver {slot.name!r}, last health check: {detail}); the running "
                        "release was kept", step="health")
                if reply.get("health"):
                    health.append(f"{slot.name}: {reply['health']}")
                break
        self.kernel.bus.publish(f"app.{rec.spec.app}.instance.healthy",
                                {"instance": rec.spec.id, "pid": rec.pid,
                                 "health": "; ".join(health)})

    def _record(self, live: Live) -> None:
        self.kernel.ledger.put(live.record.spec.app, "instance", live.record.spec.id,
                               {"state": live.record.state,
                                "record": live.record.model_dump(mode="json"),
                                "spec_hash": live.spec_hash, "generation": live.generation})

    async def _ready(self, live: Live, notify: _NotifySocket, wait_s: float) -> None:
        """Port open or READY=1, whichever first; the instance dying first is a failure."""
        rec = live.record
        deadline = time.monotonic() + wait_s
        port = rec.spec.port
        mode = str(((self.apps[rec.spec.app].spec.manifest.get("processes") or {})
                    .get(rec.spec.process) or {}).get("ready", "auto"))
        if live.listen_fds and mode in ("auto", "port"):
            # socket activation: the socket listens already and queues connections until the
            # program accepts; the program never binds its port, so there is nothing to poll
            mode = "socket"
        if mode == "auto":
            mode = "port" if port is not None else "started"
        quiet_until = time.monotonic() + 0.3  # a 'started' process must survive this long
        while time.monotonic() < deadline:
            if live.exit_status or not launcher.is_alive(rec.pid, rec.start_time):
                raise LaunchError(
                    f"instance {rec.spec.id} exited before it was ready"
                    f" ({live.exit_status or 'gone'}); {self._tail(rec)}", step="ready")
            if notify.ready() or mode == "socket":  # READY=1 always counts, whatever the mode
                return
            if mode == "port" and port is not None:
                if await _port_open(rec.address, port):
                    return
            elif mode == "started" and time.monotonic() >= quiet_until:
                return
            await asyncio.sleep(0.01)
        raise LaunchError(f"instance {rec.spec.id} not ready within {wait_s:.0f}s "
                          f"(ready = {mode!r}: port {port} closed, no READY=1)", step="ready")

    def _tail(self, rec: InstanceRecord) -> str:
        path = self.kernel.home / "apps" / rec.spec.app / "output" / f"{rec.spec.id}.log"
        try:
            data = path.read_bytes()[-400:].decode("utf-8", "replace").strip()
        except OSError:
            return "no output captured by the kernel"
        return f"last output: {data!r}" if data else "no output"

    async def _watch(self, state: AppState, live: Live) -> None:
        """Wait for the instance to exit; restart it with a back-off unless it is stopping."""
        rec = live.record
        await _wait_pid(rec.pid, rec.start_time)
        live.exit_status = _reap(rec.pid)
        if live.stopping or state.instances.get(rec.spec.id) is not live:
            return
        log.warning("instance exited", instance=rec.spec.id, status=live.exit_status)
        self.kernel.bus.publish(f"app.{rec.spec.app}.instance.exited",
                                {"instance": rec.spec.id, "status": live.exit_status})
        rec.state = "exited"
        self._record(live)
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
                await self._require(None, doing=f"restart of {rec.spec.id}")
                async with self._lock(state.spec.name):
                    if not wanted():
                        return
                    timeout = self._start_timeout(state.spec.manifest, spec.process, None)
                    new = await self._launch(state, spec, live.generation, wait_s=timeout,
                                             listen_fds=live.listen_fds)
                    new.restarts = live.restarts + 1
                    live.close_listen_fds()  # the new instance holds its own copies
                    return
            except DriverUnavailableError as exc:
                if live.waiting != exc.reason:
                    live.waiting = exc.reason
                    log.error("crashed instance waits for a driver", instance=rec.spec.id,
                              error=exc.reason)
                    self.kernel.bus.publish(f"app.{rec.spec.app}.instance.waiting",
                                            {"instance": rec.spec.id, "reason": exc.reason})
                attempt = 0  # the driver is back soon or not: retry at once when it is
            except CorralError as exc:
                live.waiting = ""
                log.error("restart failed", instance=rec.spec.id, error=exc.reason)

    # ---- stop --------------------------------------------------------------------------------

    async def _stop_instance(self, state: AppState, live: Live, *, release: bool = True) -> None:
        """SIGTERM the instance's process group, SIGKILL after a grace period, release it."""
        live.stopping = True
        rec = live.record
        self.kernel.bus.publish(f"app.{rec.spec.app}.instance.draining",
                                {"instance": rec.spec.id, "pid": rec.pid})
        # Drain first (lb: no new connections, wait for active ones), then signal.
        await self._broadcast("instance.stopping", {"app": rec.spec.app,
                                                    "instance_id": rec.spec.id}, strict=False)
        await asyncio.to_thread(_terminate, rec.pid, rec.start_time, STOP_GRACE_S)
        if live.watcher is not None:
            live.watcher.cancel()
        _reap(rec.pid)
        if state.instances.get(rec.spec.id) is live:
            del state.instances[rec.spec.id]
        live.close_listen_fds()
        await self._broadcast("instance.stopped", {"app": rec.spec.app,
                                                   "instance_id": rec.spec.id}, strict=False)
        if release or self.kernel.ledger.get("instance", rec.spec.id) is not None:
            self.kernel.ledger.release(rec.spec.app, [("instance", rec.spec.id)])
        self.kernel.bus.publish(f"app.{rec.spec.app}.instance.stopped", {"instance": rec.spec.id})

    async def down(self, name: str) -> dict[str, Any]:
        """``app.down``: stop every instance, detach drivers, release everything the app holds."""
        async with self._lock(name):
            state = self.apps.get(name)
            if state is None and self.kernel.ledger.get("app", name) is None:
                raise NotFoundError(f"no app named {name!r}")
            stopped = 0
            if state is not None:
                for live in list(state.instances.values()):
                    await self._stop_instance(state, live)
                    stopped += 1
            await self._broadcast("app.detach", {"app": name}, strict=False)
            released = self.kernel.ledger.release(name)
            self.apps.pop(name, None)
            (self.kernel.home / "apps" / name / "manifest.json").unlink(missing_ok=True)
            self.kernel.bus.publish(f"app.{name}.down", {})
            return {"app": name, "stopped": stopped, "revision": released}

    # ---- spawn (cron runs, on-demand) --------------------------------------------------------

    async def spawn(self, args: Spawn, *, listen_fd: int | None = None) -> dict[str, Any]:
        """``instance.spawn``: start a process of ``app`` in its sandbox; returns its record.

        ``listen_fd`` (the kernel's copy of the lb's socket, ``args.listen_fd``; the caller
        keeps and closes it) becomes the instance's fd 3 with LISTEN_FDS=1 and LISTEN_PID."""
        state = self.apps.get(args.app)
        if state is None:
            raise NotFoundError(f"no app named {args.app!r}")
        await self._require(None, doing=f"start of a {args.kind} of {args.app!r}")
        doc = state.spec.manifest
        from corral import manifest as manifests

        resolved = manifests.ResolvedManifest.from_json(doc)  # with the deploy's overrides
        manifest_path = str(self.kernel.home / "apps" / args.app / "manifest.json")
        if args.kind == "job":
            if listen_fd is not None:
                raise CorralError("listen_fd is for instances, not jobs", code=ErrorCode.INVALID)
            if not args.command:
                raise CorralError("a job needs a command", code=ErrorCode.INVALID)
            run = int(time.time() * 1000) % 1_000_000_000
            label = args.label or str(run)
            env = manifests.app_environment(resolved, process=args.process, index=run,
                                            manifest_path=Path(manifest_path))
            env.pop("PORT", None)
            env.update(args.env)
            ispec = InstanceSpec(id=f"{args.app}.cron.{args.process}.{label}", app=args.app,
                                 process=args.process, index=0, kind="job",
                                 argv=["/bin/sh", "-c", args.command], env=env,
                                 cwd=state.spec.directory)
            plan = await self._plan(state, ispec)
            try:
                pid, start_time = await asyncio.to_thread(launcher.launch, plan)
            except BaseException:
                await self._broadcast("instance.stopped", {"app": args.app,
                                                           "instance_id": ispec.id}, strict=False)
                raise
            rec = InstanceRecord(spec=plan.instance, pid=pid, start_time=start_time,
                                 state="ready", address=plan.address or "127.0.0.1")
            output = plan.stdout if plan.stdout and Path(plan.stdout).is_file() else None
            job = Job(rec, output, asyncio.get_running_loop().create_future())
            self.jobs[ispec.id] = job
            job.watcher = asyncio.ensure_future(self._watch_job(job))
            return rec.model_dump(mode="json")
        procs = doc.get("processes") or {}
        if args.process not in procs:
            raise NotFoundError(f"app {args.app!r} has no process {args.process!r}")
        index = 1 + max((lv.record.spec.index for lv in state.instances.values()
                         if lv.record.spec.process == args.process), default=0)
        for process, idx, _command, _port in resolved.instances():
            if process == args.process and f"{args.app}.{process}.{idx}" not in state.instances:
                index = idx
                break
        specs = {s.id: s for s in self._instance_specs(state.spec, resolved, manifest_path)}
        found = specs.get(f"{args.app}.{args.process}.{index}")
        if found is None:
            raise CorralError(f"{args.process} has all its instances running",
                              code=ErrorCode.CONFLICT)
        fds: list[int] = []
        if listen_fd is not None and args.listen_fd is not None:
            fds = [listen_fd]
            found = found.model_copy(update={"env": {**found.env,
                                                     "LISTEN_FDNAMES": args.listen_fd.name}})
        async with self._lock(args.app):
            live = await self._launch(state, found, state.spec.generation, wait_s=30,
                                      listen_fds=fds)
        return live.record.model_dump(mode="json")

    async def _watch_job(self, job: Job) -> None:
        """Wait for a job's end, collect its status (we are its subreaper), release it."""
        rec = job.record
        await _wait_pid(rec.pid, rec.start_time)
        try:
            got, status = os.waitpid(rec.pid, 0)
        except ChildProcessError:  # adopted across a kernel restart: status unknown
            got, status = 0, -1
        result: dict[str, Any] = {"instance": rec.spec.id, "exit_code": None, "signal": None}
        if got and os.WIFEXITED(status):
            result["exit_code"] = os.WEXITSTATUS(status)
        elif got and os.WIFSIGNALED(status):
            result["signal"] = os.WTERMSIG(status)
        else:
            result["note"] = "exit status unknown (the job was not reaped by this kernel)"
        # whatever the job left in its process group ends with it
        launcher.signal_instance(rec.pid, rec.start_time, signal.SIGKILL, group=True)
        # drivers release the job first (the log driver drains its capture)...
        await self._broadcast("instance.stopped", {"app": rec.spec.app,
                                                   "instance_id": rec.spec.id}, strict=False)
        if job.output is None:  # ...so the tail read from the log driver is complete
            result["output_tail"] = await self._job_output(rec)
        if job.output:
            try:
                with open(job.output, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 16384))
                    result["output_tail"] = f.read().decode("utf-8", "replace")
            except OSError:
                pass
        self.kernel.bus.publish(f"app.{rec.spec.app}.job.exited", result)
        job.done.set_result(result)
        # keep the status a while for instance.wait callers that come late
        await asyncio.sleep(300)
        self.jobs.pop(rec.spec.id, None)

    async def _job_output(self, rec: InstanceRecord) -> str:
        slot = self.kernel.supervisor.by_capability("log")
        if slot is None or slot.peer is None or "query.log.read" not in slot.ops:
            return ""
        try:
            res = await self.kernel.bus.call(slot.peer, "query.log.read", {
                "app": rec.spec.app, "instance": rec.spec.id, "limit": 400, "json": False},
                timeout=5.0)
        except CorralError:
            return ""
        return "\n".join(str(ln).split(" ", 3)[-1] for ln in res.get("lines", []))[-16384:]

    async def wait_job(self, instance_id: str, timeout_s: float) -> dict[str, Any]:
        """``instance.wait``: the job's exit status, waiting up to ``timeout_s``."""
        job = self.jobs.get(instance_id)
        if job is None:
            raise NotFoundError(f"no job {instance_id!r} (finished more than 5 min ago?)")
        try:
            return await asyncio.wait_for(asyncio.shield(job.done), timeout_s)
        except TimeoutError:
            raise CorralError(f"job {instance_id!r} still running after {timeout_s:.0f}s",
                              code=ErrorCode.TIMEOUT) from None

    async def stop(self, instance_id: str) -> dict[str, Any]:
        """``instance.stop``."""
        for state in self.apps.values():
            live = state.instances.get(instance_id)
            if live is not None:
                await self._stop_instance(state, live)
                return {"instance": instance_id}
        raise NotFoundError(f"no instance {instance_id!r}")

    def signal(self, instance_id: str, sig: int, group: bool) -> dict[str, Any]:
        """``instance.signal``: an instance or a running job."""
        job = self.jobs.get(instance_id)
        if job is not None:
            launcher.signal_instance(job.record.pid, job.record.start_time, sig, group=group)
            return {"instance": instance_id}
        for state in self.apps.values():
            live = state.instances.get(instance_id)
            if live is not None:
                launcher.signal_instance(live.record.pid, live.record.start_time, sig,
                                         group=group)
                return {"instance": instance_id}
        raise NotFoundError(f"no instance {instance_id!r}")

    # ---- restore -----------------------------------------------------------------------------

    def restore(self) -> None:
        """After a (re)start: adopt live instances from the ledger by (pid, start time).

        Records left *launching* by a crash are matched against live processes carrying
        their ``CORRAL_INSTANCE``; anything unmatched is dropped from the ledger.
        """
        ledger = self.kernel.ledger
        for rec in ledger.list(kind="app"):
            spec = AppSpec.model_validate(rec.value["spec"])
            self.apps[spec.name] = AppState(spec)
        for rec in ledger.list(kind="instance"):
            state = self.apps.get(rec.owner)
            value = rec.value
            if state is None:
                ledger.release(rec.owner, [("instance", rec.key)])
                continue
            if "record" in value:
                irec = InstanceRecord.model_validate(value["record"])
            else:
                found = _find_by_env(rec.key)
                if found is None:
                    ledger.release(rec.owner, [("instance", rec.key)])
                    continue
                ispec = InstanceSpec.model_validate(value["spec"])
                irec = InstanceRecord(spec=ispec, pid=found[0], start_time=found[1], state="ready")
            if not launcher.is_alive(irec.pid, irec.start_time):
                ledger.release(rec.owner, [("instance", rec.key)])
                continue
            live = Live(irec, str(value.get("spec_hash", "")), int(value.get("generation", 1)),
                        listen_fds=_recover_listen_fds(irec))
            state.instances[irec.spec.id] = live
            self._record(live)
            live.watcher = asyncio.ensure_future(self._watch(state, live))
            log.info("instance adopted", instance=irec.spec.id, pid=irec.pid)

    def sync_args(self) -> dict[str, Any]:
        """The ``state.sync`` body: every app and live instance."""
        return {
            "apps": [s.spec.model_dump(mode="json") for s in self.apps.values()],
            "instances": [lv.record.model_dump(mode="json")
                          for s in self.apps.values() for lv in s.instances.values()]
            + [j.record.model_dump(mode="json") for j in self.jobs.values() if not j.done.done()],
            "launching": [r.key for r in self.kernel.ledger.list(kind="instance")
                          if r.value.get("state") == "launching"],
        }

    # ---- views -------------------------------------------------------------------------------

    @staticmethod
    def _view(live: Live) -> dict[str, Any]:
        rec = live.record
        return {"id": rec.spec.id, "app": rec.spec.app, "process": rec.spec.process,
                "pid": rec.pid, "state": rec.state, "address": rec.address, "port": rec.spec.port,
                "generation": live.generation, "restarts": live.restarts,
                "started": rec.start_time, "waiting": live.waiting}

    def ps(self) -> list[dict[str, Any]]:
        """Every app with its instances."""
        out = []
        confined = self.kernel.supervisor.confined()
        for name, state in sorted(self.apps.items()):
            out.append({"app": name, "generation": state.spec.generation, "confined": confined,
                        "directory": state.spec.directory,
                        "ports": state.spec.manifest.get("ports") or {},
                        "instances": [self._view(lv) for lv in state.instances.values()]})
        return out

    # ---- driver fan-out ----------------------------------------------------------------------

    async def _gather(self, op: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        slots = self.kernel.supervisor.serving(op)
        results = await asyncio.gather(
            *(self.kernel.bus.call(s.peer, op, args) for s in slots if s.peer is not None),
            return_exceptions=True)
        out: dict[str, dict[str, Any]] = {}
        for slot, res in zip(slots, results, strict=True):
            if isinstance(res, BaseException):
                reason = res.reason if isinstance(res, CorralError) else repr(res)
                raise CorralError(f"driver {slot.name!r} failed {op}: {reason}",
                                  code=getattr(res, "code", ErrorCode.INTERNAL), retry=False)
            out[slot.name] = res
        return out

    async def _broadcast(self, op: str, args: dict[str, Any], *, only: list[str] | None = None,
                         strict: bool = True) -> list[str]:
        """Call ``op`` on every driver serving it; return the names that succeeded."""
        slots = [s for s in self.kernel.supervisor.serving(op) if only is None or s.name in only]
        results = await asyncio.gather(
            *(self.kernel.bus.call(s.peer, op, args) for s in slots if s.peer is not None),
            return_exceptions=True)
        ok = []
        for slot, res in zip(slots, results, strict=True):
            if isinstance(res, BaseException):
                reason = res.reason if isinstance(res, CorralError) else repr(res)
                if strict:
                    raise CorralError(f"driver {slot.name!r} failed {op}: {reason}",
                                      code=ErrorCode.INTERNAL, retry=False)
                log.warning("driver call failed", driver=slot.name, op=op, error=reason)
            else:
                ok.append(slot.name)
        return ok


class _NotifySocket:
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


def _check_reachable(directory: Path, uid: int) -> None:
    """Refuse early, and say why, when the app's uid could not enter its own directory."""
    import stat

    for d in [*reversed(directory.parents), directory]:
        st = d.stat()
        need = stat.S_IXOTH | (stat.S_IROTH if d == directory else 0)
        if st.st_uid != uid and st.st_mode & need != need:
            raise CorralError(
                f"the app runs as uid {uid}, which cannot "
                f"{'read' if d == directory else 'traverse'} {d} (mode {st.st_mode & 0o777:o});"
                f" make it {'o+rx' if d == directory else 'o+x'} or move the app",
                code=ErrorCode.INVALID)


def _recover_listen_fds(rec: InstanceRecord) -> list[int]:
    """A socket-activated instance adopted after a kernel restart: take back a copy of the
    listening sockets it was handed (fds 3..), so a crash can be restarted on them."""
    names = rec.spec.env.get("LISTEN_FDNAMES")  # set by spawn() with the socket it passed
    count = len(names.split(":")) if names else 0
    if count <= 0:
        return []
    from corral.launch.linux import pidfd_getfd

    fds: list[int] = []
    try:
        pidfd = os.pidfd_open(rec.pid)
    except OSError:
        return []
    try:
        if not launcher.is_alive(rec.pid, rec.start_time):  # same process, held by the pidfd
            return []
        for target in range(3, 3 + count):
            try:
                fd = pidfd_getfd(pidfd, target)
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
    finally:
        os.close(pidfd)
    return fds


def _on_demand_process(doc: dict[str, Any]) -> str | None:
    """The process the lb starts on demand (``lb.activation = "on-demand"``), if any."""
    lb = doc.get("lb") or {}
    if lb.get("activation") != "on-demand":
        return None
    return str(lb.get("process") or "web")


def _slot(live: Live) -> str:
    """The instance slot ('<app>.<process>.<index>') a live instance fills."""
    spec = live.record.spec
    return spec.env.get("CORRAL_INSTANCE", spec.id)


async def _port_open(address: str, port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(address, port), 0.5)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


async def _wait_pid(pid: int, start_time: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not launcher.is_alive(pid, start_time):
            return
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: _resolve(done))
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _reap(pid: int) -> str:
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exited"
    if got == 0:
        return ""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def _terminate(pid: int, start_time: float, grace: float) -> None:
    if not launcher.is_alive(pid, start_time):
        return
    launcher.signal_instance(pid, start_time, signal.SIGTERM, group=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not launcher.is_alive(pid, start_time):
            return
        time.sleep(0.01)
    launcher.signal_instance(pid, start_time, signal.SIGKILL, group=True)
    for _ in range(100):
        _reap(pid)
        if not launcher.is_alive(pid, start_time):
            return
        time.sleep(0.01)


def _find_by_env(instance_id: str) -> tuple[int, float] | None:
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



async def _all_or_first_failure(coros: Sequence[Any]) -> None:
    """Run ``coros`` together; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled():
                failure = task.exception()
                if failure is not None:
                    raise failure
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
