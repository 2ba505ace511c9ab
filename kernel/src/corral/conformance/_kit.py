"""Run the conformance checks against one driver command and collect their outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from corral.conformance._checks import CHECKS, CheckFailed, CheckSpec, Run
from corral.conformance._stand_in import StandIn

Status = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Outcome:
    """The result of one check."""

    check: str
    status: Status
    reason: str

    def line(self) -> str:
        """The one line the CLI prints for this check."""
        return f"{self.status} {self.check}: {self.reason}"


@dataclass
class KitResult:
    """All outcomes of a run, plus what helps explain a failure."""

    outcomes: list[Outcome]
    driver_log: str = ""
    kernel_calls: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(o.status == "PASS" for o in self.outcomes)

    def status_of(self, check: str) -> Status:
        """The status of the named check."""
        return next(o.status for o in self.outcomes if o.check == check)

    def report(self) -> str:
        """One line per check, then the driver's output if anything failed."""
        lines = [o.line() for o in self.outcomes]
        if not self.passed and self.driver_log:
            lines += ["---- driver output (last lines) ----", self.driver_log]
        return "\n".join(lines)


async def run_checks(
    command: Sequence[str],
    *,
    capability: str | None = None,
    heartbeat_ms: int = 300,
    extra_env: dict[str, str] | None = None,
    checks: Sequence[CheckSpec] = CHECKS,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> KitResult:
    """Start ``command`` as the kernel would and run ``checks`` against it, in order."""
    kernel = StandIn(list(command), heartbeat_ms=heartbeat_ms, extra_env=dict(extra_env or {}))
    try:
        await kernel.start()
    except BaseException:
        await kernel.close()  # the temporary directory goes even when binding failed
        raise
    run = Run(kernel, capability=capability)
    outcomes: list[Outcome] = []
    stopped_by: str | None = None
    try:
        for spec in checks:
            if stopped_by is not None:
                outcome = Outcome(spec.name, "SKIP", f"not run: {stopped_by} failed")
            elif spec.needs_driver and kernel.exit_status() is not None:
                outcome = Outcome(spec.name, "FAIL", "driver is not running "
                                  f"(exited with status {kernel.exit_status()})")
            else:
                try:
                    outcome = Outcome(spec.name, "PASS", await spec.run(run))
                except CheckFailed as exc:
                    outcome = Outcome(spec.name, "FAIL", exc.reason)
                    if spec.fatal:
                        stopped_by = spec.name
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    finally:
        log = kernel.log_tail()
        calls = list(kernel.kernel_calls)
        await kernel.close()
    return KitResult(outcomes, log, calls)


def run_kit(command: Sequence[str], **kw: object) -> KitResult:
    """Synchronous :func:`run_checks` (for pytest and the CLI)."""
    return asyncio.run(run_checks(command, **kw))  # type: ignore[arg-type]
