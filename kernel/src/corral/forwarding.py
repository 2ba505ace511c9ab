"""Requests about an app another host runs, carried to that host through the shared ledger.

On an etcd ledger every host may be asked about every app: `corral ps`, `releases`,
`restart`, `scale`, `rollback`, `down`, `config` (reading, unsetting) and the drivers'
queries (`logs`, `errors`, `top`) of an app deployed on h1 work from h2. The asking kernel
checks the caller as it checks any request (a remote SSH key's scope included), then leaves
the request for h1 in the ledger and waits for h1's answer there; no other channel between
hosts exists, and being able to write the ledger is the trust hosts already share.

- A request is the record ``host-mail/<to>/<id>``: the operation, its arguments (already
  validated), who asked (as the release history records it) and a deadline; it is held
  under the asking host's lease, so a host that dies leaves no request behind.
- The host it is addressed to reads its mailbox whenever the ledger says it changed (an etcd
  watch, ``Ledger.wait_for_change``; at least every ``MAILBOX_WAIT_S``), runs the operation
  as its own client would, and answers with ``host-reply/<from>/<id>`` under its own lease
  (the result, or the error's code and reason), then removes the request. A request past its
  deadline is dropped unanswered.
- The asking kernel reads the answer, removes it, and returns the result or raises the
  error as if it were its own; no answer by the deadline is ``UnavailableError`` naming the
  host.

A request is run at least once and, within its deadline, usually once: a kernel killed
while running one finds it again when it comes back before the deadline and runs it again
(the forwarded operations are safe to repeat: a second `down` finds nothing, a second
`restart` rolls the app once more). Only the kernel writes these records: drivers and
clients reach the ledger through the host view (``HostView``), where ``host-mail`` is a
per-host kind stored under ``@<host>/``, never in another host's mailbox.

Only ``FORWARDED`` operations travel (``config set`` does not: config values, secrets among
them, are never written to the ledger). An answer larger than ``MAX_ANSWER`` bytes (etcd
keeps values under 1.5 MiB) is refused with an error saying so.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from corral.errors import CorralError, ErrorCode, UnavailableError
from corral.ledger import Ledger, Txn

log = structlog.get_logger("corral.forwarding")

MAIL = "host-mail"
REPLY = "host-reply"
FORWARDED = frozenset({
    "app.ps", "app.get", "app.down", "app.scale", "app.restart", "app.releases",
    "app.rollback", "app.config", "app.config.unset", "driver.query", "app.adopt",
    "hosts.drain",
})
"""Operations that may be run on the host that holds their app."""
READS = frozenset({"app.ps", "app.get", "app.releases", "app.config", "driver.query"})
READ_TIMEOUT_S = 15.0  # a read's deadline; a change waits for the rollout it starts
CHANGE_TIMEOUT_S = 300.0
MAILBOX_WAIT_S = 5.0  # one wait for new requests (an etcd watch) lasts at most this long
ANSWER_POLL_S = 0.02
MAX_ANSWER = 1 << 20

Handle = Callable[[str, dict[str, Any], str], Awaitable[dict[str, Any]]]
"""Runs one forwarded operation here: (operation, arguments, who asked) -> its result."""


@dataclass
class Forwarder:
    """This host's end of the host mail: ``call`` asks another host, ``serve`` answers."""

    ledger: Ledger  # the shared ledger itself, not a host view
    this: str
    lease: Callable[[], str | None]  # this host's current lease (None: not registered)
    handle: Handle
    _running: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def owner(self) -> str:
        """The owner of this host's requests and answers."""
        return f"host:{self.this}"

    async def call(self, host: str, op: str, args: dict[str, Any], by: str,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Run ``op`` on ``host`` and return its result, or raise its error (its code and
        reason, saying which host answered); ``UnavailableError`` if no answer comes by the
        deadline (the request is then withdrawn)."""
        if op not in FORWARDED:
            raise CorralError(f"{op} is not run on another host; run it on host {host}",
                              code=ErrorCode.FORBIDDEN)
        timeout = timeout_s if timeout_s is not None else (
            READ_TIMEOUT_S if op in READS else CHANGE_TIMEOUT_S)
        ident = secrets.token_hex(8)
        request = {"op": op, "args": args, "by": by, "from": self.this,
                   "deadline": time.time() + timeout}
        await asyncio.to_thread(self.ledger.put, self.owner, MAIL, f"{host}/{ident}",
                                request, lease=self.lease())
        answer_key = f"{self.this}/{ident}"
        deadline = time.monotonic() + timeout
        answered = False
        try:
            while True:
                rec = await asyncio.to_thread(self.ledger.get, REPLY, answer_key)
                if rec is not None:
                    answered = True  # the answer's commit removed the request
                    await asyncio.to_thread(self.ledger.release, rec.owner,
                                            [(REPLY, answer_key)])
                    return _result(rec.value, host, op)
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"host {host} did not answer {op} within {timeout:g} s (is its kernel "
                        "running? `corral hosts`)")
                await asyncio.sleep(ANSWER_POLL_S)
        finally:
            if not answered:  # withdrawn: past its deadline, or the caller gave up
                try:
                    await asyncio.to_thread(self._withdraw, host, ident)
                except CorralError as exc:
                    log.warning("host request not withdrawn", host=host, op=op,
                                error=str(exc))

    def _withdraw(self, host: str, ident: str) -> None:
        rec = self.ledger.get(MAIL, f"{host}/{ident}")
        if rec is not None and rec.owner == self.owner:
            self.ledger.release(self.owner, [(MAIL, f"{host}/{ident}")])

    async def serve(self) -> None:
        """Answer the requests addressed to this host, each in a task of its own, until
        cancelled."""
        mailbox = f"{self.this}/"
        try:
            while True:
                try:
                    revision = await asyncio.to_thread(self.ledger.revision)
                    pending = await asyncio.to_thread(self.ledger.list, kind=MAIL,
                                                      prefix=mailbox)
                except CorralError as exc:
                    log.warning("host mailbox not read", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for rec in pending:
                    if rec.key in self._running:
                        continue
                    self._running.add(rec.key)
                    task = asyncio.create_task(self._answer(rec.key, rec.owner, rec.value))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                # until a request comes after what was just read (or a while passes)
                await in_daemon_thread(self.ledger.wait_for_change, MAIL, mailbox, revision,
                                        MAILBOX_WAIT_S)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _answer(self, key: str, owner: str, request: dict[str, Any]) -> None:
        try:
            ident = key.partition("/")[2]
            sender, op = str(request.get("from")), str(request.get("op"))
            if float(request.get("deadline", 0)) < time.time():
                log.info("host request past its deadline, dropped", op=op, sender=sender)
                await asyncio.to_thread(self.ledger.release, owner, [(MAIL, key)])
                return
            try:
                if op not in FORWARDED:
                    raise CorralError(f"{op} is not run for another host",
                                      code=ErrorCode.FORBIDDEN)
                result = await self.handle(op, dict(request.get("args") or {}),
                                           str(request.get("by") or f"host {sender}"))
                value: dict[str, Any] = {"result": result}
                if len(json.dumps(value)) > MAX_ANSWER:
                    raise CorralError(f"the answer to {op} is larger than {MAX_ANSWER} bytes, "
                                      f"too large to send between hosts; run it on host "
                                      f"{self.this}", code=ErrorCode.INVALID)
            except CorralError as exc:
                value = {"error": {"code": int(exc.code), "reason": exc.reason}}
            except Exception as exc:  # a bug here must still answer, not leave the caller
                log.exception("forwarded operation failed", op=op)
                value = {"error": {"code": int(ErrorCode.INTERNAL),
                                   "reason": f"{type(exc).__name__}: {exc}"}}
            # only while the request is still there: one its sender withdrew (its deadline
            # passed) gets no answer, which nobody would ever read
            txn = Txn().expect_held(MAIL, key, owner)
            txn.claim(self.owner, REPLY, f"{sender}/{ident}", value, lease=self.lease())
            txn.release(owner, MAIL, key)
            await asyncio.to_thread(self.ledger.commit, txn)
        except CorralError as exc:
            log.warning("host request not answered", key=key, error=str(exc))
        finally:
            self._running.discard(key)


async def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread of its own: a wait that may block for seconds holds
    none of the loop's worker threads and never delays the process's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed (the kernel stopped meanwhile): nobody waits

    threading.Thread(target=run, name="corral-mailbox", daemon=True).start()
    return await done


def _result(value: dict[str, Any], host: str, op: str) -> dict[str, Any]:
    error = value.get("error")
    if isinstance(error, dict):
        try:
            code = ErrorCode(int(error.get("code", ErrorCode.INTERNAL)))
        except ValueError:
            code = ErrorCode.INTERNAL
        raise CorralError(f"{error.get('reason')} (answered by host {host})", code=code)
    result = value.get("result")
    if not isinstance(result, dict):
        raise CorralError(f"host {host} answered {op} with no result",
                          code=ErrorCode.INTERNAL)
    return result
