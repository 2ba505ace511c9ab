"""The checked-in docs/schemas/ are exactly what the pydantic models generate now."""

from __future__ import annotations

from pathlib import Path

from corral.conformance._schemas import render, schemas
from corral.protocol import BODIES, KERNEL_OPS, LIFECYCLE_OPS

DOCS = Path(__file__).parents[2] / "docs" / "schemas"


def test_checked_in_schemas_are_current() -> None:
    """Regenerate with `python -m corral.conformance --write-schemas docs/schemas` if this fails."""
    wanted = {rel: render(schema) for rel, schema in schemas().items()}
    present = {p.relative_to(DOCS).as_posix(): p.read_text() for p in DOCS.rglob("*.json")}
    assert sorted(present) == sorted(wanted), "schema files added or removed"
    stale = [rel for rel in wanted if present[rel] != wanted[rel]]
    assert not stale, f"out of date: {stale}"


def test_every_body_and_operation_has_a_schema() -> None:
    """One schema per command, per kernel operation and per lifecycle operation."""
    rels = set(schemas())
    assert {f"bodies/{c}.json" for c in BODIES} <= rels
    assert {f"ops/kernel/{o}.json" for t in KERNEL_OPS.values() for o in t} <= rels
    assert {f"ops/driver/{o}.json" for o in LIFECYCLE_OPS} <= rels


def test_bodies_refuse_unknown_fields() -> None:
    """Every body schema says additionalProperties false, as the models do."""
    for command in BODIES:
        assert schemas()[f"bodies/{command}.json"]["additionalProperties"] is False
