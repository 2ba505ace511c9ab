"""Jobs: one-shot processes of an app (cron runs) started in its sandbox, watched to their
end, their exit status and output tail kept a while for ``instance.wait``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from corral.deploy._drivers import Drivers
from corral.deploy._instances import Events, Instances, Launcher
from corral.deploy._state import AppState, Job
from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.protocol import InstanceRecord, InstanceSpec

KEEP_STATUS_S = 300.0  # how long a finished job's status stays for late instance.wait callers


class Jobs:
    """Spawns, watches and reports jobs."""

    def __init__(self, instances: Instances, *, drivers: Drivers, events: Events,
                 launcher: Launcher) -> None:
        self.instances = instances
        self.drivers = drivers
        self.events = events
        self.launcher = launcher
        self.running: dict[str, Job] = {}

    async def spawn(self, state: AppState, *, process: str, command: str, label: str | None,
                    env: dict[str, str], owner: str) -> dict[str, Any]:
        """Start ``command`` as a job of the app (its sandbox, no port); its record. The job
        is named by the driver that asked for it (``owner``): ``<app>.<owner>.<job>.<run>``."""
        from corral import manifest as manifests  # loaded on first use: an idle kernel is small

        app = state.spec.name
        resolved = manifests.ResolvedManifest.from_json(state.spec.manifest)
        manifest_path = Path(self.instances.home / "apps" / app / "manifest.json")
        run = int(time.time() * 1000) % 1_000_000_000
        label = label or str(run)
        job_id = f"{app}.{owner}.{process}.{label}"
        release = state.release
        config = {str(k): str(v) for k, v in
                  ((release or {}).get("config") or {}).get("vars", {}).items()}
        job_env = manifests.app_environment(
            resolved, process=process, index=run, manifest_path=manifest_path, job=job_id,
            config=config, release=int(release["number"]) if release else None)
        job_env.update(env)
        ispec = InstanceSpec(id=job_id, app=app, process=process,
                             index=0, kind="job", argv=["/bin/sh", "-c", command], env=job_env,
                             cwd=state.spec.directory)
        plan = await self.instances.plan(state.spec, ispec, state.secrets)
        try:
            pid, start_time = await asyncio.to_thread(self.launcher.launch, plan)
        except BaseException:
            await self.drivers.broadcast("instance.stopped", {"app": app,
                                                              "instance_id": ispec.id},
                                         strict=False)
            raise
        rec = InstanceRecord(spec=plan.instance, pid=pid, start_time=start_time, state="ready",
                             address=plan.address or "127.0.0.1")
        output = plan.stdout if plan.stdout and Path(plan.stdout).is_file() else None
        job = Job(rec, output, asyncio.get_running_loop().create_future())
        self.running[ispec.id] = job
        job.watcher = asyncio.ensure_future(self._watch(job))
        return rec.model_dump(mode="json")

    async def _watch(self, job: Job) -> None:
        """Wait for a job's end, collect its status (we are its subreaper), release it."""
        rec = job.record
        await self.launcher.wait_exit(rec.pid, rec.start_time)
        code = self.launcher.reap(rec.pid)
        result: dict[str, Any] = {"instance": rec.spec.id, "exit_code": None, "signal": None}
        if code is None:  # adopted across a kernel restart: not our child
            result["note"] = "exit status unknown (the job was not reaped by this kernel)"
        elif code < 0:
            result["signal"] = -code
        else:
            result["exit_code"] = code
        # whatever the job left in its process group ends with it
        self.launcher.signal_instance(rec.pid, rec.start_time, signal.SIGKILL, group=True)
        # drivers release the job first (the log driver drains its capture)...
        await self.drivers.broadcast("instance.stopped", {"app": rec.spec.app,
                                                          "instance_id": rec.spec.id},
                                     strict=False)
        if job.output is None:  # ...so the tail read from the capturing driver is complete
            result["output_tail"] = await self.drivers.output_tail(rec.spec.app, rec.spec.id)
        else:
            try:
                with open(job.output, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 16384))
                    result["output_tail"] = f.read().decode("utf-8", "replace")
            except OSError:
                pass
        self.events.publish(f"app.{rec.spec.app}.job.exited", result)
        job.done.set_result(result)
        await asyncio.sleep(KEEP_STATUS_S)
        self.running.pop(rec.spec.id, None)

    async def wait(self, instance_id: str, timeout_s: float) -> dict[str, Any]:
        """``instance.wait``: the job's exit status, waiting up to ``timeout_s``."""
        job = self.running.get(instance_id)
        if job is None:
            raise NotFoundError(f"no job {instance_id!r} (finished more than 5 min ago?)")
        try:
            return await asyncio.wait_for(asyncio.shield(job.done), timeout_s)
        except TimeoutError:
            raise CorralError(f"job {instance_id!r} still running after {timeout_s:.0f}s",
                              code=ErrorCode.TIMEOUT) from None

    def records(self) -> list[dict[str, Any]]:
        """The jobs still running, as instance records (for state.sync)."""
        return [j.record.model_dump(mode="json") for j in self.running.values()
                if not j.done.done()]
