"""The peer side of CDP/1: a DEALER connection used by drivers (through the SDK) and clients.

One ``Connection`` sends HELLO, waits for WELCOME, then runs a receive loop that matches
REPLY/ERROR to pending requests, serves incoming REQUESTs from an explicit handler table,
and exchanges HEARTBEATs. When the kernel stays silent for three heartbeat intervals the
connection is lost: ``run()`` returns ``False`` and the owner decides (drivers reconnect,
clients fail).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
import zmq
import zmq.asyncio

from corral.bus._socket import LoopSocket
from corral.errors import CorralError, ErrorCode, UnavailableError
from corral.protocol import (
    Body,
    Bye,
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

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

log = structlog.get_logger("corral.bus.peer")


class Connection:
    """A CDP/1 peer connected to the kernel's ROUTER."""

    def __init__(
        self,
        endpoint: str,
        hello: Hello,
        *,
        handlers: Mapping[str, Handler] | None = None,
        ctx: zmq.Context[Any] | None = None,
        on_welcome: Callable[[Welcome], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.hello = hello
        self.handlers: Mapping[str, Handler] = handlers or {}
        self._on_welcome = on_welcome
        self._ctx = ctx or zmq.Context.instance()
        self._io: LoopSocket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.welcome: Welcome | None = None
        self._greeting: asyncio.Future[Body] | None = None
        self._ended: asyncio.Future[bool] | None = None
        self._last_heard = 0.0
        self._closed = False

    @property
    def heartbeat_s(self) -> float:
        """The heartbeat interval the kernel asked for."""
        return (self.welcome.heartbeat_ms if self.welcome else 1000) / 1000

    async def connect(self, timeout: float = 5.0) -> Welcome:
        """Open the socket, send HELLO and wait for WELCOME; raise the kernel's ERROR."""
        loop = asyncio.get_running_loop()
        sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a kernel that is not there
        sock.connect(self.endpoint)
        self._greeting = loop.create_future()
        self._ended = loop.create_future()
        self._io = LoopSocket(sock, self._on_message)
        self._io.send(encode(self.hello))
        try:
            body = await asyncio.wait_for(asyncio.shield(self._greeting), timeout)
        except TimeoutError:
            self.close()
            raise UnavailableError(f"no answer from the kernel at {self.endpoint}") from None
        if isinstance(body, Error):
            self.close()
            raise CorralError(body.reason, code=_code(body.code), retry=body.retry)
        assert isinstance(body, Welcome)
        self.welcome = body
        self._last_heard = time.monotonic()
        return body

    async def call(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a REQUEST and wait for its REPLY; raise CorralError on ERROR or timeout."""
        if self._io is None or self._closed:
            raise UnavailableError("not connected")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            req = Request(id=rid, op=op, args=dict(args or {}), deadline_ms=int(timeout * 1000))
            self._io.send(encode(req))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CorralError(f"{op}: no reply in {timeout:.1f}s", code=ErrorCode.TIMEOUT) from None
        finally:
            self._pending.pop(rid, None)

    async def send(self, body: Body) -> None:
        """Send one message (EVENT, HEARTBEAT, BYE...); never blocks."""
        if self._io is not None and not self._closed:
            try:
                self._io.send(encode(body))
            except zmq.ZMQError as exc:
                log.warning("send failed", command=type(body).__name__, error=str(exc))

    async def run(self) -> bool:
        """Serve until BYE from the kernel or ``close()`` (True) or the kernel is lost (False)."""
        assert self._ended is not None
        hb = asyncio.ensure_future(self._heartbeat())
        try:
            while not self._ended.done():
                await asyncio.wait({self._ended}, timeout=self.heartbeat_s)
                if not self._ended.done() and (
                    time.monotonic() - self._last_heard > 3 * self.heartbeat_s
                ):
                    log.warning("kernel lost", endpoint=self.endpoint)
                    self._fail_pending("kernel lost")
                    return False
            return self._ended.result()
        finally:
            hb.cancel()

    def _end(self, orderly: bool) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(orderly)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        self._last_heard = time.monotonic()
        try:
            body = decode([f.bytes for f in frames])
        except CorralError as exc:
            log.warning("bad frame from kernel", reason=exc.reason)
            return
        except Exception as exc:  # a codec bug must not end the driver
            log.exception("undecodable message", error=repr(exc))
            return
        if self.welcome is None:
            if isinstance(body, Welcome):
                # Taken here, not after connect() resumes: a REQUEST may follow in the same
                # drain, and its handler must already see the configuration.
                self.welcome = body
                if self._on_welcome is not None:
                    self._on_welcome(body)
            if isinstance(body, Welcome | Error) and self._greeting and not self._greeting.done():
                self._greeting.set_result(body)
            return  # anything else before WELCOME (a stray heartbeat) is ignored
        if isinstance(body, Bye):
            self._fail_pending(f"kernel said BYE: {body.reason}")
            self._end(True)
        elif isinstance(body, Error) and body.code == ErrorCode.UNAUTHENTICATED:
            # A restarted kernel does not know this connection: HELLO again.
            log.warning("kernel forgot this peer", reason=body.reason)
            self._fail_pending("kernel restarted")
            self._end(False)
        else:
            self._dispatch(body)

    def _dispatch(self, body: Body) -> None:
        if isinstance(body, Reply):
            fut = self._pending.get(body.id)
            if fut is not None and not fut.done():
                fut.set_result(body.result)
        elif isinstance(body, Error):
            fut = self._pending.get(body.id) if body.id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(
                    CorralError(
                        body.reason, code=_code(body.code), retry=body.retry, details=body.details
                    )
                )
        elif isinstance(body, Request):
            task = asyncio.ensure_future(self._serve(body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # HEARTBEAT only refreshes _last_heard; EVENT is not sent to DEALERs.

    async def _serve(self, req: Request) -> None:
        handler = self.handlers.get(req.op)
        reply: Body
        if handler is None:
            reply = Error(
                id=req.id,
                code=ErrorCode.UNKNOWN_OPERATION,
                reason=f"operation {req.op!r} is not served by {self.hello.name}",
            )
        else:
            try:
                reply = Reply(id=req.id, result=await handler(req.args))
            except CorralError as exc:
                reply = Error(
                    id=req.id, code=exc.code, reason=exc.reason, retry=exc.retry,
                    details=exc.details,
                )
            except Exception as exc:  # a handler bug must not kill the connection
                log.exception("handler failed", op=req.op)
                reply = Error(
                    id=req.id, code=ErrorCode.INTERNAL, reason=f"{type(exc).__name__}: {exc}",
                    retry=True,
                )
        await self.send(reply)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.send(Heartbeat(time=time.time()))

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(UnavailableError(why))

    async def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Ask the kernel to publish an event (drivers only)."""
        await self.send(Event(topic=topic, time=time.time(), data=data))

    async def bye(self, reason: str = "") -> None:
        """Say BYE and close (the BYE is flushed before the socket goes)."""
        if self._io is not None and not self._closed:
            try:
                self._io.sock.send_multipart(encode(Bye(reason=reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.close()

    def close(self) -> None:
        """Close the socket; pending requests fail."""
        self._closed = True
        self._fail_pending("connection closed")
        self._end(True)
        if self._io is not None:
            self._io.close()
            self._io = None


def _code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL


async def subscribe(
    endpoint: str, prefix: str, ctx: zmq.asyncio.Context | None = None
) -> zmq.asyncio.Socket:
    """A SUB socket on the kernel's PUB endpoint for topics starting with ``prefix``."""
    sock = (ctx or zmq.asyncio.Context.instance()).socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.connect(endpoint)
    return sock


def decode_event(frames: list[bytes]) -> Event:
    """Decode a PUB message: [topic, signature, EVENT, body]."""
    body = decode(frames[1:])
    if not isinstance(body, Event):
        raise CorralError("not an EVENT", code=ErrorCode.BAD_FRAME)
    return body
