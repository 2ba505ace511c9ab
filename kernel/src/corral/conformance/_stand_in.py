"""A stand-in kernel for one driver process: the real ZAP handler and codec, a ROUTER we steer.

The stand-in starts the driver executable exactly as the supervisor does (own session, a
private runtime directory of mode 0700, the kernel's environment filter, a one-time
``CORRAL_DRIVER_TOKEN``), binds the ROUTER and PUB sockets behind :class:`corral.bus.ZapHandler`
and decodes every message with :func:`corral.protocol.decode`. Unlike ``BusServer`` it lets the
checks decide what to send and when: stop heartbeating, send garbage, say BYE.

Requests the driver makes are answered like an empty kernel would (no apps, no instances, an
empty ledger) so that a driver may call the kernel while it serves ``state.sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from corral.bus import ZapHandler
from corral.bus._zap import DOMAIN, run_zap
from corral.errors import CorralError, ErrorCode
from corral.protocol import (
    KERNEL_OPS,
    MAX_BODY,
    Body,
    Error,
    Event,
    Heartbeat,
    Hello,
    Reply,
    Request,
    Welcome,
    decode,
    encode,
)

ENV_KEPT = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "CI", "TZ")
"""The variables the kernel passes on to drivers (corral.kernel.Kernel._driver_env)."""

DRIVER_SENDS = frozenset({"HELLO", "REQUEST", "REPLY", "ERROR", "EVENT", "HEARTBEAT", "BYE"})
"""Commands a driver may send; WELCOME is the kernel's alone."""


@dataclass
class Received:
    """One message from the driver: decoded body, or the CorralError its frames raised."""

    at: float
    identity: bytes
    frames: list[bytes]
    user_id: str | None
    body: Body | None = None
    error: CorralError | None = None

    @property
    def command(self) -> str:
        """The command frame as text (also for undecodable messages)."""
        return self.frames[1].decode("ascii", "replace") if len(self.frames) > 1 else "?"


@dataclass
class StandIn:
    """The kernel side of a conformance run. ``await start()``, then drive it, then ``close()``."""

    command: list[str]
    heartbeat_ms: int = 300
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="corral-cdp-"))
        self.home = self.base / "home"
        self.runtime = self.base / "run"
        self.endpoint = f"ipc://{self.runtime / 'bus.sock'}"
        self.events = f"ipc://{self.runtime / 'events.sock'}"
        self.log_path = self.base / "driver.log"
        self.token = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.identity: bytes | None = None  # the welcomed connection
        self.beating = True  # whether we heartbeat the welcomed connection
        self.inbox: asyncio.Queue[Received] = asyncio.Queue()
        self.received: list[Received] = []  # everything, heartbeats included, in order
        self.heartbeats: list[Received] = []
        self.kernel_calls: list[str] = []  # ops the driver asked of us
        self._ids = itertools.count(1000)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ctx = zmq.asyncio.Context()

    @property
    def interval(self) -> float:
        """The heartbeat interval in seconds."""
        return self.heartbeat_ms / 1000

    async def start(self) -> None:
        """Create the private directories, bind behind ZAP, start serving."""
        for d in (self.home, self.runtime):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)
        admitted = {0, os.getuid()}
        self._zap = ZapHandler(self._ctx, lambda uid: uid in admitted)
        self._spawn(run_zap(self._zap))
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.zap_domain = DOMAIN
        self.router.linger = 0
        self.router.router_mandatory = True
        self.router.maxmsgsize = 4 * MAX_BODY
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.zap_domain = DOMAIN
        self.pub.linger = 0
        self.router.bind(self.endpoint)
        self.pub.bind(self.events)
        os.chmod(self.endpoint.removeprefix("ipc://"), 0o600)
        os.chmod(self.events.removeprefix("ipc://"), 0o600)
        self._spawn(self._receive())
        self._spawn(self._heartbeat())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- the driver process ------------------------------------------------------------------

    async def launch(self) -> None:
        """Start (or restart) the driver with a fresh token, as the supervisor does."""
        self.token = secrets.token_hex(16)
        self.identity = None
        self.beating = True
        env = {k: v for k, v in os.environ.items() if k in ENV_KEPT}
        env.update(
            CORRAL_BUS=self.endpoint,
            CORRAL_EVENTS=self.events,
            CORRAL_HOME=str(self.home),
            CORRAL_RUNTIME_DIR=str(self.runtime),
            CORRAL_DRIVER_TOKEN=self.token,
            CORRAL_DRIVER_NAME="conformance",
        )
        env.update(self.extra_env)
        with open(self.log_path, "ab") as out:
            out.write(f"---- start {self.command} ----\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True, close_fds=True,
            )

    def exit_status(self) -> int | None:
        """The driver's exit status, or None while it runs."""
        return None if self.proc is None else self.proc.returncode

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the driver to exit; its status or None."""
        if self.proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the driver process (only the one we started, by pid)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        """Stop the driver's session: SIGTERM, then SIGKILL after 2 s."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the driver's pid
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            if await self.wait_exit(wait) is not None:
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # leftovers of the driver's session

    def log_tail(self, lines: int = 30) -> str:
        """The end of the driver's stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- the wire ------------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            frames = await self.router.recv_multipart(copy=False)
            raw = [f.bytes for f in frames]
            user = frames[-1].get("User-Id") if len(frames) > 1 else None
            msg = Received(time.monotonic(), raw[0], raw[1:], str(user) if user else None)
            try:
                msg.body = decode(raw[1:])
            except CorralError as exc:
                msg.error = exc
            except Exception as exc:  # the codec must only raise CorralError: keep the proof
                msg.error = CorralError(f"codec raised {type(exc).__name__}: {exc}")
            self.received.append(msg)
            if isinstance(msg.body, Heartbeat):
                self.heartbeats.append(msg)
                continue
            if isinstance(msg.body, Request):
                self._spawn(self._serve(msg.identity, msg.body))
                continue
            if isinstance(msg.body, Event):
                with contextlib.suppress(zmq.ZMQError):
                    self.pub.send_multipart(
                        [msg.body.topic.encode(), *encode(msg.body)], flags=zmq.NOBLOCK
                    )
                continue
            self.inbox.put_nowait(msg)

    async def _serve(self, identity: bytes, req: Request) -> None:
        """Answer a driver's request as an empty kernel would."""
        self.kernel_calls.append(req.op)
        reply: Body
        op = KERNEL_OPS["driver"].get(req.op)
        if op is None:
            code = (ErrorCode.FORBIDDEN if any(req.op in t for t in KERNEL_OPS.values())
                    else ErrorCode.UNKNOWN_OPERATION)
            reply = Error(id=req.id, code=code, reason=f"operation {req.op!r} not for drivers")
        else:
            try:
                op.args.model_validate(req.args)
            except ValueError as exc:
                reply = Error(id=req.id, code=ErrorCode.INVALID, reason=f"{req.op}: {exc}")
            else:
                reply = _empty_kernel_answer(req)
        await self.send(reply, identity)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.beating and self.identity is not None:
                await self.send(Heartbeat(time=time.time()))

    async def send(self, body: Body, identity: bytes | None = None) -> bool:
        """Send ``body`` to ``identity`` (default: the welcomed connection); False if gone."""
        return await self.send_raw(encode(body), identity)

    async def send_raw(self, frames: list[bytes], identity: bytes | None = None) -> bool:
        """Send arbitrary frames (garbage included); False if the connection is gone."""
        target = identity if identity is not None else self.identity
        if target is None:
            return False
        try:
            await self.router.send_multipart([target, *frames])
        except zmq.ZMQError:
            return False
        return True

    async def next(self, timeout: float, where: Callable[[Received], bool] | None = None
                   ) -> Received | None:
        """The next non-heartbeat message (matching ``where``) within ``timeout`` s, or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = await asyncio.wait_for(self.inbox.get(), left)
            except TimeoutError:
                return None
            if where is None or where(msg):
                return msg

    async def welcome(self, msg: Received) -> None:
        """Welcome the connection ``msg`` came on, as the kernel does."""
        self.identity = msg.identity
        await self.send(
            Welcome(peer_id=secrets.token_hex(4), heartbeat_ms=self.heartbeat_ms,
                    config={}, home=str(self.home), runtime_dir=str(self.runtime)),
            msg.identity,
        )

    async def request(self, op: str, args: dict[str, Any], timeout: float = 5.0
                      ) -> Received | None:
        """Send a REQUEST on the welcomed connection; its REPLY or ERROR, or None."""
        rid = next(self._ids)
        body = Request(id=rid, op=op, args=args, deadline_ms=int(timeout * 1000))
        return await self.request_raw(encode(body), rid, timeout)

    async def request_raw(self, frames: list[bytes], rid: int, timeout: float = 5.0
                          ) -> Received | None:
        """Send prepared REQUEST frames with id ``rid``; the answer carrying ``rid``, or None."""
        await self.send_raw(frames)
        return await self.next(
            timeout, lambda m: isinstance(m.body, Reply | Error) and m.body.id == rid
        )

    def new_id(self) -> int:
        """A request id not used yet."""
        return next(self._ids)

    async def close(self) -> None:
        """Stop the driver, close the sockets, remove the temporary directory."""
        await self.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in ("router", "pub"):  # absent when start() failed before binding them
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        zap = getattr(self, "_zap", None)
        if zap is not None:
            zap.close()
        self._ctx.term()
        shutil.rmtree(self.base, ignore_errors=True)


def _empty_kernel_answer(req: Request) -> Body:
    """What a kernel with no apps, no instances and an empty ledger answers."""
    if req.op == "ledger.list":
        return Reply(id=req.id, result={"revision": 0, "records": []})
    if req.op in ("ledger.claim", "ledger.release"):
        return Reply(id=req.id, result={"revision": 1})
    if req.op == "event.publish":
        return Reply(id=req.id, result={})
    if req.op == "socket.list":  # keeps no sockets (socket.keep is refused below)
        return Reply(id=req.id, result={"sockets": []})
    if req.op == "socket.release":
        return Reply(id=req.id, result={"released": False})
    # app.get, instance.spawn/signal/stop: nothing exists in an empty kernel.
    return Error(id=req.id, code=ErrorCode.UNKNOWN_OPERATION,
                 reason=f"{req.op}: no such app or instance (conformance kernel is empty)")


def is_hello(msg: Received) -> bool:
    """Whether ``msg`` is a HELLO."""
    return isinstance(msg.body, Hello)
