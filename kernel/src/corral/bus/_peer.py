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
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.hello = hello
        self.handlers: Mapping[str, Handler] = handlers or {}
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.welcome: Welcome | None = None
        self._last_heard = 0.0
        self._closed = False

    @property
    def heartbeat_s(self) -> float:
        """The heartbeat interval the kernel asked for."""
        return (self.welcome.heartbeat_ms if self.welcome else 1000) / 1000

    async def connect(self, timeout: float = 5.0) -> Welcome:
        """Open the socket, send HELLO and wait for WELCOME; raise the kernel's ERROR."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        self._sock = sock
        deadline = time.monotonic() + timeout
        try:
            # IMMEDIATE: with no live kernel behind the socket the send waits; bound it.
            await asyncio.wait_for(sock.send_multipart(encode(self.hello)), timeout)
        except TimeoutError:
            self.close()
            raise UnavailableError(f"no kernel listening at {self.endpoint}") from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await sock.poll(int(left * 1000)):
                self.close()
                raise UnavailableError(f"no answer from the kernel at {self.endpoint}")
            body = decode(await sock.recv_multipart())
            if isinstance(body, Welcome):
                self.welcome = body
                self._last_heard = time.monotonic()
                return body
            if isinstance(body, Error):
                self.close()
                raise CorralError(body.reason, code=_code(body.code), retry=body.retry)
            # anything else before WELCOME (a stray heartbeat) is ignored

    async def call(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a REQUEST and wait for its REPLY; raise CorralError on ERROR or timeout."""
        if self._sock is None:
            raise UnavailableError("not connected")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            req = Request(id=rid, op=op, args=dict(args or {}), deadline_ms=int(timeout * 1000))
            async with asyncio.timeout(timeout):
                await self._sock.send_multipart(encode(req))
                return await fut
        except TimeoutError:
            raise CorralError(f"{op}: no reply in {timeout:.1f}s", code=ErrorCode.TIMEOUT) from None
        finally:
            self._pending.pop(rid, None)

    async def send(self, body: Body, *, timeout: float = 5.0) -> None:
        """Send one message (EVENT, HEARTBEAT, BYE...); give up silently after ``timeout``."""
        if self._sock is not None:
            try:
                await asyncio.wait_for(self._sock.send_multipart(encode(body)), timeout)
            except TimeoutError:
                log.warning("send timed out", command=type(body).__name__)

    async def run(self) -> bool:
        """Serve until BYE from the kernel or ``close()`` (True) or the kernel is lost (False)."""
        assert self._sock is not None
        hb = asyncio.create_task(self._heartbeat())
        receiver = asyncio.create_task(self._receive())
        try:
            while not receiver.done():
                await asyncio.wait({receiver}, timeout=self.heartbeat_s)
                if not receiver.done() and (
                    time.monotonic() - self._last_heard > 3 * self.heartbeat_s
                ):
                    log.warning("kernel lost", endpoint=self.endpoint)
                    self._fail_pending("kernel lost")
                    return False
            return receiver.result()
        finally:
            hb.cancel()
            receiver.cancel()

    async def _receive(self) -> bool:
        """The receive loop proper: True on BYE/close, False when the kernel forgot us."""
        assert self._sock is not None
        sock = self._sock
        while not self._closed:
            frames = await sock.recv_multipart()
            self._last_heard = time.monotonic()
            try:
                body = decode(frames)
            except CorralError as exc:
                log.warning("bad frame from kernel", reason=exc.reason)
                continue
            except Exception as exc:  # a codec bug must not end the driver
                log.exception("undecodable message", error=repr(exc))
                continue
            if isinstance(body, Bye):
                self._fail_pending(f"kernel said BYE: {body.reason}")
                return True
            if isinstance(body, Error) and body.code == ErrorCode.UNAUTHENTICATED:
                # A restarted kernel does not know this connection: HELLO again.
                log.warning("kernel forgot this peer", reason=body.reason)
                self._fail_pending("kernel restarted")
                return False
            self._dispatch(body)
        return True

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
            task = asyncio.create_task(self._serve(body))
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
        """Say BYE and close."""
        try:
            await self.send(Bye(reason=reason))
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket; pending requests fail."""
        self._closed = True
        self._fail_pending("connection closed")
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


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
