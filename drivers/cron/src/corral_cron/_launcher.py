"""Starting a job's process: the JobLauncher contract and the local (standalone) launcher.

A launcher's responsibility ends at: start the command in its own process group, report how
it ended with an output tail, and deliver signals to the whole group. Scheduling, timeouts,
overlap and history are the scheduler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
from dataclasses import dataclass, field
from typing import Protocol

OUTPUT_TAIL_BYTES = 16 * 1024


@dataclass(frozen=True)
class LaunchRequest:
    """One run to start: ``/bin/sh -c command`` with this environment and directory."""

    job: str  # '<app>.<name>'
    app: str
    name: str
    run_id: int
    command: str
    env: dict[str, str]
    cwd: str
    output_limit: int = OUTPUT_TAIL_BYTES

    @property
    def argv(self) -> list[str]:
        """The argv that is executed."""
        return ["/bin/sh", "-c", self.command]


@dataclass(frozen=True)
class ExitStatus:
    """How a run's process ended: an exit code or the signal that killed it."""

    exit_code: int | None
    signal: int | None
    output_tail: str = ""
    note: str | None = None

    @property
    def succeeded(self) -> bool:
        """Exit code 0."""
        return self.exit_code == 0


class JobProcess(Protocol):
    """A started run."""

    @property
    def pid(self) -> int:
        """The pid of the run's process (leader of its process group)."""
        ...

    async def wait(self) -> ExitStatus:
        """Wait until the process has exited; return its status and output tail."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the run's whole process group (no-op once it is gone)."""
        ...


class JobLauncher(Protocol):
    """Starts runs. Implementations: LocalLauncher here, KernelLauncher through the kernel."""

    async def start(self, request: LaunchRequest) -> JobProcess:
        """Start the run's process in a new process group; raise on failure to start."""
        ...


@dataclass
class _LocalProcess:
    proc: asyncio.subprocess.Process
    limit: int
    tail: bytearray = field(default_factory=bytearray)
    reader: asyncio.Task[None] | None = None
    exited: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.tail += chunk
            if len(self.tail) > self.limit:
                del self.tail[: len(self.tail) - self.limit]

    async def wait(self) -> ExitStatus:
        returncode = await self.proc.wait()
        # The job ends with its command: whatever it left running in its process group is
        # killed (systemd's KillMode=control-group), which also closes the output pipe.
        self._kill_group(signals.SIGKILL)
        self.exited = True
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reader), 1.0)
        text = self.tail.decode("utf-8", errors="replace")
        if returncode < 0:
            return ExitStatus(None, -returncode, text)
        return ExitStatus(returncode, None, text)

    def signal(self, sig: int) -> None:
        if not self.exited:
            self._kill_group(sig)

    def _kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class LocalLauncher:
    """Runs jobs on this host as the current user: /bin/sh -c in a new session, no sandbox.

    Used standalone and in tests; under corrald the KernelLauncher starts runs in the app's
    sandbox instead. This is NOT a security boundary.
    """

    async def start(self, request: LaunchRequest) -> JobProcess:
        """Start ``request`` with setsid (its own process group), stdout+stderr captured."""
        proc = await asyncio.create_subprocess_exec(
            *request.argv,
            cwd=request.cwd,
            env=request.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        job = _LocalProcess(proc, request.output_limit)
        job.reader = asyncio.create_task(job._read())
        return job
