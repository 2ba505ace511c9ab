"""The deploy sequence's view of the drivers: fan-out, and what a launch needs of them.

``Drivers`` is the narrow interface the sequence, the instances and the jobs depend on;
``DriverSet`` implements it over the supervisor (which drivers are enabled, connected, and
what they declared) and the bus (calls). Tests use a fake with the same methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import structlog

from corral.bus import BusServer
from corral.errors import CorralError, DriverUnavailableError, ErrorCode, LaunchError
from corral.host import HostConfig
from corral.protocol import ManifestCheck, ManifestChecked
from corral.sdk.sections import merge_checked
from corral.supervisor import DriverSlot, Supervisor

log = structlog.get_logger("corral.deploy")


class DriverCallError(CorralError):
    """A strict fan-out in which some driver failed; ``succeeded`` names the drivers that did
    the work anyway (an undo must reach exactly those)."""

    def __init__(self, reason: str, *, code: ErrorCode, succeeded: list[str]) -> None:
        super().__init__(reason, code=code, retry=False)
        self.succeeded = succeeded


class Drivers(Protocol):
    """What the deploy sequence asks of the drivers."""

    async def gather(self, op: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Call ``op`` on every connected driver serving it; their replies by driver name.
        The first failure is raised (``CorralError`` naming the driver)."""
        ...

    async def broadcast(self, op: str, args: dict[str, Any], *, only: list[str] | None = None,
                        strict: bool = True) -> list[str]:
        """Call ``op`` on every connected driver serving it (or those in ``only``); the names
        that succeeded. ``strict``: a failure is raised (``DriverCallError``, naming those
        that succeeded), else logged."""
        ...

    async def owners(self, sections: Collection[str]) -> dict[str, str]:
        """Section name -> the enabled driver that owns it (declared in its description or
        HELLO); waits (bounded) for drivers still starting when one of ``sections`` has no
        owner yet."""
        ...

    async def check_manifest(self, request: ManifestCheck) -> ManifestChecked:
        """Ask each section's owner (``manifest.check``) and merge the answers."""
        ...

    async def require(self, manifest: dict[str, Any] | None, *, doing: str) -> None:
        """Fail closed: wait (bounded) until every driver a launch of ``manifest`` needs is
        connected, else raise ``DriverUnavailableError``; refuse on a host that would run
        apps unconfined without saying so."""
        ...

    def missing(self, replied: Collection[str]) -> DriverUnavailableError | None:
        """The error for a driver that every launch needs but is not among ``replied``."""
        ...

    def confined(self) -> bool:
        """Whether an enabled driver confines apps."""
        ...

    def has_feature(self, feature: str) -> bool:
        """Whether a connected driver declared ``feature`` (corral.protocol.FEATURES)."""
        ...

    async def ask_each(self, op: str, make_args: Callable[[float], dict[str, Any]], *,
                       within: float, abort: Callable[[], str | None], what: str,
                       judge: Callable[[str, dict[str, Any]], None]) -> None:
        """Ask ``op`` of every enabled driver serving it, all at once, waiting for those
        (re)connecting, within ``within`` seconds (``make_args(time left)``); each reply goes
        to ``judge(driver, reply)``, which raises to refuse. The first refusal, a driver
        silent or failing by then, or ``abort()`` giving a reason ends it (``LaunchError``)."""
        ...

    async def output_tail(self, app: str, instance: str) -> str:
        """The last lines an instance wrote, from the driver that captures output ('' if
        none does or it cannot say)."""
        ...


class DriverSet:
    """``Drivers`` over the supervisor's slots and the kernel's bus."""

    def __init__(self, supervisor: Supervisor, bus: BusServer, config: HostConfig) -> None:
        self.supervisor = supervisor
        self.bus = bus
        self.config = config

    async def _call_all(self, slots: list[DriverSlot], op: str, args: dict[str, Any]
                        ) -> list[tuple[DriverSlot, Any]]:
        targets = [s for s in slots if s.peer is not None]
        results = await asyncio.gather(
            *(self.bus.call(s.peer, op, args) for s in targets if s.peer is not None),
            return_exceptions=True)
        return list(zip(targets, results, strict=True))

    async def gather(self, op: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for slot, res in await self._call_all(self.supervisor.serving(op), op, args):
            if isinstance(res, BaseException):
                reason = res.reason if isinstance(res, CorralError) else repr(res)
                raise CorralError(f"driver {slot.name!r} failed {op}: {reason}",
                                  code=getattr(res, "code", ErrorCode.INTERNAL), retry=False)
            out[slot.name] = res
        return out

    async def broadcast(self, op: str, args: dict[str, Any], *, only: list[str] | None = None,
                        strict: bool = True) -> list[str]:
        slots = [s for s in self.supervisor.serving(op) if only is None or s.name in only]
        ok: list[str] = []
        failed: list[str] = []
        for slot, res in await self._call_all(slots, op, args):
            if isinstance(res, BaseException):
                reason = res.reason if isinstance(res, CorralError) else repr(res)
                failed.append(f"driver {slot.name!r} failed {op}: {reason}")
                log.warning("driver call failed", driver=slot.name, op=op, error=reason)
            else:
                ok.append(slot.name)
        if strict and failed:
            raise DriverCallError("; ".join(failed), code=ErrorCode.INTERNAL, succeeded=ok)
        return ok

    def _owners(self) -> dict[str, str]:
        return {section: slot.name for slot in self.supervisor.slots.values()
                if slot.state != "disabled" for section in sorted(slot.sections)}

    async def owners(self, sections: Collection[str]) -> dict[str, str]:
        owned = self._owners()
        if set(sections) - set(owned):  # a driver still starting may declare it in HELLO
            await self.supervisor.wait_settled(self.config.driver_wait_s)
            owned = self._owners()
        return owned

    async def check_manifest(self, request: ManifestCheck) -> ManifestChecked:
        owned = self._owners()
        by_driver: dict[str, dict[str, Any]] = {}
        for section, raw in request.sections.items():
            by_driver.setdefault(owned[section], {})[section] = raw
        await self.supervisor.require(
            [self.supervisor.slots[name] for name in by_driver], self.config.driver_wait_s,
            doing=f"check of {request.app!r}")
        out = ManifestChecked()
        for name, sections in sorted(by_driver.items()):
            slot = self.supervisor.slots[name]
            assert slot.peer is not None
            ask = request.model_copy(update={"sections": sections})
            try:
                res = await self.bus.call(slot.peer, "manifest.check",
                                          ask.model_dump(mode="json"), timeout=30.0)
                one = ManifestChecked.model_validate(res)
            except CorralError as exc:
                raise CorralError(f"driver {name!r} failed manifest.check: {exc.reason}",
                                  code=exc.code, retry=exc.retry) from None
            except ValueError as exc:  # pydantic's ValidationError
                raise CorralError(f"driver {name!r} answered manifest.check with an invalid "
                                  f"result: {exc}", code=ErrorCode.INTERNAL) from None
            unasked = sorted(set(one.sections) - set(sections))
            if unasked:
                raise CorralError(f"driver {name!r} answered manifest.check for sections it "
                                  f"was not asked: {unasked}", code=ErrorCode.INTERNAL)
            merge_checked(out, one)
        return out

    async def require(self, manifest: dict[str, Any] | None, *, doing: str) -> None:
        sup = self.supervisor
        if not sup.confined() and not self.config.unconfined:
            raise CorralError(
                f"{doing} refused: no sandbox driver (fs) is enabled on this host, so the app "
                "would run unconfined; enable it, or set `unconfined = true` in the host "
                "config to run apps without a sandbox on purpose", code=ErrorCode.INVALID,
                retry=False)
        sections = [k for k, v in manifest.items() if v] if manifest else []
        await sup.require(sup.needed(sections), self.config.driver_wait_s, doing=doing)

    def missing(self, replied: Collection[str]) -> DriverUnavailableError | None:
        for slot in self.supervisor.needed():
            if slot.name not in replied:
                return DriverUnavailableError(
                    f"driver {slot.name!r} ({slot.capability}) is {slot.state}"
                    + (f": {slot.reason}" if slot.reason else ""),
                    driver=slot.name, state=slot.state, driver_reason=slot.reason)
        return None

    def confined(self) -> bool:
        return self.supervisor.confined()

    def has_feature(self, feature: str) -> bool:
        return any(s.peer is not None and feature in s.features
                   for s in self.supervisor.slots.values())

    async def ask_each(self, op: str, make_args: Callable[[float], dict[str, Any]], *,
                       within: float, abort: Callable[[], str | None], what: str,
                       judge: Callable[[str, dict[str, Any]], None]) -> None:
        deadline = time.monotonic() + max(within, 1.0)
        slots = [s for s in self.supervisor.slots.values()
                 if s.state != "disabled" and op in s.ops]

        async def ask(slot: DriverSlot) -> None:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchError(f"{what} did not join within {within:.0f}s: driver "
                                      f"{slot.name!r} is {slot.state}, it never answered {op}",
                                      step="health")
                stop = abort()
                if stop:
                    raise LaunchError(f"{what} {stop}", step="health")
                if slot.peer is None:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    reply = await self.bus.call(
                        slot.peer, op, make_args(round(left, 3)), timeout=left + 5.0)
                except CorralError as exc:
                    if exc.code == ErrorCode.UNAVAILABLE:  # lost meanwhile: ask it again
                        log.warning("driver lost during a rollout, waiting for it",
                                    driver=slot.name, op=op)
                        await asyncio.sleep(0.05)
                        continue
                    raise LaunchError(f"{what}: driver {slot.name!r} failed {op}: "
                                      f"{exc.reason}", step="health") from None
                judge(slot.name, reply)
                return

        await all_or_first_failure([ask(slot) for slot in slots])

    async def output_tail(self, app: str, instance: str) -> str:
        slot = next((s for s in self.supervisor.slots.values()
                     if s.peer is not None and "output" in s.features), None)
        if slot is None or slot.peer is None:
            return ""
        try:
            res = await self.bus.call(slot.peer, f"query.{slot.capability}.read", {
                "app": app, "instance": instance, "limit": 400, "json": False}, timeout=5.0)
        except CorralError:
            return ""
        return "\n".join(str(ln).split(" ", 3)[-1] for ln in res.get("lines", []))[-16384:]


async def all_or_first_failure(coros: Sequence[Any]) -> None:
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


