"""The conformance checks, in the order they run: one small function per CDP/1 obligation.

Each check gets the :class:`Run` and returns a one-line reason for its PASS, or raises
:class:`CheckFailed`. A *fatal* check's failure ends the run (the rest are reported SKIP):
after a refused HELLO there is no connection left to test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from corral.conformance._stand_in import DRIVER_SENDS, Received, StandIn, is_hello
from corral.errors import ErrorCode
from corral.protocol import (
    LIFECYCLE_OPS,
    MAX_BODY,
    PROTOCOL,
    SIGNATURE,
    Bye,
    Error,
    Hello,
    ManifestChecked,
    Reply,
    check_driver_ops,
)

HELLO_TIMEOUT_S = 5.0
EXIT_TIMEOUT_S = 5.0
SYNC_TIMEOUT_S = 10.0

MALFORMED_ARGS: dict[str, dict[str, Any]] = {
    "state.sync": {"apps": 42, "instances": "none"},
    "app.attach": {"app": 42},
    "app.detach": {"app": 42},
    "instance.prepare": {"app": 42, "instance": 42},
    "instance.started": {"app": 42, "instance": 42},
    "instance.stopping": {"app": 42, "instance_id": 42},
    "instance.stopped": {"app": 42, "instance_id": 42},
    "manifest.check": {"app": 42, "directory": [], "sections": "none"},
}
"""Per lifecycle operation, arguments whose types are wrong: the driver must answer ERROR 422."""


def _b(text: str) -> bytes:
    return text.encode()


GARBAGE: list[tuple[str, list[bytes]]] = [
    ("one empty frame", [b""]),
    ("two frames", [SIGNATURE, b"HEARTBEAT"]),
    ("four frames", [SIGNATURE, b"HEARTBEAT", b"{}", b"{}"]),
    ("wrong signature", [b"CDP2", b"HEARTBEAT", b"{}"]),
    ("lower-case command", [SIGNATURE, b"request", b"{}"]),
    ("unknown command", [SIGNATURE, b"FROBNICATE", b"{}"]),
    ("binary command", [SIGNATURE, b"\xff\xfe", b"{}"]),
    ("body not JSON", [SIGNATURE, b"REQUEST", b"this is not json"]),
    ("body not UTF-8", [SIGNATURE, b"REQUEST", b'{"id": 1, "op": "\xff"}']),
    ("body a JSON array", [SIGNATURE, b"REQUEST", b"[1, 2, 3]"]),
    ("body empty", [SIGNATURE, b"REQUEST", b""]),
    ("REQUEST without op", [SIGNATURE, b"REQUEST", _b('{"id": 5}')]),
    ("REQUEST with negative id", [SIGNATURE, b"REQUEST", _b('{"id": -1, "op": "state.sync"}')]),
    ("REQUEST with unknown field",
     [SIGNATURE, b"REQUEST", _b('{"id": 6, "op": "x", "args": {}, "sudo": true}')]),
    ("HELLO from the kernel (unexpected command)",
     [SIGNATURE, b"HELLO", _b('{"role": "driver", "name": "k", "version": "1",'
                              ' "protocols": ["CDP/1"]}')]),
    ("WELCOME after WELCOME (unexpected command)",
     [SIGNATURE, b"WELCOME", _b('{"peer_id": "x", "heartbeat_ms": 1}')]),
    ("REPLY to nothing", [SIGNATURE, b"REPLY", _b('{"id": 999999, "result": {}}')]),
    ("ERROR to nothing",
     [SIGNATURE, b"ERROR", _b('{"id": 999998, "code": 500, "reason": "x"}')]),
]
"""Messages a driver must survive: drop them (or answer ERROR) and keep its connection."""

HOSTILE: list[tuple[str, list[bytes]]] = [
    ("JSON nested 100000 deep",
     [SIGNATURE, b"HEARTBEAT", b'{"time": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]),
    ("JSON integer of 5000 digits", [SIGNATURE, b"HEARTBEAT", b'{"time": ' + b"7" * 5000 + b"}"]),
    ("REQUEST nested 100000 deep",
     [SIGNATURE, b"REQUEST",
      b'{"id": 1, "op": "state.sync", "args": {"x": ' + b"[" * 100_000 + b"]" * 100_000
      + b"}}"]),
]
"""Valid-looking bodies that break naive JSON parsers (recursion, big-number limits)."""


class CheckFailed(Exception):
    """A check's failure; ``reason`` says what the driver did wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Run:
    """The state shared by the checks of one conformance run."""

    kernel: StandIn
    capability: str | None = None  # the capability the driver must declare, if known
    hello: Hello | None = None
    hello_msg: Received | None = None

    @property
    def ops(self) -> list[str]:
        """The operations the driver declared."""
        return list(self.hello.ops) if self.hello else []


Check = Callable[[Run], Awaitable[str]]


@dataclass(frozen=True)
class CheckSpec:
    """One entry of the check list."""

    name: str
    run: Check
    doc: str
    fatal: bool = False
    needs_driver: bool = True  # fails at once when the driver process is gone


# ---- helpers ---------------------------------------------------------------------------------


def _status(run: Run) -> str:
    code = run.kernel.exit_status()
    return "" if code is None else f" (driver exited with status {code})"


async def _refuse(run: Run, msg: Received, code: ErrorCode, reason: str) -> CheckFailed:
    """Answer the HELLO with ERROR as the kernel would, and build the failure."""
    await run.kernel.send(Error(code=code, reason=reason), msg.identity)
    return CheckFailed(reason)


async def _still_serving(run: Run, since: float, what: str) -> None:
    """Fail unless the driver kept its connection and heartbeats since ``since``."""
    k = run.kernel
    await asyncio.sleep(3 * k.interval)
    if k.exit_status() is not None:
        raise CheckFailed(f"driver died after {what}{_status(run)}")
    rehello = [m for m in k.received if m.at > since and is_hello(m)]
    if rehello:
        raise CheckFailed(f"driver dropped its connection after {what} (sent HELLO again)")
    recent = [h for h in k.heartbeats
              if h.identity == k.identity and h.at > time.monotonic() - 2.5 * k.interval]
    if not recent:
        raise CheckFailed(f"driver stopped heartbeating after {what}")
    answer = await k.request("state.sync", {"apps": [], "instances": []}, SYNC_TIMEOUT_S)
    if not isinstance(answer, Received) or not isinstance(answer.body, Reply):
        raise CheckFailed(f"driver no longer answers state.sync after {what}{_status(run)}")


# ---- the checks --------------------------------------------------------------------------------


async def hello_arrives(run: Run) -> str:
    """The first message arrives within 5 s through ZAP and decodes as a CDP/1 HELLO."""
    k = run.kernel
    started = time.monotonic()
    await k.launch()
    msg = await k.next(HELLO_TIMEOUT_S)
    if msg is None:
        raise CheckFailed(f"no message within {HELLO_TIMEOUT_S:.0f} s{_status(run)}")
    if msg.error is not None:
        raise CheckFailed(f"first message is not valid CDP/1: ERROR {int(msg.error.code)} "
                          f"{msg.error.reason}")
    if not isinstance(msg.body, Hello):
        raise CheckFailed(f"first message is {msg.command}, expected HELLO")
    if not msg.user_id or not msg.user_id.startswith("uid:"):
        raise CheckFailed(f"message carries no ZAP user id ({msg.user_id!r})")
    run.hello = msg.body
    run.hello_msg = msg
    return (f"HELLO from {msg.body.name} {msg.body.version} after "
            f"{msg.at - started:.2f} s, admitted by ZAP as {msg.user_id}")


def _hello_msg(run: Run) -> Received:
    assert run.hello_msg is not None
    return run.hello_msg


async def hello_role(run: Run) -> str:
    """HELLO says role "driver"."""
    assert run.hello is not None
    if run.hello.role != "driver":
        raise await _refuse(run, _hello_msg(run), ErrorCode.UNAUTHENTICATED,
                            f"role is {run.hello.role!r}, a driver must say 'driver'")
    return "role driver"


async def hello_protocol(run: Run) -> str:
    """HELLO offers CDP/1."""
    assert run.hello is not None
    if PROTOCOL not in run.hello.protocols:
        raise await _refuse(run, _hello_msg(run), ErrorCode.VERSION,
                            f"protocols {run.hello.protocols} do not include {PROTOCOL}")
    return f"offers {run.hello.protocols}"


async def hello_token(run: Run) -> str:
    """HELLO carries the one-time CORRAL_DRIVER_TOKEN the driver was started with."""
    assert run.hello is not None
    if run.hello.token != run.kernel.token:
        shown = "missing" if run.hello.token is None else f"{run.hello.token[:8]!r}..."
        raise await _refuse(run, _hello_msg(run), ErrorCode.UNAUTHENTICATED,
                            f"token {shown} is not CORRAL_DRIVER_TOKEN")
    return "token echoed"


async def hello_capability(run: Run) -> str:
    """The capability is known (and the expected one) and the declared ops fit its contract."""
    assert run.hello is not None
    problem = check_driver_ops(run.hello.capability, run.hello.ops, run.hello.features)
    if problem is None and run.capability and run.hello.capability != run.capability:
        problem = f"capability {run.hello.capability!r}, expected {run.capability!r}"
    if problem is not None:
        raise await _refuse(run, _hello_msg(run), ErrorCode.INVALID, problem)
    return f"capability {run.hello.capability!r}, ops {run.hello.ops}"


async def heartbeat_interval(run: Run) -> str:
    """After WELCOME the driver sends HEARTBEAT every heartbeat_ms (never 3 intervals apart)."""
    k = run.kernel
    welcomed = time.monotonic()
    await k.welcome(_hello_msg(run))
    refused = await k.next(k.interval, lambda m: isinstance(m.body, Error))
    if refused is not None:
        assert isinstance(refused.body, Error)
        raise CheckFailed(f"driver answered WELCOME with ERROR {refused.body.code}: "
                          f"{refused.body.reason}")
    await asyncio.sleep(5 * k.interval)
    if k.exit_status() is not None:
        raise CheckFailed(f"driver exited after WELCOME{_status(run)}")
    beats = [h.at for h in k.heartbeats if h.identity == k.identity and h.at > welcomed]
    if len(beats) < 3:
        raise CheckFailed(f"{len(beats)} heartbeats in {6 * k.heartbeat_ms} ms "
                          f"(interval {k.heartbeat_ms} ms)")
    gaps = [b - a for a, b in zip([welcomed, *beats], beats, strict=False)]
    worst = max(gaps)
    if worst > 2 * k.interval:
        raise CheckFailed(f"a gap of {worst * 1000:.0f} ms between heartbeats "
                          f"(interval {k.heartbeat_ms} ms; 3 missed = dead)")
    mean = sum(gaps[1:]) / max(1, len(gaps) - 1)
    return (f"{len(beats)} heartbeats, mean gap {mean * 1000:.0f} ms, worst {worst * 1000:.0f} ms"
            f" (interval {k.heartbeat_ms} ms)")


async def sync_empty(run: Run) -> str:
    """``state.sync`` with no apps and no instances gets a REPLY."""
    k = run.kernel
    sent = time.monotonic()
    answer = await k.request("state.sync", {"apps": [], "instances": []}, SYNC_TIMEOUT_S)
    if answer is None:
        raise CheckFailed(f"no answer to state.sync within {SYNC_TIMEOUT_S:.0f} s{_status(run)}")
    if isinstance(answer.body, Error):
        raise CheckFailed(f"state.sync answered ERROR {answer.body.code}: {answer.body.reason}")
    calls = f"; it asked the kernel {sorted(set(k.kernel_calls))}" if k.kernel_calls else ""
    return f"REPLY in {(answer.at - sent) * 1000:.0f} ms{calls}"


async def _check_sections(run: Run, sections: dict[str, Any]) -> ManifestChecked:
    answer = await run.kernel.request("manifest.check", {
        "app": "conformance", "directory": "/nonexistent/conformance", "sections": sections,
        "processes": {"web": {"command": "true", "instances": 1, "port": "http"}},
        "ports": {"http": 8000}, "offset": 0}, 5.0)
    if answer is None or not isinstance(answer.body, Reply):
        raise CheckFailed(f"manifest.check {json.dumps(sections)} answered {_describe(answer)}"
                          f"{_status(run)}")
    try:
        return ManifestChecked.model_validate(answer.body.result)
    except ValueError as exc:
        raise CheckFailed(f"manifest.check answered a result that is not ManifestChecked: "
                          f"{str(exc).splitlines()[0]}") from None


async def manifest_check(run: Run) -> str:
    """A driver declaring HELLO ``sections`` checks them with ``manifest.check``: nothing asked,
    nothing found; a section of the wrong type (not a table) and a section it does not own are
    problems located under the section's name, never a normalized section."""
    assert run.hello is not None
    if not run.hello.sections and "manifest.check" not in run.ops:
        return "owns no manifest sections"
    if not run.hello.sections:
        raise CheckFailed("serves manifest.check but declares no sections in HELLO")
    empty = await _check_sections(run, {})
    if empty.problems or empty.sections:
        raise CheckFailed(f"manifest.check of no sections answered {empty.model_dump()}")
    probe = next(f"conformance_probe{n}" for n in range(100)
                 if f"conformance_probe{n}" not in run.hello.sections)
    for name, value in [*((s, 42) for s in run.hello.sections), (probe, {})]:
        got = await _check_sections(run, {name: value})
        if name in got.sections:
            raise CheckFailed(f"manifest.check accepted [{name}] = {json.dumps(value)}")
        if not got.problems or any(not p.path or p.path[0] != name for p in got.problems):
            raise CheckFailed(f"manifest.check of [{name}] = {json.dumps(value)} answered "
                              f"problems {[p.model_dump() for p in got.problems]}, expected "
                              f"at least one, each located under {name!r}")
    return (f"sections {run.hello.sections}: wrong types and an unowned section are located "
            "problems")


async def request_undeclared(run: Run) -> str:
    """An operation the driver did not declare gets ERROR 404, and the driver keeps serving."""
    k = run.kernel
    cap = run.hello.capability if run.hello and run.hello.capability else "x"
    op = next(f"query.{cap}.conformance_probe{n}" for n in range(100)
              if f"query.{cap}.conformance_probe{n}" not in run.ops)
    undeclared = [o for o in LIFECYCLE_OPS if o not in run.ops][:1]
    since = time.monotonic()
    for name in [op, *undeclared]:
        answer = await k.request(name, {}, 5.0)
        if answer is None:
            raise CheckFailed(f"no answer to undeclared {name}{_status(run)}")
        if not isinstance(answer.body, Error) or answer.body.code != ErrorCode.UNKNOWN_OPERATION:
            raise CheckFailed(f"undeclared {name} answered {_describe(answer)}, expected "
                              f"ERROR {int(ErrorCode.UNKNOWN_OPERATION)}")
    await _still_serving(run, since, "an undeclared operation")
    return f"ERROR 404 for {[op, *undeclared]}, still serving"


async def request_malformed(run: Run) -> str:
    """Each declared lifecycle op answers ERROR 422 to arguments of the wrong types."""
    k = run.kernel
    since = time.monotonic()
    tried = []
    for name in sorted(o for o in run.ops if o in MALFORMED_ARGS):
        answer = await k.request(name, MALFORMED_ARGS[name], 5.0)
        if answer is None:
            raise CheckFailed(f"no answer to {name} with malformed args{_status(run)}")
        if not isinstance(answer.body, Error) or answer.body.code != ErrorCode.INVALID:
            raise CheckFailed(f"{name} {json.dumps(MALFORMED_ARGS[name])} answered "
                              f"{_describe(answer)}, expected ERROR {int(ErrorCode.INVALID)}")
        tried.append(name)
    await _still_serving(run, since, "malformed arguments")
    return f"ERROR 422 for {tried}, still serving"


async def _survive(run: Run, garbage: list[tuple[str, list[bytes]]], what: str) -> str:
    k = run.kernel
    since = time.monotonic()
    for _label, frames in garbage:
        await k.send_raw(frames)
    oversize_id = k.new_id()
    pad = b"x" * (MAX_BODY + 1)
    oversize = [SIGNATURE, b"REQUEST",
                b'{"id": %d, "op": "state.sync", "args": {"apps": [], "instances": [], '
                b'"pad": "%s"}}' % (oversize_id, pad)]
    await k.send_raw(oversize)
    await _still_serving(run, since, what)
    answered = [m for m in k.received if m.at > since and isinstance(m.body, Error)
                and m.body.id is None]
    processed = [m for m in k.received if m.at > since and isinstance(m.body, Reply)
                 and m.body.id == oversize_id]
    if processed:
        raise CheckFailed(f"driver processed a REQUEST whose body exceeds {MAX_BODY} bytes "
                          f"(it must refuse it, ERROR {int(ErrorCode.TOO_LARGE)} or drop)")
    return (f"{len(garbage) + 1} messages ({what}) dropped or refused "
            f"({len(answered)} ERROR answers), still serving")


async def garbage_ignored(run: Run) -> str:
    """Malformed and unexpected messages do not kill the driver nor its connection."""
    return await _survive(run, GARBAGE, "garbage frames")


async def garbage_hostile_json(run: Run) -> str:
    """Deeply nested JSON and huge numbers do not kill the driver nor its connection."""
    return await _survive(run, HOSTILE, "hostile JSON")


async def reconnect_after_silence(run: Run) -> str:
    """When the kernel is silent > 3 intervals, the driver HELLOs again on a new connection."""
    k = run.kernel
    old = k.identity
    k.beating = False
    silent = time.monotonic()
    limit = 3 * k.interval + HELLO_TIMEOUT_S
    msg = await k.next(limit, lambda m: is_hello(m) and m.identity != old)
    if msg is None:
        raise CheckFailed(f"no HELLO on a new connection within {limit:.1f} s of silence"
                          f"{_status(run)}")
    assert isinstance(msg.body, Hello)
    if msg.body.token != k.token:
        raise CheckFailed("the new HELLO does not carry CORRAL_DRIVER_TOKEN")
    after = msg.at - silent
    if after < 3 * k.interval * 0.9:
        raise CheckFailed(f"reconnected after {after:.2f} s, before 3 intervals of silence")
    await k.welcome(msg)
    answer = await k.request("state.sync", {"apps": [], "instances": []}, SYNC_TIMEOUT_S)
    if answer is None or not isinstance(answer.body, Reply):
        raise CheckFailed(f"after reconnecting, state.sync answered {_describe(answer)}")
    return f"HELLO on a new connection {after:.2f} s after the kernel went silent; re-synced"


async def exit_on_bye(run: Run) -> str:
    """On BYE from the kernel the driver exits within 5 s."""
    k = run.kernel
    sent = time.monotonic()
    await k.send(Bye(reason="conformance: kernel stopping"))
    status = await k.wait_exit(EXIT_TIMEOUT_S)
    if status is None:
        raise CheckFailed(f"still running {EXIT_TIMEOUT_S:.0f} s after BYE")
    return f"exited with status {status} {time.monotonic() - sent:.2f} s after BYE"


async def exit_on_sigterm(run: Run) -> str:
    """A freshly started, welcomed driver exits within 5 s of SIGTERM."""
    k = run.kernel
    await k.kill()
    await k.launch()
    msg = await k.next(HELLO_TIMEOUT_S, is_hello)
    if msg is None or not isinstance(msg.body, Hello) or msg.body.token != k.token:
        raise CheckFailed(f"restarted driver sent no valid HELLO{_status(run)}")
    await k.welcome(msg)
    await asyncio.sleep(2 * k.interval)
    sent = time.monotonic()
    k.signal(signal.SIGTERM)
    status = await k.wait_exit(EXIT_TIMEOUT_S)
    if status is None:
        raise CheckFailed(f"still running {EXIT_TIMEOUT_S:.0f} s after SIGTERM")
    elapsed = time.monotonic() - sent
    await asyncio.sleep(0.2)  # let the receiver decode a BYE sent just before the exit
    said_bye = any(isinstance(m.body, Bye) and m.at > sent for m in k.received)
    return (f"exited with status {status} {elapsed:.2f} s after SIGTERM"
            f"{' (said BYE first)' if said_bye else ' (no BYE sent)'}")


async def wire_valid(run: Run) -> str:
    """Every message the driver sent decoded as CDP/1 and was a command a driver may send."""
    k = run.kernel
    bad = [f"{m.command}: {m.error.reason}" for m in k.received if m.error is not None]
    bad += [f"{m.command}: a driver may not send it" for m in k.received
            if m.error is None and m.command not in DRIVER_SENDS]
    if bad:
        raise CheckFailed(f"{len(bad)} invalid messages, first: {bad[0]}")
    return f"{len(k.received)} messages, all valid CDP/1"


def _describe(msg: Received | None) -> str:
    if msg is None:
        return "nothing"
    if isinstance(msg.body, Error):
        return f"ERROR {msg.body.code} ({msg.body.reason})"
    return msg.command


def _spec(name: str, fn: Check, *, fatal: bool = False, needs_driver: bool = True) -> CheckSpec:
    return CheckSpec(name, fn, (fn.__doc__ or "").strip(), fatal, needs_driver)


CHECKS: list[CheckSpec] = [
    _spec("hello.arrives", hello_arrives, fatal=True, needs_driver=False),
    _spec("hello.role", hello_role, fatal=True, needs_driver=False),
    _spec("hello.protocol", hello_protocol, fatal=True, needs_driver=False),
    _spec("hello.token", hello_token, fatal=True, needs_driver=False),
    _spec("hello.capability", hello_capability, fatal=True, needs_driver=False),
    _spec("heartbeat.interval", heartbeat_interval),
    _spec("sync.empty", sync_empty),
    _spec("manifest.check", manifest_check),
    _spec("request.undeclared", request_undeclared),
    _spec("request.malformed", request_malformed),
    _spec("garbage.ignored", garbage_ignored),
    _spec("garbage.hostile_json", garbage_hostile_json),
    _spec("reconnect.after_silence", reconnect_after_silence),
    _spec("exit.bye", exit_on_bye),
    _spec("exit.sigterm", exit_on_sigterm, needs_driver=False),
    _spec("wire.valid", wire_valid, needs_driver=False),
]
"""The checks, in order. The only list of them: the CLI and the tests both run this one."""
