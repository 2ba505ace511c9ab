"""Fuzzing corral.protocol.decode: whatever the frames, it returns a body or raises CorralError."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import CorralError, ErrorCode
from corral.protocol import BODIES, SIGNATURE, Body, decode, encode

COMMANDS = [c.encode() for c in BODIES]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)
FIELDS = sorted({name for model in BODIES.values() for name in model.model_fields})
plausible = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values,
                            max_size=6)


def _decode(frames: list[bytes]) -> Body | None:
    """decode() or None when it refused with CorralError; anything else propagates."""
    try:
        return decode(frames)
    except CorralError as exc:
        assert isinstance(exc.code, ErrorCode)
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames(frames: list[bytes]) -> None:
    """Arbitrary frames never raise anything but CorralError."""
    _decode(frames)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(COMMANDS), st.binary(max_size=256))
def test_random_body_bytes(command: bytes, raw: bytes) -> None:
    """A known command with arbitrary body bytes never raises anything but CorralError."""
    _decode([SIGNATURE, command, raw])


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(COMMANDS), plausible)
def test_plausible_bodies_round_trip(command: bytes, data: dict[str, Any]) -> None:
    """A JSON object body decodes or is refused; a decoded body re-encodes to the same body."""
    body = _decode([SIGNATURE, command, json.dumps(data).encode()])
    if body is not None:
        assert decode(encode(body)) == body


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(COMMANDS), st.integers(1, 200_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting(command: bytes, depth: int, opener: str) -> None:
    """Nesting of any depth (within 1 MiB) is refused with CorralError, not RecursionError."""
    closer = "]" if opener == "[" else "}"
    raw = ('{"x":' + opener * depth + closer * depth + "}").encode()
    _decode([SIGNATURE, command, raw])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(COMMANDS), st.integers(1, 20_000))
def test_long_numbers(command: bytes, digits: int) -> None:
    """Integers of any length (within 1 MiB) are refused with CorralError or decoded."""
    raw = ('{"time":' + "9" * digits + "}").encode()
    _decode([SIGNATURE, command, raw])
