"""The reference codec against the golden vectors in tests/protocol/vectors/ (see README.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from corral.errors import CorralError
from corral.protocol import BODIES, decode, encode

VECTORS = Path(__file__).with_name("vectors")
SCHEMAS = Path(__file__).parents[2] / "docs" / "schemas" / "bodies"


def _piece(piece: Any) -> str:
    if isinstance(piece, str):
        return piece
    return str(piece["repeat"]) * int(piece["times"])


def frame_bytes(frame: Any) -> bytes:
    """One frame of a vector as bytes."""
    if isinstance(frame, str):
        return frame.encode()
    if "hex" in frame:
        return bytes.fromhex(frame["hex"])
    return "".join(_piece(p) for p in frame["concat"]).encode()


def expand(value: Any) -> Any:
    """An expected body with its ``$concat`` strings built."""
    if isinstance(value, dict):
        if set(value) == {"$concat"}:
            return "".join(_piece(p) for p in value["$concat"])
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def load() -> list[tuple[str, dict[str, Any]]]:
    """Every vector with an id ``file:name``."""
    out = []
    for path in sorted(VECTORS.glob("*.json")):
        for vector in json.loads(path.read_text())["vectors"]:
            out.append((f"{path.stem}:{vector['name']}", vector))
    return out


ALL = load()


def _strict_json(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    return json.loads(raw.decode("utf-8"), parse_constant=no_constants)


@pytest.mark.parametrize(("vid", "vector"), ALL, ids=[v for v, _ in ALL])
def test_decode(vid: str, vector: dict[str, Any]) -> None:
    """decode() yields the expected body, or refuses with the expected code (and nothing else)."""
    frames = [frame_bytes(f) for f in vector["frames"]]
    if "error" in vector:
        with pytest.raises(CorralError) as info:
            decode(frames)
        assert int(info.value.code) == vector["error"], info.value.reason
        return
    body = decode(frames)
    assert type(body) is BODIES[vector["command"]]
    assert body.model_dump(mode="json") == expand(vector["body"])
    if vector.get("canonical"):
        assert encode(body) == frames


@pytest.mark.parametrize(("vid", "vector"), ALL, ids=[v for v, _ in ALL])
def test_schemas_agree(vid: str, vector: dict[str, Any]) -> None:
    """The published JSON Schema accepts each valid body and refuses each 422 JSON object."""
    require(importlib.util.find_spec("jsonschema") is not None, "needs the jsonschema package")
    import jsonschema

    frames = [frame_bytes(f) for f in vector["frames"]]
    if len(frames) != 3 or frames[1].decode(errors="replace") not in BODIES:
        return  # nothing for a body schema to say
    if "error" in vector and vector["error"] != 422:
        return
    try:
        data = _strict_json(frames[2])
    except (UnicodeDecodeError, ValueError, RecursionError):
        assert vector.get("error") == 422
        return
    schema = json.loads((SCHEMAS / f"{frames[1].decode()}.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if "error" in vector:
        assert errors, f"{vid}: the schema accepts a body the protocol refuses"
    else:
        assert not errors, f"{vid}: the schema refuses a valid body: {errors[0].message}"


def test_every_command_has_valid_and_invalid_vectors() -> None:
    """The vectors cover every command both ways."""
    valid = {v["command"] for _, v in ALL if "body" in v}
    refused = {frame_bytes(v["frames"][1]).decode() for _, v in ALL
               if v.get("error") == 422 and len(v["frames"]) == 3}
    assert valid == set(BODIES)
    assert set(BODIES) - {"BYE"} <= refused
