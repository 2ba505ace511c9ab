"""CDP/1 framing: [signature, command, body] multipart messages and their strict decoding."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from corral.errors import CorralError, ErrorCode
from corral.protocol._messages import BODIES, Body

SIGNATURE = b"CDP1"
MAX_BODY = 1 << 20  # 1 MiB: a larger body is refused with TOO_LARGE before it is parsed


def encode(body: Body) -> list[bytes]:
    """Frames for ``body``: signature, command, compact UTF-8 JSON."""
    command = _COMMAND_OF[type(body)]
    return [SIGNATURE, command.encode(), body.model_dump_json(exclude_none=False).encode()]


def decode(frames: list[bytes]) -> Body:
    """Parse frames (without any ROUTER identity) into a body model, or raise CorralError.

    Checks in order, cheapest first: frame count, signature, command (from the explicit
    table), size, UTF-8, JSON object, schema. No field of the body is looked at before all
    of these pass.
    """
    if len(frames) != 3:
        raise CorralError(f"expected 3 frames, got {len(frames)}", code=ErrorCode.BAD_FRAME)
    signature, command, raw = frames
    if signature != SIGNATURE:
        raise CorralError(
            f"bad signature {signature[:8]!r}, expected {SIGNATURE!r}", code=ErrorCode.BAD_FRAME
        )
    try:
        model = BODIES[command.decode("ascii")]
    except (UnicodeDecodeError, KeyError):
        raise CorralError(
            f"unknown command {command[:32]!r}", code=ErrorCode.BAD_FRAME
        ) from None
    if len(raw) > MAX_BODY:
        raise CorralError(
            f"body of {len(raw)} bytes exceeds {MAX_BODY}", code=ErrorCode.TOO_LARGE
        )
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, NaN, 4300+ digit ints
        raise CorralError(f"body is not UTF-8 JSON: {exc}", code=ErrorCode.INVALID) from None
    except RecursionError:  # hostile nesting: refuse it, never let it unwind the peer
        raise CorralError("body nests too deeply", code=ErrorCode.INVALID) from None
    if not isinstance(data, dict):
        raise CorralError("body must be a JSON object", code=ErrorCode.INVALID)
    try:
        return model.model_validate(data, strict=True)  # "5" is not an id, "yes" not a bool
    except ValidationError as exc:
        raise CorralError(
            f"invalid {command.decode()} body: {_first_problem(exc)}", code=ErrorCode.INVALID
        ) from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(body)"
    return f"{where}: {err['msg']}"


_COMMAND_OF: dict[type[Body], str] = {model: name for name, model in BODIES.items()}
