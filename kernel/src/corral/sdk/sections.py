"""How a driver owns manifest sections: their value types, the checker, and its problems.

A driver declares the sections it owns in its entry point's ``DriverDescription.sections``
(section name -> ``"module:attribute"`` of a :class:`Section`). The module holding it must be
cheap to import: pydantic, ``corral.units``, ``corral.errors``, ``corral.protocol`` and this
module only. ``corral check`` imports it without starting the driver; the running driver serves
the same check as the ``manifest.check`` operation (the SDK does it from the description).

A :class:`Section` is the section's schema (one pydantic model, the same one the driver reads
its runtime configuration with) plus a cross-check that sees the kernel's resolved
``[processes]`` and ``[ports]`` and reports, through :class:`Report`, problems located by
field path, the resources to claim in the deploy's ledger transaction, the processes started
on demand and the ports the section holds. The kernel knows nothing else of the section.

Atomic values (names, ports, sizes, durations) are annotated types whose validator raises a
``corral`` error carrying the full "expected ..., got ..." sentence; :func:`describe` turns
the other pydantic errors into such sentences.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Annotated, Any, NoReturn, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from corral.protocol import (
    ClaimItem,
    ManifestCheck,
    ManifestChecked,
    SectionPort,
    SectionProblem,
)
from corral.units import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnitError,
    parse_duration,
    parse_size,
)

Path_ = tuple[str | int, ...]
"""A field path: table keys and array indexes, e.g. ("logs", "sinks", 0, "path")."""

# --- rendering and failing ---------------------------------------------------------------------


def render(value: object) -> str:
    """Show a TOML value the way it was written, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return '"' + shown.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"  # TOML dates and times


def fail(expected: str, value: object, hint: str | None = None) -> NoReturn:
    """Raise the validation error "expected <expected>, got <value> (<hint>)"."""
    message = f"expected {expected}, got {render(value)}" + (f" ({hint})" if hint else "")
    raise PydanticCustomError("corral", "{message}", {"message": message})


def json_schema(**schema: Any) -> WithJsonSchema:
    """The JSON Schema `corral schema` shows for an annotated value type."""
    return WithJsonSchema(schema)


# --- names -------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
NAME_EXPECTED = "a name of lowercase letters, digits, '-' and '_', starting with a letter"


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        fail(NAME_EXPECTED, value)
    return value


def is_hostname(value: str) -> bool:
    """Whether ``value`` is a DNS name (labels of letters, digits and '-', dot-separated)."""
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not is_hostname(value):
        fail('a DNS name such as "shop.example.test"', value)
    return value


def _non_empty(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        fail("a non-empty string", value)
    return value


Name = Annotated[str, BeforeValidator(_name), json_schema(type="string", pattern=_NAME.pattern)]
Hostname = Annotated[str, BeforeValidator(_hostname), json_schema(type="string", format="hostname")]
Text = Annotated[str, BeforeValidator(_non_empty), json_schema(type="string", minLength=1)]

# --- numbers -----------------------------------------------------------------------------------


def check_port(value: object, offset: int = 0) -> int:
    """``value`` as a port 1..65535; ``offset`` (``--offset``, already added) is named in the
    message when it pushed the port out of range."""
    if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 65535:
        if offset:
            raise PydanticCustomError(
                "corral",
                "{message}",
                {
                    "message": f"expected a port 1..65535, got {value - offset} + --offset "
                    f"{offset} = {value}"
                },
            )
        fail("an integer 1..65535", value)
    if not isinstance(value, int) or isinstance(value, bool):
        fail("an integer 1..65535", value)
    return value


def _port(value: object, info: ValidationInfo) -> int:
    """A port; ``--offset`` (the validation context's ``offset``) was added already."""
    return check_port(value, int((info.context or {}).get("offset", 0)))


def count(minimum: int, maximum: int | None = None) -> Any:
    """A validator of integers minimum..maximum (no bools)."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}..{maximum}"

    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            fail(expected, value)
        if maximum is not None and value > maximum:
            fail(expected, value)
        return value

    return check


def _positive_number(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type, operator]
        fail("a number > 0, such as 1.5", value)
    return float(value)  # type: ignore[arg-type]


def _size(positive: bool) -> Any:
    def check(value: object) -> int:
        try:
            size = parse_size(value)
        except UnitError as exc:
            fail(exc.expected, value, exc.hint)
        if positive and size == 0:
            fail(f"{SIZE_EXPECTED}, larger than 0", value)
        return size

    return check


def _duration(positive: bool) -> Any:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except UnitError as exc:
            fail(exc.expected, value, exc.hint)
        if positive and seconds == 0:
            fail(f"{DURATION_EXPECTED}, longer than 0", value)
        return seconds

    return check


_SIZE_SCHEMA = json_schema(
    anyOf=[{"type": "integer", "minimum": 0}, {"type": "string", "examples": ["512MiB", "100MB"]}]
)
_DURATION_SCHEMA = json_schema(
    anyOf=[{"type": "number", "minimum": 0}, {"type": "string", "examples": ["500ms", "1h30m"]}]
)

Port = Annotated[int, BeforeValidator(_port), json_schema(type="integer", minimum=1, maximum=65535)]
Positive = Annotated[int, BeforeValidator(count(1)), json_schema(type="integer", minimum=1)]
NonNegative = Annotated[int, BeforeValidator(count(0)), json_schema(type="integer", minimum=0)]
Cpu = Annotated[
    float, BeforeValidator(_positive_number), json_schema(type="number", exclusiveMinimum=0)
]
Size = Annotated[int, BeforeValidator(_size(False)), _SIZE_SCHEMA]
PositiveSize = Annotated[int, BeforeValidator(_size(True)), _SIZE_SCHEMA]
Duration = Annotated[float, BeforeValidator(_duration(False)), _DURATION_SCHEMA]
PositiveDuration = Annotated[float, BeforeValidator(_duration(True)), _DURATION_SCHEMA]


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def format_path(path: Path_) -> str:
    """Render a field path as people write it: ``logs.sinks[0].path``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if part and all(c in _BARE_KEY for c in part) else f'"{part}"'
            out += f".{text}" if out else text
    return out


# --- problems ----------------------------------------------------------------------------------

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


def _annotation_at(root: Any, loc: tuple[str | int, ...]) -> Any:
    annotation: Any = root
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


def _allowed_keys(root: Any, loc: tuple[str | int, ...]) -> list[str]:
    model = _annotation_at(root, loc[:-1])
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _toml_quotes(text: object) -> str:
    """pydantic lists choices as 'a', 'b'; TOML users write "a", "b"."""
    return str(text).replace("'", '"')


def describe(error: ErrorDetails, document: Any, root: Any) -> tuple[Path_, str]:
    """Return the field path and the sentence for one pydantic error on ``document``, whose
    type is ``root`` (a model class or a type annotation)."""
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx") or {}
    path = _field_path(loc, document, keep_last=kind == "missing")
    if kind == "corral":
        return path, str(ctx.get("message", error["msg"]))
    if kind == "missing":
        annotation = _annotation_at(root, loc)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return path, "required table is missing"
        return path, "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc)
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
        annotation = _annotation_at(root, loc)
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


# --- the checker ---------------------------------------------------------------------------------


class SectionModel(BaseModel):
    """Base of section models: strict, and unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass
class Report:
    """What a section's cross-check tells the kernel, besides the normalized value."""

    section: str
    problems: list[SectionProblem] = field(default_factory=list)
    claims: list[ClaimItem] = field(default_factory=list)
    on_demand: list[str] = field(default_factory=list)
    ports: list[SectionPort] = field(default_factory=list)

    def problem(self, path: Path_, message: str) -> None:
        """A problem at ``path`` inside the section (``()``: the section itself)."""
        self.problems.append(SectionProblem(path=[self.section, *path], message=message))

    def claim(self, kind: str, key: str, value: dict[str, Any] | None = None) -> None:
        """A resource the deploy claims in its one ledger transaction (kind "port", "lbname")."""
        self.claims.append(ClaimItem(kind=kind, key=key, value=dict(value or {})))

    def port(self, path: Path_, port: int) -> None:
        """A port the section holds: it must differ from every other port of the manifest."""
        self.ports.append(SectionPort(path=[self.section, *path], port=port))

    def start_on_demand(self, process: str) -> None:
        """``process`` gets no instance at deploy: the driver asks for one (instance.spawn)."""
        self.on_demand.append(process)


CrossCheck = Callable[[Any, ManifestCheck, Report], Any]
"""``check(value, context, report) -> value``: rules across fields and sections; returns the
value to keep (with what it resolved filled in)."""


@dataclass(frozen=True)
class Section:
    """One manifest section a driver owns.

    ``schema``: the type of the section's value, a model class or an annotation such as
    ``dict[str, CronJob]``; it is validated with the context ``{"offset", "app"}``.
    ``check``: the cross-check run on a valid value. ``offset_ports``: paths inside the
    section of integer ports that ``--offset`` moves.
    """

    name: str
    schema: Any
    check: CrossCheck | None = None
    offset_ports: tuple[Path_, ...] = ()
    doc: str = ""

    def adapter(self) -> TypeAdapter[Any]:
        """The pydantic adapter of ``schema``."""
        return _adapter(self.schema)

    def run(self, raw: Any, context: ManifestCheck) -> tuple[Any, Report]:
        """Validate ``raw`` (the section as written) and cross-check it; the JSON value (None
        when there are problems) and the report."""
        report = Report(self.name)
        data = copy.deepcopy(raw)
        if context.offset:
            for path in self.offset_ports:
                _shift(data, path, context.offset)
        try:
            value = self.adapter().validate_python(
                data, context={"offset": context.offset, "app": context.app})
        except ValidationError as exc:
            for error in exc.errors():
                path, message = describe(error, data, self.schema)
                report.problem(path, message)
            return None, report
        if self.check is not None:
            value = self.check(value, context, report)
        if report.problems:
            return None, report
        return self.adapter().dump_python(value, mode="json"), report


_ADAPTERS: dict[int, TypeAdapter[Any]] = {}


def _adapter(schema: Any) -> TypeAdapter[Any]:
    found = _ADAPTERS.get(id(schema))
    if found is None:
        found = _ADAPTERS[id(schema)] = TypeAdapter(schema)
    return found


def _shift(data: Any, path: Path_, offset: int) -> None:
    *parents, last = path
    for part in parents:
        if isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return
    if isinstance(data, dict) and last in data:
        value = data[last]
        if isinstance(value, int) and not isinstance(value, bool):
            data[last] = value + offset


def load_section(target: str) -> Section:
    """Import the ``"module:attribute"`` a DriverDescription names; it must be a Section."""
    module, _, attribute = target.partition(":")
    found = getattr(import_module(module), attribute)
    if not isinstance(found, Section):
        raise TypeError(f"{target} is a {type(found).__name__}, not a corral.sdk.sections.Section")
    return found


def merge_checked(into: ManifestChecked, one: ManifestChecked) -> ManifestChecked:
    """Add one owner's ``manifest.check`` answer to ``into`` (sections, claims, on-demand
    processes, ports, problems); return ``into``."""
    into.sections.update(one.sections)
    into.claims += one.claims
    into.on_demand += one.on_demand
    into.ports += one.ports
    into.problems += one.problems
    return into


def check_sections(owned: Mapping[str, Section], args: ManifestCheck) -> ManifestChecked:
    """Run the owned sections' checks on ``args.sections``; the ``manifest.check`` answer. A
    section in ``args`` that is not in ``owned`` is a problem (it was sent to the wrong owner)."""
    out = ManifestChecked()
    for name, raw in args.sections.items():
        section = owned.get(name)
        if section is None:
            out.problems.append(SectionProblem(
                path=[name], message=f"section [{name}] is not one this driver owns "
                f"({', '.join(sorted(owned)) or 'none'})"))
            continue
        value, report = section.run(raw, args)
        out.problems += report.problems
        if value is not None:
            out.sections[name] = value
            out.claims += report.claims
            out.on_demand += report.on_demand
            out.ports += report.ports
    return out
