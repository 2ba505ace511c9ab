"""Turn pydantic's validation errors into "field: expected ..., got ..." sentences."""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from corral.manifest._locate import Path_
from corral.manifest._model import Manifest, render

_EXPECTED_BY_TYPE = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "list_type": "an array",
    "too_short": "a non-empty array",
}


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional; return a class, a generic alias, or a tuple of members."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = tuple(a for a in get_args(annotation) if a is not type(None))
            if len(members) != 1:
                return tuple(_unwrap(m) for m in members)
            annotation = members[0]
        else:
            return annotation


def _step(annotation: Any, part: str | int) -> tuple[Any, bool]:
    """Follow one loc segment; return (annotation, consumed) or (None, True) when lost."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, tuple):  # a union: the segment is a tag naming the member
        models = [m for m in annotation if isinstance(m, type) and issubclass(m, BaseModel)]
        for model in models:
            tag = model.model_fields.get("type")
            if tag is not None and part in get_args(_unwrap(tag.annotation)):
                return model, True
        return (models[0], False) if len(models) == 1 else (None, True)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return (None if field is None else field.annotation), True
    origin = get_origin(annotation)
    if origin is dict:
        return get_args(annotation)[1], True
    if origin is list:
        return get_args(annotation)[0], True
    return None, True


def _annotation_at(loc: tuple[str | int, ...]) -> Any:
    annotation: Any = Manifest
    for part in loc:
        while True:
            annotation, consumed = _step(annotation, part)
            if annotation is None or consumed:
                break
        if annotation is None:
            return None
    return _unwrap(annotation)


def _field_path(loc: tuple[str | int, ...], data: Any, *, keep_last: bool) -> Path_:
    """Keep the loc segments that exist in the document (dropping union tags and '[key]')."""
    path: list[str | int] = []
    for position, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
            path.append(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
            path.append(part)
        elif keep_last and position == len(loc) - 1 and part != "[key]":
            path.append(part)
    return tuple(path)


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    model = _annotation_at(loc[:-1])
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _toml_quotes(text: object) -> str:
    """pydantic lists choices as 'a', 'b'; TOML users write "a", "b"."""
    return str(text).replace("'", '"')


def describe(error: ErrorDetails, document: Any) -> tuple[Path_, str]:
    """Return the field path and the sentence for one pydantic error on ``document``."""
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx") or {}
    path = _field_path(loc, document, keep_last=kind == "missing")
    if kind == "corral":
        return path, str(ctx.get("message", error["msg"]))
    if kind == "missing":
        annotation = _annotation_at(loc)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return path, "required table is missing"
        return path, "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        message = f"unknown key (expected one of: {', '.join(allowed)})"
        return path, message + (f"; did you mean {hint[0]!r}?" if hint else "")
    if kind == "literal_error":
        return (
            path,
            f"expected {_toml_quotes(ctx.get('expected', 'one of the listed values'))}, "
            f"got {render(value)}",
        )
    if kind == "union_tag_invalid":
        return (
            path,
            f"expected type = one of {_toml_quotes(ctx.get('expected_tags', ''))}, "
            f"got {render(ctx.get('tag'))}",
        )
    if kind == "union_tag_not_found":
        annotation = _annotation_at(loc)
        tags = [
            f'"{arg}"'
            for member in (annotation if isinstance(annotation, tuple) else ())
            if isinstance(member, type) and issubclass(member, BaseModel)
            for arg in get_args(_unwrap(member.model_fields["type"].annotation))
        ]
        if not isinstance(value, dict):
            return (
                path,
                f"expected a table with type = one of {', '.join(tags)}, got {render(value)}",
            )
        return path, f"missing key 'type' (expected one of {', '.join(tags)})"
    if kind in _EXPECTED_BY_TYPE:
        return path, f"expected {_EXPECTED_BY_TYPE[kind]}, got {render(value)}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return path, f"{message[:1].lower()}{message[1:]}, got {render(value)}"
