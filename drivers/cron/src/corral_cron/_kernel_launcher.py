"""Runs jobs through the kernel (``instance.spawn``): in the app's sandbox, as the app runs (R8)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Protocol

import psutil

from corral.protocol import InstanceRecord
from corral_cron._launcher import ExitStatus, JobProcess, LaunchRequest

_NO_STATUS = "the kernel could not report this run's exit status"


class KernelCalls(Protocol):
    """The part of corral.sdk.KernelLink this launcher uses."""

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]: ...


class _KernelProcess:
    """A job the kernel started; identity is (pid, start time), never the pid alone."""

    def __init__(self, record: InstanceRecord, kernel: KernelCalls) -> None:
        self.record = record
        self.kernel = kernel

    @property
    def pid(self) -> int:
        return self.record.pid

    def _alive(self) -> bool:
        try:
            proc = psutil.Process(self.record.pid)
            same = abs(float(proc.create_time()) - self.record.start_time) < 0.05
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def wait(self) -> ExitStatus:
        # pidfd becomes readable when the process exits: no polling, works for non-children.
        try:
            fd = os.pidfd_open(self.record.pid)
        except ProcessLookupError:
            return await self._status()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, exited)
        try:
            if self._alive():
                await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        self.signal(9)  # leftovers of the job's process group end with it
        return await self._status()

    async def _status(self) -> ExitStatus:
        """The exit status as the kernel (the job's reaper) collected it: ``instance.wait``."""
        try:
            res = await self.kernel.call(
                "instance.wait", {"instance_id": self.record.spec.id, "timeout_s": 10.0},
                timeout=15.0)
        except Exception as exc:  # the kernel restarted, or is gone: say so in the run record
            return ExitStatus(None, None, "", note=f"{_NO_STATUS}: {exc}")
        return ExitStatus(res.get("exit_code"), res.get("signal"),
                          str(res.get("output_tail", "")), note=res.get("note"))

    def signal(self, sig: int) -> None:
        if self._alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.record.pid, sig)


class KernelLauncher:
    """Asks corrald to spawn each run as a job of its app (same sandbox, user, env, cwd)."""

    def __init__(self, kernel: KernelCalls) -> None:
        self.kernel = kernel

    async def start(self, request: LaunchRequest) -> JobProcess:
        """``instance.spawn`` kind=job; the kernel builds the app's environment and plan."""
        extra = {k: v for k, v in request.env.items() if k.startswith("CORRAL_CRON_")}
        reply = await self.kernel.call("instance.spawn", {
            "app": request.app, "process": request.name, "kind": "job",
            "command": request.command, "env": extra, "label": str(request.run_id)})
        return _KernelProcess(InstanceRecord.model_validate(reply), self.kernel)
