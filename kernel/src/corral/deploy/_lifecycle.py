"""The Heroku lifecycle on top of the deploy sequence: releases and rollback, config vars,
the release phase and one-off commands (WORKFLOW.md).

- ``releases``: the app's releases, newest last, which one is live; never a secret's value.
- ``rollback``: roll the app onto an earlier release's files, manifest and config, as a
  rolling deploy with no rebuild and no release phase.
- ``config_set`` / ``config_unset``: a new release of the live one's files with the new
  config, rolled out (its release phase runs, as Heroku's does); the desired config changes
  only once that release is live. An app not deployed yet just keeps the config for its first
  release.
- ``release_phase``: ``[release] command`` (or the Procfile's ``release:``), once per release,
  in the new release's sandbox and config, before any new instance starts.
- ``run``: a one-off command in the live release's sandbox and config, wired to the caller's
  terminal or pipes; its exit status is the reply.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.deploy._state import AppState
from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.protocol import InstanceSpec
from corral.protocol._ops import ConfigSet, ConfigUnset, Deploy, Rollback, RunCommand
from corral.release import AppConfig, check_name

if TYPE_CHECKING:
    from corral.deploy._sequence import Deployer

DEFAULT_RELEASE_TIMEOUT_S = 600.0


class Lifecycle:
    """Releases, rollback, config and one-off commands of deployed apps."""

    def __init__(self, deployer: Deployer) -> None:
        self.d = deployer
        self.releaser = deployer.releaser
        self.store = deployer.releaser.store
        self.configs = deployer.releaser.configs

    # ---- releases ----------------------------------------------------------------------------

    def releases(self, name: str) -> dict[str, Any]:
        """``app.releases``: every kept release (config with secrets masked), and the live one."""
        current = self.d.current_release(name)
        out = []
        for value in self.store.list(name):
            cfg = AppConfig.from_json(value.get("config"))
            out.append({
                "release": int(value["number"]),
                "status": value.get("status"),
                "live": current is not None and int(current["number"]) == int(value["number"]),
                "created": value.get("created"),
                "deployed": value.get("deployed"),
                "by": value.get("by"),
                "changes": value.get("changes") or [],
                "source": (value.get("source") or {}).get("describe"),
                "commit": (value.get("source") or {}).get("commit"),
                "origin": (value.get("source") or {}).get("path"),
                "config": cfg.masked(),
                "build": value.get("build"),
                "release_phase": value.get("release_phase"),
                "failure": value.get("failure"),
            })
        if not out and self.d.ledger.get("app", name) is None:
            raise NotFoundError(f"no app named {name!r} (and no release of one)")
        return {"app": name, "releases": out,
                "current": int(current["number"]) if current else None}

    async def rollback(self, args: Rollback, by: str) -> dict[str, Any]:
        """``app.rollback``: the app onto release ``args.release`` (default: the last one
        deployed before the live one), rolled, with that release's config."""
        started = time.monotonic()
        name = args.name
        async with self.releaser.lock(name):
            current = self.d.current_release(name)
            if current is None:
                raise NotFoundError(f"app {name!r} is not deployed from a release; "
                                    "deploy it with `corral up` first")
            live = int(current["number"])
            if args.release is None:
                earlier = [v for v in self.store.list(name)
                           if int(v["number"]) < live and v.get("status") == "deployed"]
                if not earlier:
                    raise NotFoundError(f"app {name!r} has no release before v{live} that was "
                                        "deployed; nothing to roll back to")
                target = earlier[-1]
            else:
                try:
                    target = self.store.get(name, args.release)
                except NotFoundError as exc:  # the caller's input: exit 2
                    raise CorralError(exc.reason, code=ErrorCode.INVALID) from None
            number = int(target["number"])
            if number == live:
                raise CorralError(f"v{number} is already live for {name!r}",
                                  code=ErrorCode.CONFLICT)
            if target.get("status") not in ("built", "deployed"):
                raise CorralError(
                    f"v{number} of {name!r} cannot be rolled back to: it is "
                    f"{target.get('status')} ({target.get('failure') or 'never deployed'})",
                    code=ErrorCode.CONFLICT)
            self.d.events.publish(f"app.{name}.rollback.started",
                                  {"release": number, "from": live, "by": by})
            deploy = Deploy(directory=str(self.store.directory(name, number)),
                            wait_s=args.wait_s)
            result = await self.d._deploy_release(
                name, target, started, deploy, run_phase=False,
                config=AppConfig.from_json(target.get("config")))
        result["rolled_back_from"] = live
        return result

    async def resume(self, name: str, *, by: str, wait_s: float | None = None
                     ) -> dict[str, Any]:
        """The app onto its current release again, with that release's config, no build
        and no release phase: an app this host adopted from a lost one, or one it stopped
        while it could not renew its lease and still holds (``corral.failover``)."""
        started = time.monotonic()
        async with self.releaser.lock(name):
            current = self.d.current_release(name)
            if current is None:
                raise NotFoundError(f"app {name!r} has no current release here to start")
            number = int(current["number"])
            self.d.events.publish(f"app.{name}.resumed", {"release": number, "by": by})
            deploy = Deploy(directory=str(self.store.directory(name, number)), wait_s=wait_s)
            return await self.d._deploy_release(
                name, current, started, deploy, run_phase=False,
                config=AppConfig.from_json(current.get("config")))

    # ---- config ------------------------------------------------------------------------------

    def config(self, name: str) -> dict[str, Any]:
        """``app.config``: the desired config, secrets masked."""
        cfg = self.configs.current(name)
        return {"app": name, "config": cfg.masked(), "secrets": sorted(cfg.secrets)}

    async def config_set(self, args: ConfigSet, by: str) -> dict[str, Any]:
        """``app.config.set``: set vars (or secrets); a release, rolled out."""
        what = f"{'secret' if args.secret else 'config'} set: {', '.join(sorted(args.vars))}"
        return await self._change(args.name, args.wait_s, by, what,
                                  lambda base: self.configs.with_set(
                                      args.name, args.vars, secret=args.secret, base=base))

    async def config_unset(self, args: ConfigUnset, by: str) -> dict[str, Any]:
        """``app.config.unset``: remove vars; a release, rolled out."""
        what = f"config unset: {', '.join(sorted(args.keys))}"
        return await self._change(args.name, args.wait_s, by, what,
                                  lambda base: self.configs.without(args.name, args.keys, base))

    async def _change(self, name: str, wait_s: float | None, by: str, what: str,
                      change: Any) -> dict[str, Any]:
        started = time.monotonic()
        async with self.releaser.lock(name):
            new: AppConfig = change(self.configs.current(name))
            current = self.d.current_release(name)
            if current is None:  # not deployed: kept for the first release
                self.configs.write(name, new)
                return {"app": name, "release": None, "config": new.masked(),
                        "note": "kept; the app's next `corral up` deploys with it"}
            release = self.releaser.config_release(name, current, new, [what], by)
            deploy = Deploy(directory=str(self.store.directory(name, int(release["number"]))),
                            wait_s=wait_s)
            result = await self.d._deploy_release(name, release, started, deploy,
                                                  run_phase=True, config=new)
        result["config"] = new.masked()
        return result

    # ---- release phase -----------------------------------------------------------------------

    async def release_phase(self, state: AppState, resolved: Any, manifest_path: str) -> None:
        """Run the release's ``[release] command`` once (a rerun after it passed skips it);
        a failure raises with its exit and last output, and the deploy is undone."""
        release = state.release
        command = (state.spec.manifest.get("release") or {}).get("command")
        if release is None or not command:
            return
        if (release.get("release_phase") or {}).get("exit") == 0:
            return
        from corral import manifest as manifests
        from corral.deploy._sequence import release_env

        name = state.spec.name
        number = int(release["number"])
        job = f"{name}.release.v{number}"
        config, n = release_env(release)
        env = manifests.app_environment(resolved, process="release", index=0,
                                        manifest_path=Path(manifest_path), job=job,
                                        config=config, release=n)
        ispec = InstanceSpec(id=job, app=name, process="release", index=0, kind="job",
                             argv=["/bin/sh", "-c", str(command)], env=env,
                             cwd=state.spec.directory)
        timeout = float((state.spec.manifest.get("release") or {}).get("timeout")
                        or DEFAULT_RELEASE_TIMEOUT_S)
        self.d.events.publish(f"app.{name}.release.phase",
                              {"release": number, "command": str(command)})
        outcome = await self.releaser.run(
            state.spec, ispec, output=self.store.log(name, number, "release"),
            timeout_s=timeout, topic=f"app.{name}.release.output", release=number,
            secret_env=state.secrets)
        phase = {"command": str(command), "exit": outcome.exit_code, "signal": outcome.signal,
                 "seconds": outcome.seconds, "timed_out": outcome.timed_out}
        await self.d.off_loop(self.store.update, name, number, release_phase=phase)
        release["release_phase"] = phase
        if not outcome.ok:
            kept = ("the previous release keeps serving" if state.instances
                    else "nothing was started")
            raise CorralError(
                f"the release phase of v{number} ({command}) {outcome.describe()}; {kept} "
                f"(its output: {self.store.log(name, number, 'release')}). Its last lines:\n"
                f"{outcome.last_lines()}", code=ErrorCode.INVALID)

    # ---- one-off commands --------------------------------------------------------------------

    async def run(self, args: RunCommand, caller_uid: int) -> dict[str, Any]:
        """``app.run``: ``args.command`` in the live release of ``args.name``: its sandbox,
        config and secrets, as a job (no port, never restarted); stdio wired to the paths
        the caller made (a terminal, or FIFOs), checked to be the caller's own. Returns
        the exit status when it ends."""
        from corral import manifest as manifests
        from corral.deploy._sequence import release_env

        state = self.d.apps.get(args.name)
        if state is None:
            raise NotFoundError(f"no app named {args.name!r} is deployed")
        await self.d.drivers.require(state.spec.manifest, doing=f"run in {args.name!r}")
        label = f"{int(time.time() * 1000) % 1_000_000_000}"
        job = f"{args.name}.run.{label}"
        resolved = manifests.ResolvedManifest.from_json(state.spec.manifest)
        config, number = release_env(state.release)
        env = manifests.app_environment(
            resolved, process="run", index=0,
            manifest_path=self.d.home / "apps" / args.name / "manifest.json", job=job,
            config=config, release=number)
        if args.term:
            env["TERM"] = args.term
        for key in args.env:
            check_name(key)  # PORT, HOME, CORRAL_* are corral's, as for config vars
        env.update(args.env)
        ispec = InstanceSpec(id=job, app=args.name, process="run", index=0, kind="job",
                             argv=list(args.command), env=env, cwd=state.spec.directory)
        self.d.events.publish(f"app.{args.name}.run.started",
                              {"job": job, "release": number, "tty": args.tty})
        outcome = await self.releaser.run(
            state.spec, ispec, output=None, timeout_s=args.timeout_s,
            secret_env=state.secrets, stdio=list(args.stdio), stdio_owner=caller_uid,
            tty=args.tty)
        result = {"app": args.name, "job": job, "release": number,
                  "exit_code": outcome.exit_code, "signal": outcome.signal,
                  "timed_out": outcome.timed_out, "seconds": outcome.seconds}
        self.d.events.publish(f"app.{args.name}.run.exited",
                              {k: v for k, v in result.items() if k != "app"})
        return result
