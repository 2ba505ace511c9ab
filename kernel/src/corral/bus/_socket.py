"""A ZeroMQ socket driven by the asyncio loop through its file descriptor.

pyzmq's asyncio sockets create a Future and several enum objects per message, which costs
more than the rest of a kernel request. ``LoopSocket`` keeps a plain (blocking-API) socket,
watches its ``FD`` with ``loop.add_reader`` and drains every queued message with NOBLOCK
receives in one callback. The FD is edge-triggered: after every send the socket is drained
again on the next loop iteration, because a send can consume the readable edge.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import zmq

Frames = list[zmq.Frame]


class LoopSocket:
    """Calls ``on_message(frames)`` for every message; ``send`` never blocks the loop."""

    def __init__(
        self, sock: zmq.Socket[bytes], on_message: Callable[[Frames], None], *, batch: int = 512
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self._fd = int(sock.getsockopt(zmq.FD))
        self._backlog: deque[list[bytes]] = deque()
        self._drain_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closed:
            return
        for _ in range(self._batch):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return
            self._on_message(frames)
            if self._closed:
                return
        else:  # more may be queued: yield to the loop, then continue
            self._schedule_drain()
        self._flush()

    def send(self, frames: list[bytes]) -> None:
        """Queue ``frames`` for sending; raises zmq.ZMQError for an unroutable peer."""
        if self._closed:
            return
        if self._backlog:
            self._backlog.append(frames)
        else:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # high-water mark: keep it, retry from the loop
                self._backlog.append(frames)
                self._loop.call_later(0.001, self._flush)
        self._schedule_drain()

    def _flush(self) -> None:
        while self._backlog and not self._closed:
            try:
                self.sock.send_multipart(self._backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                self._loop.call_later(0.001, self._flush)
                return
            except zmq.ZMQError:
                pass  # the peer went away: drop what was meant for it
            self._backlog.popleft()

    def close(self) -> None:
        """Stop watching and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass
        self.sock.close(0)
