"""The log driver: CDP/1 operations mapped onto :class:`corral_log.service.LogService`."""

from __future__ import annotations

import asyncio
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.protocol import (
    AppAttach,
    AppDetach,
    InstancePrepare,
    InstanceStarted,
    InstanceStopped,
    PlanFragment,
    StateSync,
    Welcome,
)
from corral.sdk import Driver, op
from corral_log import DRIVER
from corral_log.service import LogService


def _need_app(args: dict[str, Any]) -> str:
    app = args.get("app")
    if not isinstance(app, str) or not app:
        raise CorralError("query needs 'app' (an app name)", code=ErrorCode.INVALID)
    return app


class LogDriver(Driver):
    """Captures instances' output, feeds sinks, groups tracebacks, samples resources."""

    name = "log"
    capability = "log"
    description = DRIVER  # its [section]s, checked by manifest.check
    features = frozenset({"output"})
    version = "0.1.0"

    def __init__(self) -> None:
        super().__init__()
        self._service: LogService | None = None
        self._creating = asyncio.Lock()
        self._early: asyncio.Task[LogService] | None = None

    async def service(self) -> LogService:
        """The service, created with the kernel's config on first use."""
        async with self._creating:
            if self._service is None:
                svc = LogService(
                    self.home,
                    runtime=self.runtime_dir / "log",
                    config=self.config,
                    publish=self.publish,
                    call=self.kernel.call,
                )
                await svc.start()
                self._service = svc
        return self._service

    def welcomed(self, welcome: Welcome) -> None:
        """Take the kernel's config, then start the service at once: after a restart it
        resumes draining the instances' FIFOs without waiting for any request."""
        super().welcomed(welcome)
        if self._service is None and self._early is None:
            self._early = asyncio.ensure_future(self.service())

    async def stop(self) -> None:
        """Orderly shutdown: FIFOs and keepers stay so the apps keep running."""
        if self._service is not None:
            await self._service.close()

    @op("app.attach")
    async def attach(self, args: AppAttach) -> dict[str, Any]:
        """Build the app's sinks from ``[logs] sinks``."""
        svc = await self.service()
        try:
            return svc.attach(args.app.name, args.app.manifest, args.app.directory)
        except ValueError as exc:
            raise CorralError(
                f"app {args.app.name!r}: logs.sinks: {exc}", code=ErrorCode.INVALID
            ) from None

    @op("instance.prepare")
    async def prepare(self, args: InstancePrepare) -> PlanFragment:
        """Create the instance's FIFOs; the launcher opens them as stdout and stderr."""
        svc = await self.service()
        if args.app.name not in svc.apps:
            svc.attach(args.app.name, args.app.manifest, args.app.directory)
        out, err = svc.prepare(args.app.name, args.instance.id)
        return PlanFragment(stdout=out, stderr=err)

    @op("instance.started")
    async def started(self, args: InstanceStarted) -> dict[str, Any]:
        """Start sampling the instance's resources."""
        rec = args.instance
        return (await self.service()).started(args.app.name, rec.spec.id, rec.pid, rec.start_time)

    @op("instance.stopped")
    async def stopped(self, args: InstanceStopped) -> dict[str, Any]:
        """Drain and release the instance's capture."""
        return (await self.service()).stopped(args.app, args.instance_id)

    @op("app.detach")
    async def detach(self, args: AppDetach) -> dict[str, Any]:
        """Stop the app's sinks (its log files stay)."""
        return (await self.service()).detach(args.app)

    @op("state.sync")
    async def sync(self, args: StateSync) -> dict[str, Any]:
        """Re-adopt live instances, drain what piled up while we were away, collect the rest."""
        svc = await self.service()
        return svc.sync(
            [(a.name, a.manifest, a.directory) for a in args.apps],
            [
                (r.spec.app, r.spec.id, r.pid, r.start_time)
                for r in args.instances
                if r.state != "exited"
            ],
            frozenset(args.launching),
        )

    @op("query.log.read")
    async def read(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{app, since?, grep?, instance?, limit?, json?, cursor?}`` -> records (oldest
        first), each reply under CDP/1's body limit; a paged read (``cursor``) says ``next``
        while more follow (``corral_log.reading``)."""
        _need_app(args)
        svc = await self.service()
        # a page scans files: off the event loop, so capture never waits for a reader
        return await asyncio.to_thread(svc.read, args)

    @op("query.log.errors")
    async def errors(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{app, limit?}`` -> error groups (fingerprint, type, count, first/last seen, sample)."""
        _need_app(args)
        return (await self.service()).error_groups(args)

    @op("query.log.top")
    async def top(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{app?}`` -> per-instance CPU, RSS, open files, threads, connections."""
        svc = await self.service()
        if any(u.sampled_at == 0.0 for _, u in svc.sampler.instances.values()):
            # tracked but not sampled yet (sampling runs every few seconds): sample now, so a
            # fresh instance does not show as 0 bytes
            await asyncio.to_thread(svc.sampler.sample)
        return svc.top(args)

    @op("query.log.stats")
    async def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{}`` -> records, bytes, and per sink: up, spooled bytes, dropped lines."""
        return (await self.service()).stats()
