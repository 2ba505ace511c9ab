"""The kernel side of CDP/1: a ROUTER for requests and a PUB for events, behind ZAP.

Every message arrives with the uid libzmq attached after the ZAP handler admitted the
connection; a message without one is dropped before decoding. A peer's first message must be
HELLO; until it is welcomed, anything else gets ERROR 401. Requests are handed to the
``dispatch`` callback, which looks the operation up in the table of the peer's role.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from corral.bus._socket import LoopSocket
from corral.bus._zap import DOMAIN, ZapHandler, run_zap
from corral.errors import CorralError, ErrorCode, UnavailableError
from corral.host import bus_endpoint, ensure_private_dir, events_endpoint
from corral.protocol import (
    MAX_BODY,
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

log = structlog.get_logger("corral.bus")

HARD_MAX_MESSAGE = 4 * MAX_BODY
"""libzmq disconnects a peer that sends a single message larger than this."""


@dataclass
class Peer:
    """A welcomed peer."""

    identity: bytes
    uid: int
    hello: Hello
    peer_id: str
    last_heard: float = field(default_factory=time.monotonic)

    @property
    def role(self) -> str:
        """'driver' or 'client'."""
        return self.hello.role

    @property
    def name(self) -> str:
        """The name the peer gave in HELLO."""
        return self.hello.name


OnHello = Callable[[bytes, int, Hello], Awaitable[Welcome]]
Dispatch = Callable[[Peer, Request], Awaitable[dict[str, Any]]]
OnLost = Callable[[Peer], Awaitable[None]]


class BusServer:
    """The kernel's bus. Construct, ``await start()``, run ``serve()`` as a task."""

    def __init__(
        self,
        runtime: Path,
        *,
        admit: Callable[[int], bool],
        on_hello: OnHello,
        dispatch: Dispatch,
        on_lost: OnLost,
        heartbeat_ms: int = 1000,
    ) -> None:
        self.runtime = runtime
        self.endpoint = bus_endpoint(runtime)
        self.events = events_endpoint(runtime)
        self.heartbeat_s = heartbeat_ms / 1000
        self._admit = admit
        self._on_hello = on_hello
        self._dispatch = dispatch
        self._on_lost = on_lost
        self._ctx = zmq.asyncio.Context()
        self.peers: dict[bytes, Peer] = {}
        # keyed by (peer identity, request id): only the peer asked may answer
        self._pending: dict[tuple[bytes, int], asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"received": 0, "refused": 0, "errors": 0}

    async def start(self) -> None:
        """Bind the sockets (runtime dir 0700, sockets 0600) and start the ZAP handler."""
        ensure_private_dir(self.runtime)
        self._zap = ZapHandler(self._ctx, self._admit)
        self._spawn(run_zap(self._zap))
        # Plain sockets driven through LoopSocket (see _socket.py): no Future per message.
        self._router: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.ROUTER)
        self._router.zap_domain = DOMAIN
        self._router.linger = 0
        self._router.maxmsgsize = HARD_MAX_MESSAGE
        self._router.router_mandatory = True
        self._router.sndhwm = 10000
        self._pub: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.PUB)
        self._pub.zap_domain = DOMAIN
        self._pub.linger = 0
        self._pub.maxmsgsize = 65536  # subscribers send subscriptions only
        self._bound: list[tuple[str, int]] = []  # (path, inode) of the socket files we made
        for sock, ep in ((self._router, self.endpoint), (self._pub, self.events)):
            path = ep.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)  # a stale socket of a dead kernel
            sock.bind(ep)
            os.chmod(path, 0o600)
            self._bound.append((path, os.stat(path).st_ino))
        self._io = LoopSocket(self._router, self._on_message)

    def share(self, directory: Path, gid: int) -> tuple[str, str]:
        """Bind both sockets a second time in ``directory`` (root:``gid``, 0750; sockets
        0660) for the members of group ``gid`` (the SSH gateway): the runtime directory stays
        private. The ZAP handler still admits each peer by uid. Returns (bus, events)."""
        directory.mkdir(mode=0o750, exist_ok=True)
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o750)
        endpoints = (f"ipc://{directory / 'bus.sock'}", f"ipc://{directory / 'events.sock'}")
        for sock, ep in zip((self._router, self._pub), endpoints, strict=True):
            path = ep.removeprefix("ipc://")
            if any(p == path for p, _ in self._bound):
                continue
            if os.path.exists(path):
                os.unlink(path)
            sock.bind(ep)
            os.chown(path, 0, gid)
            os.chmod(path, 0o660)
            self._bound.append((path, os.stat(path).st_ino))
        return endpoints

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def serve(self) -> None:
        """Run heartbeats until cancelled (messages are handled from the loop's reader)."""
        await self._heartbeats()

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        self.stats["received"] += 1
        try:
            self._handle(frames)
        except Exception:  # the kernel keeps serving whatever one message does
            self.stats["errors"] += 1
            log.exception("message handling failed")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        user = frames[-1].get("User-Id") if len(frames) > 1 else None
        uid = _uid_of(user if isinstance(user, str) else None)
        if uid is None or not self._admit(uid):
            # Not authenticated: never decoded, never answered.
            self.stats["refused"] += 1
            return
        try:
            body = decode([f.bytes for f in frames[1:]])
        except CorralError as exc:
            self._send(identity, Error(code=exc.code, reason=exc.reason))
            return
        peer = self.peers.get(identity)
        if peer is not None:
            peer.last_heard = time.monotonic()
        if isinstance(body, Hello):
            self._spawn(self._hello(identity, uid, body))
        elif peer is None:
            self._send(
                identity,
                Error(
                    id=getattr(body, "id", None),
                    code=ErrorCode.UNAUTHENTICATED,
                    reason="HELLO first",
                ),
            )
        elif isinstance(body, Request):
            self._spawn(self._serve_request(peer, body))
        elif isinstance(body, Reply):
            fut = self._pending.get((identity, body.id))
            if fut is not None and not fut.done():
                fut.set_result(body.result)
        elif isinstance(body, Error):
            fut = self._pending.get((identity, body.id)) if body.id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(
                    CorralError(body.reason, code=_code(body.code), retry=body.retry,
                                details=body.details)
                )
        elif isinstance(body, Event):
            cap = peer.hello.capability or ""
            # a driver speaks only under its own topics, never as the kernel (app.*)
            if peer.role == "driver" and body.topic.startswith(
                    (f"{cap}.", f"driver.{peer.name}.")):
                self.publish(body.topic, body.data)
            else:
                log.warning("event refused", peer=peer.name, topic=body.topic[:80])
        elif isinstance(body, Bye):
            log.info("peer said BYE", peer=peer.name, role=peer.role, reason=body.reason)
            self.peers.pop(identity, None)
            self._fail_pending(identity, f"{peer.name} said BYE")
            self._spawn(self._on_lost(peer))
        elif isinstance(body, Heartbeat):
            pass
        else:
            self._send(
                identity,
                Error(code=ErrorCode.BAD_FRAME, reason=f"{type(body).__name__} is kernel-only"),
            )

    async def _hello(self, identity: bytes, uid: int, hello: Hello) -> None:
        if identity in self.peers:
            self._send(identity, Error(code=ErrorCode.BAD_FRAME, reason="second HELLO"))
            return
        try:
            welcome = await self._on_hello(identity, uid, hello)
        except CorralError as exc:
            self._send(identity, Error(code=exc.code, reason=exc.reason, retry=exc.retry))
            return
        self.peers[identity] = Peer(identity, uid, hello, welcome.peer_id)
        self._send(identity, welcome)

    async def _serve_request(self, peer: Peer, req: Request) -> None:
        try:
            result = await self._dispatch(peer, req)
            reply: Body = Reply(id=req.id, result=result)
        except CorralError as exc:
            reply = Error(
                id=req.id, code=exc.code, reason=exc.reason, retry=exc.retry, details=exc.details
            )
        except Exception as exc:
            log.exception("operation failed", op=req.op, peer=peer.name)
            reply = Error(
                id=req.id, code=ErrorCode.INTERNAL, reason=f"{type(exc).__name__}: {exc}",
                retry=True,
            )
        self._send(peer.identity, reply)

    def _send(self, identity: bytes, body: Body) -> None:
        try:
            self._io.send([identity, *encode(body)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            log.debug("send failed", error=str(exc))

    async def call(
        self, peer: Peer, op: str, args: dict[str, Any], *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a REQUEST to ``peer`` (a driver) and await its REPLY."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        key = (peer.identity, rid)
        self._pending[key] = fut
        try:
            try:
                self._io.send(
                    [peer.identity,
                     *encode(Request(id=rid, op=op, args=args, deadline_ms=int(timeout * 1000)))]
                )
            except zmq.ZMQError:
                raise UnavailableError(f"driver {peer.name!r} is not connected") from None
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CorralError(
                f"driver {peer.name!r} did not answer {op} in {timeout:.1f}s",
                code=ErrorCode.TIMEOUT,
            ) from None
        finally:
            self._pending.pop(key, None)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an EVENT under ``topic``; never blocks (PUB drops for slow subscribers)."""
        body = Event(topic=topic, time=time.time(), data=data)
        try:
            self._pub.send_multipart([topic.encode(), *encode(body)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def _heartbeats(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            # a tick that comes late means this loop was held up (a slow call on it): what
            # peers sent meanwhile is still queued, unread; judge them on the next tick
            stalled = now - last_tick > 2 * self.heartbeat_s
            last_tick = now
            for identity, peer in list(self.peers.items()):
                if not stalled and now - peer.last_heard > 3 * self.heartbeat_s:
                    log.warning("peer lost", peer=peer.name, role=peer.role)
                    self.peers.pop(identity, None)
                    self._fail_pending(identity, f"{peer.name} stopped answering")
                    await self._on_lost(peer)
                    continue
                self._send(identity, Heartbeat(time=time.time()))

    def _fail_pending(self, identity: bytes, why: str) -> None:
        """Requests waiting on a peer that is gone fail now, not at their deadline."""
        for (ident, _rid), fut in list(self._pending.items()):
            if ident == identity and not fut.done():
                fut.set_exception(UnavailableError(why))

    def forget(self, identity: bytes, why: str) -> None:
        """Drop a peer (its process died): pending requests to it fail at once."""
        if self.peers.pop(identity, None) is not None:
            self._fail_pending(identity, why)

    async def say_bye(self, reason: str) -> None:
        """Tell every peer goodbye (orderly kernel shutdown)."""
        for identity in list(self.peers):
            self._send(identity, Bye(reason=reason))

    def close(self) -> None:
        """Cancel tasks, close sockets and remove the socket files."""
        for task in list(self._tasks):
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(UnavailableError("kernel stopping"))
        self._io.close()
        self._pub.close(0)
        self._zap.close()
        self._ctx.term()
        # libzmq leaves ipc files behind; a client would take one for a running kernel. Only
        # ours: a kernel started since may have bound the same path anew.
        for path, inode in self._bound:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass


def _uid_of(user: str | None) -> int | None:
    if not user or not user.startswith("uid:"):
        return None
    try:
        return int(user[4:])
    except ValueError:
        return None


def _code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL
