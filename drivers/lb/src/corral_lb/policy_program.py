"""User-programmable policies: an external program speaking CLBP/1 over ZeroMQ.

CLBP/1 (corral lb policy protocol), normative summary (docs/drivers/lb.md has the full text):
the lb binds a ROUTER socket and starts the program with ``CORRAL_LB_POLICY_ENDPOINT`` and
``CORRAL_LB_SERVICE`` in its environment; the program connects a DEALER socket. Every message
is three frames: ``b"CLBP1"``, a command, a UTF-8 JSON object.

    program -> lb   HELLO    {"mode": "pick" | "weights", "name": str}
    lb -> program   WELCOME  {"service": str, "backends": [BACKEND...]}
    lb -> program   BACKENDS {"backends": [BACKEND...]}         on every membership change
    lb -> program   PICK     {"seq": int, "client": "ip:port", "host": str}   mode "pick"
    program -> lb   PICKED   {"seq": int, "backend": id | null}
    program -> lb   WEIGHTS  {"weights": {id: int >= 0}}         mode "weights", at any time
    BACKEND = {"id", "address", "weight", "state", "active", "outstanding", "requests"}

A PICK not answered within the deadline (default 5 ms), or answered with an unknown or
ineligible backend, falls back to the service's built-in policy. WEIGHTS apply to both data
planes (proxy policies and the nft slot map). A program that exits is restarted after 1 s;
meanwhile the built-in policy decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from corral_lb.backend import Backend
from corral_lb.service import Service

log = structlog.get_logger("corral_lb")

SIGNATURE = b"CLBP1"
RESTART_DELAY = 1.0


class PolicyProgram:
    """Runs one policy program for one service and answers the service's picks through it."""

    def __init__(
        self, service: Service, argv: Sequence[str], *, endpoint: str, deadline: float = 0.005,
        cwd: str | None = None,
    ) -> None:
        self.service = service
        self.argv = list(argv)
        self.endpoint = endpoint
        self.deadline = deadline
        self.cwd = cwd
        self.mode: str | None = None
        self.picks = self.timeouts = self.answered = 0
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._peer: bytes | None = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[str | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._hello = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        """Bind, start the program and serve it; return without waiting for its HELLO."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(FileNotFoundError):
                Path(self.endpoint[6:]).unlink()
        sock.bind(self.endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self.service.on_change.append(self._membership_changed)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._supervise())]

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait for the program's HELLO; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._hello.wait()
                return True
        except TimeoutError:
            return False

    async def _supervise(self) -> None:
        while not self._closing:
            env = {**os.environ, "CORRAL_LB_POLICY_ENDPOINT": self.endpoint,
                   "CORRAL_LB_SERVICE": self.service.name}
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv, env=env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL
                )
            except OSError as e:
                log.error("policy program cannot start", service=self.service.name,
                          argv=self.argv, error=str(e))
            else:
                rc = await self._proc.wait()
                if self._closing:
                    return
                log.warning("policy program exited", service=self.service.name, rc=rc)
            self._detach_peer()
            await asyncio.sleep(RESTART_DELAY)

    def _detach_peer(self) -> None:
        self._peer = None
        self.mode = None
        self._hello.clear()
        if self.service.picker is self:
            self.service.picker = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()

    async def _send(self, command: bytes, body: dict[str, Any]) -> None:
        if self._sock is None or self._peer is None:
            return
        await self._sock.send_multipart(
            [self._peer, SIGNATURE, command, json.dumps(body).encode()]
        )

    def _backends(self) -> list[dict[str, Any]]:
        return [
            {"id": b.id, "address": f"{b.host}:{b.port}", "weight": b.weight,
             "state": b.state.value, "active": b.active, "outstanding": b.outstanding,
             "requests": b.requests}
            for b in self.service.backends.values()
        ]

    def _membership_changed(self, service: Service) -> None:
        if self._peer is not None:
            asyncio.get_running_loop().create_task(
                self._send(b"BACKENDS", {"backends": self._backends()})
            )

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 4 or frames[1] != SIGNATURE:
                log.warning("policy program sent a malformed message", frames=len(frames))
                continue
            peer, _, command, raw = frames
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("body is not an object")
            except ValueError as e:
                log.warning("policy program sent bad JSON", command=command, error=str(e))
                continue
            if command == b"HELLO":
                mode = body.get("mode")
                if mode not in ("pick", "weights"):
                    log.warning("policy program HELLO with bad mode", mode=mode)
                    continue
                self._peer, self.mode = peer, mode
                await self._send(b"WELCOME",
                                 {"service": self.service.name, "backends": self._backends()})
                if mode == "pick":
                    self.service.picker = self
                self._hello.set()
            elif peer != self._peer:
                continue
            elif command == b"PICKED":
                fut = self._pending.pop(int(body.get("seq", -1)), None)
                if fut is not None and not fut.done():
                    backend = body.get("backend")
                    fut.set_result(backend if isinstance(backend, str) else None)
            elif command == b"WEIGHTS":
                weights = body.get("weights")
                if isinstance(weights, dict):
                    self.service.set_weights({str(k): int(v) for k, v in weights.items()})

    async def pick(self, service: Service, client: str, host: str) -> Backend | None:
        """Ask the program; None after the deadline or for an unknown/ineligible answer."""
        if self._peer is None or self.mode != "pick":
            return None
        self.picks += 1
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        t0 = time.monotonic()
        try:
            await self._send(b"PICK", {"seq": seq, "client": client, "host": host})
            async with asyncio.timeout(max(0.0, self.deadline - (time.monotonic() - t0))):
                chosen = await fut
        except TimeoutError:
            self.timeouts += 1
            return None
        finally:
            self._pending.pop(seq, None)
        b = service.backends.get(chosen) if chosen else None
        if b is None or not b.eligible:
            return None
        self.answered += 1
        return b

    async def close(self) -> None:
        """Stop the program and close the socket."""
        self._closing = True
        if self._membership_changed in self.service.on_change:
            self.service.on_change.remove(self._membership_changed)
        if self.service.picker is self:
            self.service.picker = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                async with asyncio.timeout(3):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
