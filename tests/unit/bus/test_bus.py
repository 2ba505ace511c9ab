"""The kernel's bus refuses bad input with an ERROR (or a refusal) and keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require
from corral.errors import ErrorCode
from corral.protocol import PROTOCOL, Hello, encode
from corral.testing import KernelProcess, running_kernel

# no drivers at all, so no sandbox: said on purpose, as a host must (else deploys are refused)
NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    with running_kernel(tmp_path_factory.mktemp("bus"), NO_DRIVERS) as k:
        yield k


def _dealer(kernel: KernelProcess) -> zmq.Socket[bytes]:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 3000
    s.connect(kernel.endpoint)
    return s


def _hello() -> list[bytes]:
    return encode(Hello(role="client", name="test", version="0", protocols=[PROTOCOL]))


def _welcomed(kernel: KernelProcess) -> zmq.Socket[bytes]:
    s = _dealer(kernel)
    s.send_multipart(_hello())
    frames = s.recv_multipart()
    assert frames[1] == b"WELCOME", frames
    return s


def _error(s: zmq.Socket[bytes]) -> dict[str, object]:
    while True:
        frames = s.recv_multipart()
        if frames[1] != b"HEARTBEAT":
            break
    assert frames[0] == b"CDP1" and frames[1] == b"ERROR", frames
    body: dict[str, object] = json.loads(frames[2])
    return body


def _still_serving(kernel: KernelProcess) -> None:
    assert kernel.call("kernel.status", timeout=5)["protocol"] == PROTOCOL


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"CDP1", b"HELLO"], ErrorCode.BAD_FRAME),
        ([b"CDP1", b"HELLO", b"{}", b"extra"], ErrorCode.BAD_FRAME),
        ([b"CDP2", b"HELLO", b"{}"], ErrorCode.BAD_FRAME),
        ([b"CDP1", b"LAUNCH", b"{}"], ErrorCode.BAD_FRAME),
        ([b"CDP1", b"HELLO", b"{not json"], ErrorCode.INVALID),
        ([b"CDP1", b"HELLO", b"\xff\xfe"], ErrorCode.INVALID),
        ([b"CDP1", b"HELLO", b"[1, 2]"], ErrorCode.INVALID),
        ([b"CDP1", b"HELLO", b'{"role": "king"}'], ErrorCode.INVALID),
        ([b"CDP1", b"REQUEST", b'{"id": 1, "op": "app.ps", "args": {}}'],
         ErrorCode.UNAUTHENTICATED),
    ],
    ids=["two-frames", "four-frames", "wrong-signature", "unknown-command", "invalid-json",
         "not-utf8", "not-an-object", "schema", "request-before-hello"],
)
def test_malformed_input_gets_error_and_kernel_keeps_serving(
    kernel: KernelProcess, frames: list[bytes], code: ErrorCode
) -> None:
    """Each malformed message is answered with ERROR <code>; the kernel keeps serving."""
    s = _dealer(kernel)
    s.send_multipart(frames)
    assert _error(s)["code"] == code
    s.close()
    _still_serving(kernel)


def test_oversized_body_is_refused(kernel: KernelProcess) -> None:
    """A body over 1 MiB gets ERROR 413; over 4 MiB the connection is dropped; still serving."""
    s = _welcomed(kernel)
    big = json.dumps({"id": 1, "op": "app.ps", "args": {"x": "a" * (1 << 20)}}).encode()
    s.send_multipart([b"CDP1", b"REQUEST", big])
    assert _error(s)["code"] == ErrorCode.TOO_LARGE
    huge = b"x" * (5 << 20)
    s.send_multipart([b"CDP1", b"REQUEST", huge])
    with pytest.raises(zmq.Again):
        while True:
            assert s.recv_multipart()[1] == b"HEARTBEAT"
    s.close()
    _still_serving(kernel)


def test_unknown_and_forbidden_operations(kernel: KernelProcess) -> None:
    """Ops are looked up in the role's table: unknown -> 404, another role's -> 403."""
    s = _welcomed(kernel)
    for op, code in (("app.explode", ErrorCode.UNKNOWN_OPERATION),
                     ("instance.spawn", ErrorCode.FORBIDDEN),
                     ("__init__", ErrorCode.UNKNOWN_OPERATION)):
        s.send_multipart([b"CDP1", b"REQUEST",
                          json.dumps({"id": 7, "op": op, "args": {}}).encode()])
        err = _error(s)
        assert err["code"] == code, (op, err)
        assert err["id"] == 7
    s.send_multipart([b"CDP1", b"REQUEST",
                      json.dumps({"id": 8, "op": "app.down", "args": {"nme": "x"}}).encode()])
    err = _error(s)
    assert err["code"] == ErrorCode.INVALID and "name" in str(err["reason"])
    s.close()
    _still_serving(kernel)


def test_driver_hello_without_token_is_refused(kernel: KernelProcess) -> None:
    """Only processes the supervisor started (holding the token) may speak as drivers."""
    s = _dealer(kernel)
    s.send_multipart(encode(Hello(role="driver", name="rogue", version="0", protocols=[PROTOCOL],
                                  capability="net", ops=["state.sync"], token="guess")))
    err = _error(s)
    assert err["code"] == ErrorCode.UNAUTHENTICATED and "TOKEN" in str(err["reason"])
    s.close()


def test_no_common_protocol_version(kernel: KernelProcess) -> None:
    """A peer that offers only CDP/2 is refused with 426."""
    s = _dealer(kernel)
    s.send_multipart(encode(Hello(role="client", name="future", version="9",
                                  protocols=["CDP/2"])))
    assert _error(s)["code"] == ErrorCode.VERSION
    s.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_fuzzed_frames_never_break_the_kernel(kernel: KernelProcess, frames: list[bytes]) -> None:
    """Random frames get an ERROR or nothing; the kernel answers a real request right after."""
    s = _dealer(kernel)
    if frames:
        s.send_multipart(frames)
    s.close()
    _still_serving(kernel)


@pytest.mark.root
def test_foreign_uid_is_refused_before_decoding() -> None:
    """A peer whose uid is not admitted never gets an answer, even with the socket reachable.

    The runtime dir is 0700 (the first barrier); here it is opened up on purpose so the ZAP
    handler is the only barrier left, and it must hold.
    """
    base = Path(tempfile.mkdtemp(prefix="corral-zap-", dir="/tmp"))
    os.chmod(base, 0o755)  # pytest's tmp_path is 0700: uid 65534 could not even reach the socket
    with KernelProcess(base, NO_DRIVERS) as k:
        os.chmod(k.runtime, 0o755)
        os.chmod(k.runtime / "bus.sock", 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child becomes uid 65534 and tries
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                ctx = zmq.Context()
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.rcvtimeo = 2000
                s.connect(k.endpoint)
                s.send_multipart(_hello())
                try:
                    s.recv_multipart()
                    os.write(w, b"answered")
                except zmq.Again:
                    os.write(w, b"refused")
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        outcome = os.read(r, 64)
        os.close(r)
        assert outcome == b"refused"
        deadline = time.monotonic() + 2
        while "peer refused" not in k.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "peer refused" in k.log()
        _still_serving(k)
    shutil.rmtree(base, ignore_errors=True)


def test_runtime_dir_is_private(kernel: KernelProcess) -> None:
    """The bus sockets live in a 0700 directory and are 0600 themselves."""
    require(kernel.runtime.exists(), "kernel runtime dir")
    assert kernel.runtime.stat().st_mode & 0o777 == 0o700
    assert (kernel.runtime / "bus.sock").stat().st_mode & 0o777 == 0o600
