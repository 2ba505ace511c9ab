"""The deploy, scale and teardown sequence (docs/kernel.md) and its undo.

``corral up`` -> ``Deployer.deploy``: resolve the manifest; claim app name, ports, rw paths,
lb name and frontend, and the app's uid in ONE ledger transaction; ``app.attach`` on the
drivers; launch each new instance (``Instances.launch``: record, ``instance.prepare``, launch,
readiness); join them all (``Instances.join``: healthy behind the lb); only then drain and
stop the instances they replace. A failure undoes the earlier steps in reverse and names the
step. Deploys are idempotent: rerunning one keeps every live instance whose spec did not
change, so a deploy cut short by a crash is completed by a rerun without killing what runs.

``Deployer`` depends on narrow interfaces (the ledger, ``Drivers``, ``Events``, a
``Launcher``, two directories and the host config), never on the kernel object.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from corral.deploy._drivers import DriverCallError, Drivers, all_or_first_failure
from corral.deploy._instances import LAUNCHER, Events, Instances, Launcher
from corral.deploy._jobs import Jobs
from corral.deploy._lifecycle import Lifecycle
from corral.deploy._release import Releaser
from corral.deploy._spread import (
    PLACEMENT,
    SATELLITE,
    choose_hosts,
    deal,
    followed,
    joining,
    placement_key,
    share_of,
    spread_of,
)
from corral.deploy._state import AppState, Live, spec_hash
from corral.deploy._steps import ledger_step
from corral.errors import ConflictError, CorralError, ErrorCode, NotFoundError
from corral.host import HostConfig
from corral.ledger import CLUSTER_KINDS, Claim, HostView, Ledger, Record, Txn, describe_owner
from corral.protocol import AppSpec, InstanceSpec
from corral.protocol._ops import Check, Deploy, Restart, Scale, Spawn
from corral.release import AppConfig

log = structlog.get_logger("corral.deploy")

_HELD_KINDS = frozenset({"port", "path", "lbname", "uid"})  # what a redeploy may release
T = TypeVar("T")
MAX_SPREAD = 64  # [placement] spread's bound: an unset spread is every allowed host
UID_TRIES = 8  # uids passed over when other hosts claim them between our read and claim


@dataclass
class _Prepared:
    """What a deploy's first ledger step made: the new spec (claimed, the manifest written),
    what the app held before, its secrets' values, the instances this host runs, and the
    hosts a spread app's instances are dealt to (``Deployer._spread``)."""

    spec: AppSpec
    held_before: list[Record]
    secret_values: dict[str, str]
    manifest_path: str
    wanted: list[InstanceSpec]
    hosts: list[str]
    shares: dict[str, dict[str, list[int]]] | None
    holes: list[str]


class Deployer:
    """Deploys, scales and tears down apps; spawns jobs; keeps the instances running."""

    def __init__(self, *, ledger: Ledger, drivers: Drivers, events: Events, home: Path,
                 notify_dir: Path, config: HostConfig, launcher: Launcher = LAUNCHER,
                 as_root: bool | None = None) -> None:
        self.ledger = ledger
        self.drivers = drivers
        self.events = events
        self.home = home
        self.config = config
        self.launcher = launcher
        # as root apps get dynamic uids, and their directory must be reachable by them
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self.apps: dict[str, AppState] = {}
        self.instances = Instances(self.apps, ledger=ledger, drivers=drivers, events=events,
                                   home=home, notify_dir=notify_dir, config=config,
                                   launcher=launcher, as_root=self.as_root)
        self.jobs = Jobs(self.instances, drivers=drivers, events=events, launcher=launcher)
        self.releaser = Releaser(ledger=ledger, drivers=drivers, events=events, home=home,
                                 config=config, instances=self.instances, launcher=launcher,
                                 as_root=self.as_root)
        self.lifecycle = Lifecycle(self)

    async def off_loop(self, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``step(*args, **kwargs)`` (steps of a deploy that call the ledger, with no
        await among them) off the kernel's event loop on a networked ledger
        (``ledger_step``)."""
        return await ledger_step(self.ledger, step, *args, **kwargs)

    # ---- deploy ------------------------------------------------------------------------------

    async def deploy(self, args: Deploy, *, by: str = "root",
                     uploaded: str | None = None) -> dict[str, Any]:
        """``app.deploy``: make a release of the directory (snapshot, build; or find it
        unchanged), then the whole sequence; returns the app, its release and instances.
        Overrides given to an earlier ``corral up`` (``--set``, ``--env``, ``--offset``) are
        kept and apply again unless ``reset_overrides``; new ones are added to them.
        ``args.name``: the app the manifest must name. ``uploaded``: how the directory
        arrived (over SSH; see ``Releaser.make``)."""
        started = time.monotonic()
        args = self._kept_overrides(args)
        resolved = await self.check(args, doing="deploy")
        doc = resolved.as_json()
        name = str(doc["app"]["name"])
        if args.name is not None and name != args.name:
            raise CorralError(
                f"{Path(args.directory) / 'corral.toml'}: [app] name is {name!r}, but this "
                f"deploy is of {args.name!r} (the app pushed to); make them agree",
                code=ErrorCode.INVALID)
        await self.off_loop(self._refuse_another_hosts, name)
        await self.off_loop(self._refuse_placement, name, doc, Path(args.directory))
        async with self.releaser.lock(name):  # two deploys of one app never interleave

            uid, gid, claimed_uid = await self.off_loop(self._hold_uid, name)
            release: dict[str, Any] | None = None
            try:
                release, created = await self.releaser.make(
                    name, Path(resolved.directory), doc,
                    config=self.releaser.configs.current(name),
                    current=self.current_release(name), uid=uid, gid=gid, by=by,
                    exclude=[Path(str(p["path"])) for p in (doc.get("paths") or {}).values()
                             if p.get("mode") == "rw"],
                    uploaded=uploaded, commit=args.git.commit if args.git else None)
                overrides = {"set": list(args.set), "env": list(args.env),
                             "offset": args.offset}
                live = self.current_release(name)
                unchanged = live is not None and live["number"] == release["number"]
                # the release phase runs unless it passed for this release already
                return await self._deploy_release(name, release, started, args,
                                                  run_phase=True, unchanged=unchanged,
                                                  overrides=overrides)
            except BaseException:
                # refused before its rollout began (a check of the deploy): no trace of it;
                # one that failed in its rollout stays listed as failed, as on Heroku
                if release is not None and created:
                    number = int(release["number"])
                    made = await self.off_loop(self.releaser.store.get, name, number)
                    if made.get("status") == "built":
                        await self.releaser.settle()  # its build's sandbox is gone first
                        await self.off_loop(self.releaser.store.drop, name, number)

                await self.off_loop(self._unhold_uid, name, uid, claimed_uid)
                raise

    def _refuse_another_hosts(self, name: str) -> None:
        """On a ledger several hosts share: refuse at once, before anything is built or
        claimed, an app name that another host's app holds (the claim would be refused after
        the build; this says so first). ``ConflictError`` names the holder and its host."""
        if not isinstance(self.ledger, HostView) or self.ledger.get("app", name) is not None:
            return
        holder = self.ledger.holder("app", name)
        if holder is not None:
            raise ConflictError(
                f"app {name!r} is deployed by another host: the name is held by "
                f"{describe_owner(holder)}; nothing was built or claimed here (deploy it from "
                "that host, or give this app another [app] name)",
                kind="app", key=name, holder=holder)

    def _refuse_placement(self, name: str, doc: dict[str, Any], directory: Path) -> None:
        """On a ledger several hosts share: refuse at once, before anything is built or
        claimed, an app whose ``[placement]`` this host does not match, naming the ready
        hosts that do, or whose ``spread`` needs the cluster key this host lacks (a ledger
        of one host has no choice to make: it is not checked)."""
        from corral.manifest import PlacementSection

        if not isinstance(self.ledger, HostView):
            return
        placement = PlacementSection.model_validate(doc.get("placement") or {})
        this, labels = self.ledger.host, self.config.host.labels
        if (placement.spread or 1) > 1 and not self.config.host.cluster_key:
            raise CorralError(
                f"{directory / 'corral.toml'}: [placement] spread = {placement.spread} needs "
                f"host {this}'s [host] cluster_key (the other hosts run the app from their "
                "copies of its releases; `corral hosts key`, docs/etcd.md); nothing was built "
                "or claimed", code=ErrorCode.INVALID)
        if placement.allows(this, labels):
            return
        fits = sorted(r.key for r in self.ledger.list(kind="host-alive")
                      if placement.allows(r.key, list(r.value.get("labels") or [])))
        where = (f"deploy it from {', '.join(fits)}" if fits
                 else "no ready host matches it (`corral hosts` lists their labels)")
        raise CorralError(
            f"{directory / 'corral.toml'}: [placement] of {name!r} ({placement.describe()}) "
            f"does not allow host {this} (labels: {', '.join(labels) or 'none'}); nothing was "
            f"built or claimed; {where}", code=ErrorCode.INVALID)

    async def _deploy_release(self, name: str, release: dict[str, Any], started: float,
                              args: Deploy, *, run_phase: bool, unchanged: bool = False,
                              overrides: dict[str, Any] | None = None,
                              config: AppConfig | None = None) -> dict[str, Any]:
        """Roll the app onto ``release`` (its files, manifest and config), with the
        formation `corral scale` set (it outlives a push, as Heroku's does)."""
        from corral import manifest as manifests

        doc = copy.deepcopy(release["manifest"])
        doc["resolved"]["directory"] = str(self.releaser.store.root(name) / release["files"])
        async with self.instances.lock(name):
            formation = self.formation(name)
            for process, count in formation.items():
                if process in (doc.get("processes") or {}):
                    doc["processes"][process]["instances"] = count
            resolved = manifests.ResolvedManifest.from_json(doc)
            result = await self._deploy(
                name, resolved, resolved.as_json(), args, started, formation=formation,
                release=release, run_phase=run_phase,
                overrides=overrides if overrides is not None else self._overrides(name))
        if config is not None or not unchanged:
            self.releaser.configs.write(name, config if config is not None
                                        else AppConfig.from_json(release.get("config")))
        result["unchanged"] = unchanged
        return result

    def _record(self, name: str) -> Record | None:
        """The app's record on this host: its ``app`` record (homed here), or the
        ``satellite`` record of the share it runs for its home (``corral.deploy._spread``)."""
        return self.ledger.get("app", name) or self.ledger.get(SATELLITE, name)

    def current_release(self, name: str) -> dict[str, Any] | None:
        """The record of the release the app runs (None: not deployed, or deployed before
        releases existed); a satellite's is the home's, kept in its satellite record."""
        rec = self._record(name)
        if rec is not None and rec.kind == SATELLITE:
            return dict(rec.value.get("release_record") or {}) or None
        number = rec.value.get("release") if rec is not None else None
        if number is None:
            return None
        try:
            return self.releaser.store.get(name, int(number))
        except NotFoundError:
            return None

    def _overrides(self, name: str) -> dict[str, Any]:
        rec = self._record(name)
        kept = rec.value.get("overrides") if rec is not None else None
        return dict(kept or {"set": [], "env": [], "offset": 0})

    def _kept_overrides(self, args: Deploy) -> Deploy:
        """``args`` with the overrides of the app's last deploy first (later ones win)."""
        if args.reset_overrides:
            return args
        from corral import manifest as manifests

        try:
            draft = manifests.read(Path(args.directory))
        except CorralError:
            return args  # the check that follows reports the problem
        name = draft.app
        if not name:
            return args
        kept = self._overrides(name)
        return args.model_copy(update={
            "set": _merge_items(kept.get("set", []), args.set),
            "env": _merge_items(kept.get("env", []), args.env),
            "offset": args.offset or int(kept.get("offset") or 0)})

    def _hold_uid(self, name: str) -> tuple[int | None, int | None, bool]:
        """The app's uid and gid (``_app_ids``), claimed before its first build or share
        (the build runs as it), and True if this call claimed the uid. A free uid another
        host's deploy claims between our read and our claim is passed over for the next
        (``UID_TRIES`` times), so two hosts starting apps at once both go on."""
        for _ in range(UID_TRIES):
            uid, gid = self._app_ids(name)
            if uid is None or self.ledger.list(owner=name, kind="uid"):
                return uid, gid, False
            try:
                self.ledger.put(name, "uid", str(uid), {"app": name})
            except ConflictError as exc:
                if exc.kind != "uid":
                    raise
                log.info("app uid taken meanwhile; trying the next", app=name, uid=uid,
                         holder=exc.holder)
                continue
            return uid, gid, True
        raise CorralError(f"app {name!r}: no app uid could be claimed in {UID_TRIES} tries "
                          "(other hosts claimed each first); try again", code=ErrorCode.CONFLICT)

    def _unhold_uid(self, name: str, uid: int | None, claimed: bool) -> None:
        """Release the uid ``_hold_uid`` claimed, if the app did not come to run."""
        if claimed and uid is not None and self.ledger.get("app", name) is None \
                and self.ledger.get(SATELLITE, name) is None:
            self.ledger.release(name, [("uid", str(uid))])

    def formation(self, name: str) -> dict[str, int]:
        """The instance counts `corral scale` set for the app (kept across deploys)."""
        rec = self._record(name)
        raw = rec.value.get("formation") if rec is not None else None
        return {str(k): int(v) for k, v in (raw or {}).items()}

    async def check(self, args: Deploy | Check, *, doing: str = "check") -> Any:
        """``app.check`` (and the first step of a deploy): resolve the manifest in
        ``args.directory``, every section validated by its owner among the running drivers
        (``manifest.check``), before anything is claimed; ``ManifestError`` lists the problems,
        located. Waits (bounded) for the drivers the manifest needs."""
        from corral import manifest as manifests

        draft = manifests.read(Path(args.directory), set_=args.set, offset=args.offset,
                               env=args.env)
        await self.drivers.require(draft.document, doing=f"{doing} of {draft.app or 'an app'!r}")
        owned = await self.drivers.owners(draft.foreign())
        checked = await self.drivers.check_manifest(draft.request(owned))
        return draft.finish(checked, owned)

    async def scale(self, args: Scale) -> dict[str, Any]:
        """``app.scale``: the deployed manifest (not the directory's current corral.toml) with
        new instance counts, deployed like ``corral up``: new instances start and join, surplus
        ones are drained and stopped, the rest are kept as they are."""
        started = time.monotonic()
        from corral import manifest as manifests

        state = self._app(args.name)
        await self.drivers.require(state.spec.manifest, doing=f"scale of {args.name!r}")
        async with self.instances.lock(args.name):
            state = self._app(args.name)
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
            formation = {**self.formation(args.name), **args.counts}
            return await self._deploy(args.name, resolved, resolved.as_json(), deploy, started,
                                      formation=formation, release=state.release,
                                      overrides=self._overrides(args.name))

    async def restart(self, args: Restart) -> dict[str, Any]:
        """``app.restart``: replace every instance of the app (or of one process) with a fresh
        one of the deployed manifest, rolled like a deploy: the new ones start beside the old
        and must be ready and healthy before the old ones are drained and stopped (Heroku's
        ``ps:restart`` without its downtime)."""
        started = time.monotonic()
        from corral import manifest as manifests

        state = self._app(args.name)
        await self.drivers.require(state.spec.manifest, doing=f"restart of {args.name!r}")
        async with self.instances.lock(args.name):
            state = self._app(args.name)
            processes = state.spec.manifest.get("processes") or {}
            if args.process is not None and args.process not in processes:
                raise NotFoundError(
                    f"app {args.name!r} has no process {args.process!r} "
                    f"(it has {', '.join(map(repr, sorted(processes))) or 'none'})")
            doc = copy.deepcopy(state.spec.manifest)
            resolved = manifests.ResolvedManifest.from_json(doc)
            deploy = Deploy(directory=state.spec.directory, wait_s=args.wait_s)
            force = {args.process} if args.process is not None else set(processes)
            return await self._deploy(args.name, resolved, resolved.as_json(), deploy, started,
                                      force=force, release=state.release,
                                      overrides=self._overrides(args.name))

    def _app(self, name: str) -> AppState:
        state = self.apps.get(name)
        if state is None:
            raise NotFoundError(f"no app named {name!r} is deployed")
        return state

    async def _deploy(self, name: str, resolved: Any, doc: dict[str, Any], args: Deploy,
                      started: float, force: set[str] | None = None,
                      formation: dict[str, int] | None = None,
                      release: dict[str, Any] | None = None, run_phase: bool = False,
                      overrides: dict[str, Any] | None = None,
                      follows: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The sequence; ``force`` names processes whose instances are replaced even when
        their spec did not change (a restart). ``release``: the release deployed (its config
        reaches the instances; ``run_phase``: its release phase runs first, once).
        ``follows``: (home host, placement) when this host runs a spread app's share for its
        home (``corral.deploy._spread``): only that share, holding only this host's records;
        otherwise, for an app with ``[placement] spread``, the other hosts' shares are
        placed when this host's is live."""
        inst = self.instances
        previous = self.apps.get(name)  # the same AppState this deploy updates in place
        previous_spec = previous.spec if previous is not None else None
        live_release = previous.release if previous is not None else None

        def prepare() -> _Prepared:
            old_rec = self._record(name)
            generation = int(old_rec.value.get("generation", 0)) + 1 if old_rec else 1
            uid, gid = self._app_ids(name)
            if uid is not None:
                check_reachable(Path(resolved.directory), uid)
                check_writable_grants(doc, uid, gid if gid is not None else uid)
            spec = AppSpec(name=name, directory=str(resolved.directory), manifest=doc,
                           uid=uid, gid=gid, generation=generation)
            # What a failed redeploy restores while the previous generation keeps running.
            held_before = self.ledger.list(owner=name)
            secret_values = (self.releaser.configs.secret_values(
                name, AppConfig.from_json(release.get("config"))) if release else {})
            manifest_path = self._write_manifest(spec)

            # 2. one transaction: everything the app holds, and the release of what it no
            # longer does. Until the rollout is done the app record names what runs (the
            # previous spec and release): a kernel killed meanwhile comes back to that, and a
            # rerun completes it.
            # The instances this host runs: of a spread app, its share (dealt here or by the
            # home); an on-demand process has none until its driver asks (instance.spawn).
            lazy = on_demand_processes(doc)
            wanted = [w for w in self._instance_specs(spec, resolved, manifest_path, release)
                      if w.process not in lazy]
            hosts, shares, holes = self._spread(name, doc, wanted, old_rec, follows, release)
            mine = share_of(follows[1]) if follows is not None else \
                shares.get(self._this) if shares is not None else None
            if mine is not None:
                wanted = [w for w in wanted if w.index in mine.get(w.process, ())]
            txn = self._claims(spec, manifest_path, release, overrides,
                               running=(previous_spec, live_release), follows=follows)
            if shares is not None and release is not None and live_release is not None and \
                    int(live_release["number"]) == int(release["number"]):
                # the release that runs already (a scale, a restart, a lost host's share
                # dealt again): the other hosts' shares start at once, beside this one's; a
                # new release reaches them only once it is live here
                self._place(txn, name, shares, release, generation, overrides, force)
            try:
                self.ledger.commit(txn)
            except BaseException:
                if previous_spec is not None:
                    self._write_manifest(previous_spec)
                raise
            return _Prepared(spec, held_before, secret_values, manifest_path, wanted, hosts,
                             shares, holes)

        ready = await self.off_loop(prepare)
        spec, held_before, manifest_path = ready.spec, ready.held_before, ready.manifest_path
        generation, wanted, shares = spec.generation, ready.wanted, ready.shares
        secret_values = ready.secret_values
        attached: list[str] = []
        launched: list[Live] = []
        replaced: list[Live] = []  # previous instances stopped before their replacement started
        state = self.apps.setdefault(name, AppState(spec))
        state.home = follows[0] if follows is not None else None
        before = (state.release, state.secrets)
        state.spec = spec
        state.release, state.secrets = release, secret_values
        state.deploying = True
        step = "attach"
        self.events.publish(f"app.{name}.deploy.started", {"generation": generation})
        try:
            # 3. drivers set up app-wide state
            try:
                attached = await self.drivers.broadcast("app.attach",
                                                        {"app": spec.model_dump(mode="json")})
            except DriverCallError as exc:
                attached = exc.succeeded  # those undo their part; the others did nothing
                raise
            # the release phase (migrations): once per release, before any new instance
            if run_phase and release is not None:
                step = "release phase"
                await self.lifecycle.release_phase(state, resolved, manifest_path)
            # 4.-5. instances: keep unchanged live ones, launch the rest
            step = "launch"
            # With instance addresses (a driver declares the feature) new instances start
            # beside the old ones (Heroku's preboot, Kamal's rollout), and only once every
            # one of them is ready and healthy are the old ones drained and stopped; one that
            # is not fails the deploy while the old ones serve on, untouched. Without them
            # they share 127.0.0.1:PORT, so an old instance must go before its replacement.
            rolling = self.drivers.has_feature("instance_addresses")
            retiring: list[Live] = []
            for ispec in wanted:  # one slot at a time
                h = spec_hash(ispec)
                olds = [lv for lv in state.instances.values() if lv.slot == ispec.id]
                if ispec.process not in (force or ()) and any(
                        lv.spec_hash == h and self.launcher.is_alive(lv.record.pid,
                                                                     lv.record.start_time)
                        for lv in olds):
                    for lv in olds:  # unchanged and alive: keep it (a rerun kills nothing)
                        lv.generation = generation
                    continue
                if not rolling:
                    for old in olds:
                        await inst.stop(state, old)
                        replaced.append(old)
                    olds = []
                iid = ispec.id if ispec.id not in state.instances else f"{ispec.id}-g{generation}"
                new = ispec.model_copy(update={"id": iid})
                timeout = inst.start_timeout(doc, ispec.process, args.wait_s)
                live = await inst.launch(state, new, generation, wait_s=timeout, spec_hash_=h,
                                         announce=False)
                launched.append(live)
                retiring.extend(olds)
            # 6. join: every new instance healthy (together, each within its own time)
            step = "health"
            await all_or_first_failure([
                inst.join(state, lv, inst.start_timeout(doc, lv.record.spec.process,
                                                        args.wait_s) - lv.age())
                for lv in launched])
            # 7. only now: the replaced instances, then those of slots no longer wanted
            step = "retire"
            await asyncio.gather(*(inst.stop(state, old) for old in retiring))
            slots = {w.id for w in wanted}
            for live in [lv for lv in state.instances.values() if lv.slot not in slots]:
                await inst.stop(state, live)

            def finish() -> None:
                kept = formation if formation is not None else self.formation(name)
                value = _app_value(spec, manifest_path, "running", kept, release, overrides)
                if follows is not None:
                    txn = Txn().claim(name, SATELLITE, name, {
                        **value, "home": follows[0], "follows": followed(follows[1]),
                        "release_record": release})
                else:
                    txn = Txn().claim(name, "app", name, {**value, "spread": ready.hosts,
                                                          "holes": ready.holes,
                                                          "dealt": shares or {}})
                    self._place(txn, name, shares, release, generation, overrides, force)
                    if release is not None:
                        self.releaser.store.update(name, int(release["number"]), txn,
                                                   status="deployed", deployed=_now())
                self.ledger.commit(txn)

            await self.off_loop(finish)
            state.follows = followed(follows[1]) if follows is not None else None
        except BaseException as exc:
            log.error("deploy failed, undoing", app=name, step=step, error=str(exc))
            state.release, state.secrets = before
            await self._undo(state, previous_spec, held_before, attached, launched, replaced,
                             manifest_path, args)
            if release is not None and release.get("status") == "built":  # never went live
                await self.off_loop(self.releaser.store.update, name, int(release["number"]),
                                    status="failed", failure=f"{step}: {_first_line(exc)}")
            self.events.publish(f"app.{name}.deploy.failed", {
                "generation": generation, "step": step, "reason": str(exc) or repr(exc),
                "kept": previous_spec.generation if name in self.apps and previous_spec
                else None})
            if isinstance(exc, CorralError):
                exc.reason = f"deploy of {name!r} failed at step {step!r}: {exc.reason}"
            raise
        finally:
            state.deploying = False
        self.events.publish(f"app.{name}.deployed", {
            "generation": generation,
            "release": int(release["number"]) if release is not None else None})
        if release is not None and follows is None:
            removed = self.releaser.store.prune(name, int(release["number"]))
            self.releaser.configs.prune(name, self.releaser.store.referenced_secrets(name))
            if removed:
                log.info("old releases removed", app=name, releases=removed)
        return {
            "app": name,
            "release": int(release["number"]) if release is not None else None,
            "generation": generation,
            "instances": [live.view() for live in state.instances.values()],
            "seconds": round(time.monotonic() - started, 3),
            "confined": self.drivers.confined(),
            **({"hosts": sorted(shares)} if shares else {}),
        }

    async def _undo(self, state: AppState, previous_spec: AppSpec | None,
                    held_before: list[Record], attached: list[str], launched: list[Live],
                    replaced: list[Live], manifest_path: str, args: Deploy) -> None:
        """Undo a failed deploy in reverse: stop what it launched; then either give the
        previous generation back everything it had, or (a first deploy, or nothing of the
        previous one left) detach and release everything."""
        name = state.spec.name
        for live in reversed(launched):
            await self.instances.stop(state, live)
        if previous_spec is not None and (state.instances or replaced):
            # the previous generation runs on: its claims, manifest and spec come back,
            # and what this deploy stopped to make room is started again
            await self._revert(state, previous_spec, held_before, attached)
            for old in replaced:
                try:
                    await self.instances.launch(
                        state, old.record.spec, old.generation,
                        wait_s=self.instances.start_timeout(
                            previous_spec.manifest, old.record.spec.process, args.wait_s),
                        spec_hash_=old.spec_hash)
                except Exception as again:  # reported; the undo goes on
                    log.error("redeploy undo: a previous instance did not come back",
                              instance=old.record.spec.id, error=str(again))
        if previous_spec is None or not state.instances:
            await self.drivers.broadcast("app.detach", {"app": name}, only=attached,
                                         strict=False)
            for live in list(state.instances.values()):
                await self.instances.stop(state, live)
            await self.off_loop(self.ledger.release, name)
            self.apps.pop(name, None)
            Path(manifest_path).unlink(missing_ok=True)

    async def _revert(self, state: AppState, spec: AppSpec, held: list[Record],
                      attached: list[str]) -> None:
        """Undo a failed redeploy whose previous generation is still running.

        The ledger gets back exactly what the app ``held`` before (claims the redeploy added are
        released, released ones re-claimed with their old values; instance records are left
        to the instances), the app's manifest file and spec are the previous ones again, and
        the drivers that attached the new spec attach the previous one.
        """
        name = spec.name
        kept = _HELD_KINDS | {"app", SATELLITE, PLACEMENT}
        before = {(r.kind, r.key): r for r in held if r.kind in kept}


        def restore() -> None:
            txn = Txn()
            for rec in self.ledger.list(owner=name):
                if rec.kind in kept and (rec.kind, rec.key) not in before:
                    txn.release(name, rec.kind, rec.key)
            for rec in before.values():
                txn.claim(name, rec.kind, rec.key, rec.value)
            self.ledger.commit(txn)

        try:
            await self.off_loop(restore)
        except CorralError as exc:  # a released claim was taken meanwhile: say so, keep going
            log.error("redeploy undo: previous claims not restored", app=name, error=exc.reason)
        self._write_manifest(spec)
        state.spec = spec
        for live in state.instances.values():  # kept instances were relabelled as the new one
            live.generation = spec.generation
        await self.drivers.broadcast("app.attach", {"app": spec.model_dump(mode="json")},
                                     only=attached, strict=False)

    def _app_ids(self, name: str) -> tuple[int | None, int | None]:
        """The app's uid/gid: as root a dynamic uid claimed in the ledger; else our own."""
        if not self.as_root:
            return None, None
        held = self.ledger.list(owner=name, kind="uid")
        if held:
            uid = int(held[0].key)
            return uid, uid
        lo, hi = self.config.app_uids
        taken = {int(r.key) for r in self.ledger.list(kind="uid")}
        for uid in range(lo, hi + 1):
            if uid not in taken:
                return uid, uid
        raise CorralError(f"no free app uid in {lo}..{hi}", code=ErrorCode.CONFLICT)

    def _claims(self, spec: AppSpec, manifest_path: str,
                release: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None,
                running: tuple[AppSpec | None, dict[str, Any] | None] = (None, None),
                follows: tuple[str, dict[str, Any]] | None = None) -> Txn:
        doc = spec.manifest
        name = spec.name
        shown_spec = running[0] or spec
        record = _app_value(shown_spec, manifest_path, "deploying", self.formation(name),
                            running[1] if running[0] is not None else None, overrides)
        record["generation"] = spec.generation  # generations only grow, also across a crash
        record["deploying"] = {"generation": spec.generation,
                               "release": int(release["number"]) if release else None}
        old = self._record(name)
        if follows is not None:  # a share run for the home: what it ran until now
            record.update(home=follows[0], follows=(old.value.get("follows") if old else None),
                          release_record=running[1] if running[0] is not None else None)
        elif old is not None and old.value.get("spread"):
            record["spread"] = old.value["spread"]
            record["dealt"] = old.value.get("dealt") or {}
        claims: list[Claim] = [Claim(SATELLITE if follows is not None else "app", name,
                                     record)]
        for pname, port in sorted((doc.get("ports") or {}).items()):
            claims.append(Claim("port", str(port), {"app": name, "name": pname}))
        for pname, p in sorted((doc.get("paths") or {}).items()):
            if p.get("mode") == "rw":
                claims.append(Claim("path", str(p["path"]), {"app": name, "name": pname}))
        # what the sections' owners asked for (an lb's name and frontend port)
        for item in (doc.get("resolved") or {}).get("claims") or []:
            if follows is not None and str(item["kind"]) in CLUSTER_KINDS:
                continue  # the app's lb names and domains: its home holds them
            claims.append(Claim(str(item["kind"]), str(item["key"]), dict(item.get("value") or {})))
        if spec.uid is not None:
            claims.append(Claim("uid", str(spec.uid), {"app": name}))
        wanted = {(c.kind, c.key) for c in claims}
        txn = Txn()
        for rec in self.ledger.list(owner=name):
            if rec.kind in _HELD_KINDS and (rec.kind, rec.key) not in wanted:
                txn.release(name, rec.kind, rec.key)
        for c in claims:
            txn.claim(name, c.kind, c.key, c.value)
        return txn

    @property
    def _this(self) -> str:
        """This host's name on a shared ledger ("" on a ledger of its own)."""
        return self.ledger.host if isinstance(self.ledger, HostView) else ""

    def _spread(self, name: str, doc: dict[str, Any], wanted: list[InstanceSpec],
                old: Record | None, follows: tuple[str, dict[str, Any]] | None,
                release: dict[str, Any] | None
                ) -> tuple[list[str], dict[str, dict[str, list[int]]] | None, list[str]]:
        """The places a spread app is dealt to (``choose_hosts``: holes included, hosts
        that are lost) and each live host's instances (``deal``), or ([], None): not
        spread (``spread`` 1, or unset without a cluster key; a ledger of one host, an app
        without releases, or this host following a home); and the holes (places whose host
        is not live now)."""
        from corral.manifest import PlacementSection

        want = spread_of(doc)
        if want is None:  # every allowed host, where they run from copies of the releases
            want = MAX_SPREAD if self.config.host.cluster_key else 1
        if follows is not None or want <= 1 or release is None or not self._this:
            return [], None, []
        placement = PlacementSection.model_validate(doc.get("placement") or {})
        fits = {r.key: int(r.value.get("instances") or 0)
                for r in self.ledger.list(kind="host-alive")
                if r.key != self._this and not r.value.get("cordoned")
                and placement.allows(r.key, list(r.value.get("labels") or []))}
        previous = [str(h) for h in (old.value.get("spread") or [])] if old else []
        places = choose_hosts(self._this, want, fits, previous)
        counts: dict[str, int] = {}
        for w in wanted:
            counts[w.process] = max(counts.get(w.process, 0), w.index)
        live = {self._this, *fits}
        dealt = old.value.get("dealt") if old else None  # (absent before sticky deals)
        shares = deal(counts, places, live, before=dealt or None)
        return places, shares, [p for p in places if p not in live]

    def joining(self, rec: Record, alive: Sequence[Record]) -> list[str]:
        """The hosts of ``alive`` (``host-alive`` records) that joined since the last deal
        of the spread app of ``rec`` (its ``app`` record: homed here) and should now run a
        share of it (``corral.deploy._spread.joining``): a redeal (``Lifecycle.resume``)
        gives them one. Empty for an app not spread, or being deployed."""
        from corral.manifest import PlacementSection

        state = self.apps.get(rec.key)
        places = [str(h) for h in rec.value.get("spread") or ()]
        if state is None or state.home is not None or state.deploying or len(places) == 0 \
                or all(r.key in places for r in alive):
            return []  # (the common case, every round: no host beyond its places)
        doc = state.spec.manifest
        lazy = on_demand_processes(doc)
        largest = max((int(p.get("instances") or 0) for n, p in
                       (doc.get("processes") or {}).items() if n not in lazy), default=0)
        placement = PlacementSection.model_validate(doc.get("placement") or {})
        fits = [r.key for r in alive if r.key != self._this and not r.value.get("cordoned")
                and placement.allows(r.key, list(r.value.get("labels") or []))]
        return joining(places, rec.value.get("holes") or (), spread_of(doc) or MAX_SPREAD,
                       largest, fits)

    def _place(self, txn: Txn, name: str, shares: dict[str, dict[str, list[int]]] | None,
               release: dict[str, Any] | None, generation: int, overrides: dict[str, Any] | None,
               force: set[str] | None) -> None:
        """Add to ``txn`` the placement of every other host's share (and the release of
        placements no longer wanted: all of them when ``shares`` is None)."""
        wanted: dict[str, dict[str, Any]] = {}
        for host, share in sorted((shares or {}).items()):
            if host == self._this or release is None:
                continue
            wanted[placement_key(name, host)] = {
                "home": self._this, "release": int(release["number"]),
                "files": str(release.get("files") or f"v{release['number']}"),
                "generation": generation, "share": share, "force": sorted(force or ()),
                "overrides": overrides or {"set": [], "env": [], "offset": 0}}
        for rec in self.ledger.list(owner=name, kind=PLACEMENT):
            if rec.key not in wanted:
                txn.release(name, PLACEMENT, rec.key)
        for key, value in wanted.items():
            txn.claim(name, PLACEMENT, key, value)

    async def follow(self, name: str, home: str, placement: dict[str, Any],
                     release: dict[str, Any], directory: Path) -> dict[str, Any]:
        """Run this host's share of spread app ``name`` as ``home`` placed it
        (``corral.deploy._spread``): ``release`` (the home's record of it) from the copy of
        its files in ``directory``, only the instances of ``placement["share"]``; a share
        run already is rolled like a deploy (kept where unchanged; replaced where the home
        restarted its process). Refused for an app homed here."""
        from corral import manifest as manifests

        started = time.monotonic()
        await self.drivers.require(release.get("manifest"), doing=f"share of {name!r}")
        async with self.releaser.lock(name):
            state = self.apps.get(name)
            if state is not None and state.home is None:
                raise ConflictError(f"app {name!r} is homed on this host: it follows no "
                                    "other", kind=SATELLITE, key=name, holder=name)
            share = share_of(placement)
            doc = copy.deepcopy(release["manifest"])
            doc["resolved"]["directory"] = str(directory)
            counts = {p: max(share.get(p) or [0]) for p in (doc.get("processes") or {})}
            for process, count in counts.items():
                doc["processes"][process]["instances"] = count
            resolved = manifests.ResolvedManifest.from_json(doc)
            force = None
            if state is not None and state.follows is not None and \
                    state.follows.get("generation") != placement.get("generation"):
                force = {str(p) for p in placement.get("force") or ()}
            uid, _, claimed_uid = await self.off_loop(self._hold_uid, name)
            try:
                async with self.instances.lock(name):
                    return await self._deploy(
                        name, resolved, resolved.as_json(), Deploy(directory=str(directory)),
                        started, force=force, formation=counts, release=release,
                        overrides=dict(placement.get("overrides") or {}),
                        follows=(home, placement))
            except BaseException:
                await self.off_loop(self._unhold_uid, name, uid, claimed_uid)
                raise

    def _write_manifest(self, spec: AppSpec) -> str:
        """Write the resolved manifest where the app can read it (CORRAL_MANIFEST)."""
        d = self.home / "apps" / spec.name
        d.mkdir(parents=True, exist_ok=True)
        path = d / "manifest.json"
        tmp = d / "manifest.json.tmp"
        tmp.write_text(json.dumps(spec.manifest, indent=2, sort_keys=True))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        os.chmod(self.home / "apps", 0o711)
        os.chmod(d, 0o711)
        return str(path)

    def _instance_specs(self, spec: AppSpec, resolved: Any, manifest_path: str,
                        release: dict[str, Any] | None = None) -> list[InstanceSpec]:
        from corral import manifest as manifests

        out = []
        config, number = release_env(release)
        for process, index, command, port in resolved.instances():
            env = manifests.app_environment(resolved, process=process, index=index,
                                            manifest_path=Path(manifest_path), config=config,
                                            release=number)
            out.append(InstanceSpec(
                id=f"{spec.name}.{process}.{index}", app=spec.name, process=process, index=index,
                argv=["/bin/sh", "-c", f"exec {command}"], env=env, cwd=spec.directory,
                port=port,
            ))
        return out

    # ---- down --------------------------------------------------------------------------------

    async def down(self, name: str, *, purge: bool = False) -> dict[str, Any]:
        """``app.down``: stop every instance, detach drivers, release everything the app holds.
        Its releases, config and secrets are kept for its next ``corral up`` unless ``purge``,
        which forgets them too (and its build cache)."""
        async with self.releaser.lock(name), self.instances.lock(name):
            state = self.apps.get(name)
            if state is None and self._record(name) is None:
                if purge and self.releaser.purge(name):
                    self.events.publish(f"app.{name}.purged", {})
                    return {"app": name, "stopped": 0, "revision": self.ledger.revision(),
                            "purged": True}
                raise NotFoundError(f"no app named {name!r}")
            stopped = 0
            if state is not None:
                for live in list(state.instances.values()):
                    await self.instances.stop(state, live)
                    stopped += 1
            await self.drivers.broadcast("app.detach", {"app": name}, strict=False)
            released = await self.off_loop(self.ledger.release, name)
            self.apps.pop(name, None)
            (self.home / "apps" / name / "manifest.json").unlink(missing_ok=True)
            self.events.publish(f"app.{name}.down", {})
            if purge:
                self.releaser.purge(name)
                self.events.publish(f"app.{name}.purged", {})
            return {"app": name, "stopped": stopped, "revision": released, "purged": purge}

    # ---- spawn (cron runs, on-demand) --------------------------------------------------------

    async def spawn(self, args: Spawn, *, listen_fd: int | None = None,
                    requester: str = "job") -> dict[str, Any]:
        """``instance.spawn``: start a process of ``app`` in its sandbox; returns its record.

        ``listen_fd`` (the kernel's copy of a driver's socket, ``args.listen_fd``; the caller
        keeps and closes it) becomes the instance's fd 3 with LISTEN_FDS=1 and LISTEN_PID."""
        state = self.apps.get(args.app)
        if state is None:
            raise NotFoundError(f"no app named {args.app!r}")
        await self.drivers.require(None, doing=f"start of a {args.kind} of {args.app!r}")
        if args.kind == "job":
            if listen_fd is not None:
                raise CorralError("listen_fd is for instances, not jobs", code=ErrorCode.INVALID)
            if not args.command:
                raise CorralError("a job needs a command", code=ErrorCode.INVALID)
            return await self.jobs.spawn(state, process=args.process, command=args.command,
                                         label=args.label, env=args.env, owner=requester)
        return await self._spawn_instance(state, args.process, listen_fd,
                                          args.listen_fd.name if args.listen_fd else None)

    async def _spawn_instance(self, state: AppState, process: str, listen_fd: int | None,
                              fd_name: str | None) -> dict[str, Any]:
        from corral import manifest as manifests

        doc = state.spec.manifest
        resolved = manifests.ResolvedManifest.from_json(doc)  # with the deploy's overrides
        manifest_path = str(self.home / "apps" / state.spec.name / "manifest.json")
        if process not in (doc.get("processes") or {}):
            raise NotFoundError(f"app {state.spec.name!r} has no process {process!r}")
        index = 1 + max((lv.record.spec.index for lv in state.instances.values()
                         if lv.record.spec.process == process), default=0)
        for proc, idx, _command, _port in resolved.instances():
            if proc == process and f"{state.spec.name}.{proc}.{idx}" not in state.instances:
                index = idx
                break
        specs = {s.id: s for s in self._instance_specs(state.spec, resolved, manifest_path,
                                                        state.release)}
        found = specs.get(f"{state.spec.name}.{process}.{index}")
        if found is None:
            raise CorralError(f"{process} has all its instances running",
                              code=ErrorCode.CONFLICT)
        fds: Sequence[int] = ()
        if listen_fd is not None and fd_name is not None:
            fds = [listen_fd]
            found = found.model_copy(update={"env": {**found.env, "LISTEN_FDNAMES": fd_name}})
        async with self.instances.lock(state.spec.name):
            timeout = self.instances.start_timeout(doc, process, None)
            live = await self.instances.launch(state, found, state.spec.generation,
                                               wait_s=min(timeout, 30.0), listen_fds=fds)
        return live.record.model_dump(mode="json")

    async def wait_job(self, instance_id: str, timeout_s: float) -> dict[str, Any]:
        """``instance.wait``: a job's exit status, waiting up to ``timeout_s``."""
        return await self.jobs.wait(instance_id, timeout_s)

    async def stop(self, instance_id: str) -> dict[str, Any]:
        """``instance.stop``."""
        for state in self.apps.values():
            live = state.instances.get(instance_id)
            if live is not None:
                await self.instances.stop(state, live)
                return {"instance": instance_id}
        raise NotFoundError(f"no instance {instance_id!r}")

    def signal(self, instance_id: str, sig: int, group: bool) -> dict[str, Any]:
        """``instance.signal``: an instance or a running job."""
        job = self.jobs.running.get(instance_id)
        if job is not None:
            self.launcher.signal_instance(job.record.pid, job.record.start_time, sig,
                                          group=group)
            return {"instance": instance_id}
        for state in self.apps.values():
            live = state.instances.get(instance_id)
            if live is not None:
                self.launcher.signal_instance(live.record.pid, live.record.start_time, sig,
                                              group=group)
                return {"instance": instance_id}
        raise NotFoundError(f"no instance {instance_id!r}")

    async def fence(self) -> list[str]:
        """Stop every instance now, without the ledger or the drivers: this host could not
        renew its lease and another host may start its apps (``corral.failover``). Each
        instance's watcher is cancelled first (nothing restarts it), then its process group
        is killed; the apps are forgotten here, their ledger records left for when the
        ledger answers again (``Kernel`` resumes the apps it still holds, forgets the
        others). Returns the apps' names."""
        names = sorted(self.apps)
        lives = [(state, live) for state in self.apps.values()
                 for live in list(state.instances.values())]
        for _state, live in lives:
            live.stopping = True
            if live.watcher is not None:
                live.watcher.cancel()
        for _state, live in lives:
            rec = live.record
            await asyncio.to_thread(self.launcher.terminate, rec.pid, rec.start_time, 0.0)
            self.launcher.reap(rec.pid)
            live.close_listen_fds()
            self.events.publish(f"app.{rec.spec.app}.instance.fenced",
                                {"instance": rec.spec.id, "pid": rec.pid})
        self.apps.clear()
        return names

    # ---- restore and views -------------------------------------------------------------------

    def restore(self) -> None:
        """After a (re)start: drop releases whose build died with the previous kernel, adopt
        live instances from the ledger (``Instances.restore``), and give each app its live
        release's config and secrets back (for restarts and jobs)."""
        self.releaser.recover()
        self.instances.restore()
        for name, state in self.apps.items():
            state.release = self.current_release(name)
            if state.release is not None:
                try:
                    state.secrets = self.releaser.configs.secret_values(
                        name, AppConfig.from_json(state.release.get("config")))
                except CorralError as exc:
                    log.error("an app's secrets could not be read", app=name,
                              error=exc.reason)

    def sync_args(self) -> dict[str, Any]:
        """The ``state.sync`` body: every app and live instance (and running job)."""
        return {
            "apps": [s.spec.model_dump(mode="json") for s in self.apps.values()],
            "instances": [lv.record.model_dump(mode="json")
                          for s in self.apps.values() for lv in s.instances.values()]
            + self.jobs.records(),
            "launching": [r.key for r in self.ledger.list(kind="instance")
                          if r.value.get("state") == "launching"],
        }

    def ps(self) -> list[dict[str, Any]]:
        """Every app with its instances."""
        confined = self.drivers.confined()
        return [{"app": name, "generation": state.spec.generation, "confined": confined,
                 "directory": state.spec.directory,
                 "release": int(state.release["number"]) if state.release else None,
                 "ports": state.spec.manifest.get("ports") or {},
                 "instances": [lv.view() for lv in state.instances.values()],
                 **({"home": state.home} if state.home is not None else {})}
                for name, state in sorted(self.apps.items())]


def _app_value(spec: AppSpec, manifest_path: str, status: str,
               formation: dict[str, int] | None = None,
               release: dict[str, Any] | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"spec": spec.model_dump(mode="json"), "manifest_path": manifest_path,
            "generation": spec.generation, "status": status, "formation": formation or {},
            "release": int(release["number"]) if release else None,
            "overrides": overrides or {"set": [], "env": [], "offset": 0}}


def _merge_items(kept: list[str], new: list[str]) -> list[str]:
    """``KEY=VALUE`` overrides: the kept ones, then the new ones, one per key (last wins)."""
    out: dict[str, str] = {}
    for item in [*kept, *new]:
        out[item.partition("=")[0]] = item
    return list(out.values())


def release_env(release: dict[str, Any] | None) -> tuple[dict[str, str], int | None]:
    """A release's plain config vars and its number (what its processes' environment holds
    besides the manifest's; secrets go in at launch)."""
    if release is None:
        return {}, None
    return AppConfig.from_json(release.get("config")).vars, int(release["number"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _first_line(exc: BaseException) -> str:
    text = exc.reason if isinstance(exc, CorralError) else str(exc)
    return (text or type(exc).__name__).split("\n", 1)[0].split("; ", 1)[0]


def check_reachable(directory: Path, uid: int) -> None:
    """Refuse early, and say why, when the app's uid could not enter its own directory."""
    for d in [*reversed(directory.parents), directory]:
        st = d.stat()
        need = stat.S_IXOTH | (stat.S_IROTH if d == directory else 0)
        if st.st_uid != uid and st.st_mode & need != need:
            raise CorralError(
                f"the app runs as uid {uid}, which cannot "
                f"{'read' if d == directory else 'traverse'} {d} (mode {st.st_mode & 0o777:o});"
                f" make it {'o+rx' if d == directory else 'o+x'} or move the app",
                code=ErrorCode.INVALID)


def check_writable_grants(doc: dict[str, Any], uid: int, gid: int) -> None:
    """Refuse, before anything is claimed, a ``mode = "rw"`` grant of an existing path the
    app's uid cannot write (it would crash on EACCES at its first write): say the path, its
    owner and mode, and the two ways out. A path that does not exist yet is created owned by
    the app (``create = true``) by the sandbox driver."""
    for name, grant in sorted((doc.get("paths") or {}).items()):
        if grant.get("mode") != "rw":
            continue
        path = Path(str(grant["path"]))
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        need_x = stat.S_ISDIR(st.st_mode)
        if st.st_uid == uid:
            bits = (stat.S_IWUSR, stat.S_IXUSR)
        elif st.st_gid == gid:
            bits = (stat.S_IWGRP, stat.S_IXGRP)
        else:
            bits = (stat.S_IWOTH, stat.S_IXOTH)
        if st.st_mode & bits[0] and (not need_x or st.st_mode & bits[1]):
            continue
        raise CorralError(
            f"[paths] {name}: {path} is mode {st.st_mode & 0o7777:o}, owner uid {st.st_uid} "
            f"gid {st.st_gid}; the app runs as uid {uid} and could not write it (mode = "
            f"\"rw\"). Give it to the app (`chown -R {uid}:{gid} {path}`: the uid stays the "
            "app's while it is deployed), or grant a path that does not exist yet with "
            "create = true, which corral creates owned by the app", code=ErrorCode.INVALID)


def on_demand_processes(doc: dict[str, Any]) -> frozenset[str]:
    """The processes started on demand (a section's owner said so, e.g. an lb with
    ``activation = "on-demand"``): they have no instance until their driver asks for one
    (``instance.spawn``)."""
    return frozenset(str(p) for p in (doc.get("resolved") or {}).get("on_demand") or [])


