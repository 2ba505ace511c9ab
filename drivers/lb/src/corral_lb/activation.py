"""On-demand (serverless) activation: no instance until the first connection, none when idle.

The lb holds the first connection, asks an ``Activator`` to start an instance, forwards once
it is reachable and stops it after ``idle`` seconds without client connections. Apps that
speak systemd socket activation get the listening socket itself (``LISTEN_FDS=1``, fd 3): the
kernel queues connections in its backlog, so the lb can forward at once, before the app
even reached ``accept``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from corral_lb.service import Service

log = structlog.get_logger("corral_lb")

SD_LISTEN_FDS_START = 3


@dataclass
class StartedInstance:
    """An instance an activator started: its id and where it listens."""

    id: str
    host: str
    port: int
    handle: object = field(default=None, repr=False)  # the activator's own record


class Activator(Protocol):
    """Starts and stops instances of one app for the lb (the kernel, or a local starter)."""

    async def start(self, listen: socket.socket | None) -> StartedInstance:
        """Start one instance; with ``listen``, hand it over as LISTEN_FDS=1 (fd 3).

        Returns as soon as the instance is started, not when it is ready: the lb probes it.
        """
        ...

    async def stop(self, instance: StartedInstance) -> None:
        """Stop an instance this activator started (after the lb drained it)."""
        ...


class ProcessActivator:
    """Starts an app as a plain child process (``corral run``, tests, benchmarks).

    ``argv`` may contain ``{port}``; the instance gets ``PORT`` and, with a listening socket,
    ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` the way systemd sets them.
    """

    def __init__(
        self, argv: Sequence[str], *, host: str = "127.0.0.1", port: int = 0,
        env: dict[str, str] | None = None, name: str = "app",
    ) -> None:
        self.argv = list(argv)
        self.host, self.port = host, port
        self.env = dict(env or {})
        self.name = name
        self._count = 0

    async def start(self, listen: socket.socket | None) -> StartedInstance:
        """Spawn the process; pick a free port first when none is fixed and no socket is given."""
        self._count += 1
        if listen is not None:
            host, port = listen.getsockname()[:2]
        else:
            host, port = self.host, self.port or _free_port(self.host)
        env = {**os.environ, **self.env, "PORT": str(port)}
        argv = [a.replace("{port}", str(port)) for a in self.argv]
        if listen is None:
            proc = subprocess.Popen(argv, env=env, start_new_session=True)
        else:
            fd = listen.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="http")

            def hand_over() -> None:
                # runs in the child between fork and exec: the pid is only known here
                os.dup2(fd, SD_LISTEN_FDS_START)
                os.environ.clear()
                os.environ.update(env)
                os.environ["LISTEN_PID"] = str(os.getpid())

            proc = subprocess.Popen(
                argv, env=None, start_new_session=True, preexec_fn=hand_over,
                pass_fds=(SD_LISTEN_FDS_START,),
            )
        return StartedInstance(f"{self.name}.{self._count}", host, port, proc)

    async def stop(self, instance: StartedInstance) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        proc = instance.handle
        assert isinstance(proc, subprocess.Popen)
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class OnDemand:
    """Starts one instance at the first connection and stops it after ``idle`` seconds idle."""

    def __init__(
        self, service: Service, activator: Activator, *, idle: float,
        socket_activation: bool = False, listen_host: str = "127.0.0.1",
    ) -> None:
        self.service = service
        self.activator = activator
        self.idle = idle
        self.socket_activation = socket_activation
        self.listen_host = listen_host
        self.instance: StartedInstance | None = None
        self.starts = 0
        self.last_start_seconds: float | None = None
        self._starting: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        service.activation = self

    async def activate(self) -> None:
        """Start the instance unless it is running or starting (single flight)."""
        if self.instance is not None:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        t0 = time.monotonic()
        sock = None
        if self.socket_activation:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, 0))
            sock.listen(1024)
            sock.set_inheritable(True)
            self._socket = sock
        try:
            inst = await self.activator.start(sock)
        except BaseException:
            if sock is not None:
                sock.close()
                self._socket = None
            raise
        self.instance = inst
        self.starts += 1
        # a socket-activated instance is reachable at once: the kernel queues connections
        self.service.add(inst.id, inst.host, inst.port, healthy=sock is not None)
        log.info("on-demand instance started", service=self.service.name, instance=inst.id)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._idle_watch())
        self.last_start_seconds = time.monotonic() - t0

    async def _idle_watch(self) -> None:
        tick = max(0.01, min(self.idle / 4, 1.0))
        while self.instance is not None:
            await asyncio.sleep(tick)
            s = self.service
            if s.connections == 0 and time.monotonic() - s.last_activity >= self.idle:
                await self.stop()

    async def stop(self) -> None:
        """Drain and stop the running instance (idle, or the service goes away)."""
        inst, self.instance = self.instance, None
        if inst is None:
            return
        await self.service.drain(inst.id)
        try:
            await self.activator.stop(inst)
        finally:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        log.info("on-demand instance stopped", service=self.service.name, instance=inst.id)

    def forget(self, instance_id: str) -> bool:
        """The kernel stopped ``instance_id`` itself (a redeploy retired it, `corral down`):
        drop it without stopping it again, so the next connection starts a fresh one."""
        if self.instance is None or self.instance.id != instance_id:
            return False
        self.instance = None
        if self._socket is not None:  # the next instance gets a fresh socket
            self._socket.close()
            self._socket = None
        log.info("on-demand instance stopped by the kernel", service=self.service.name,
                 instance=instance_id)
        return True

    async def close(self) -> None:
        """Stop watching and stop the instance."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        await self.stop()
