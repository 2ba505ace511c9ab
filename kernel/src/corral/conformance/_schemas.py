"""JSON Schemas of CDP/1, generated from the pydantic models (the models are the contract).

Layout of the output directory:
``bodies/<COMMAND>.json`` (each message body), ``ops/kernel/<op>.json`` (args of operations the
kernel serves; ``x-roles`` names the peer roles allowed to call it), ``ops/driver/<op>.json``
(args of lifecycle operations drivers serve), ``lifecycle/<Model>.json`` (AppSpec, PlanFragment
and friends, e.g. the result of ``instance.prepare``; ``ManifestChecked``, the result of
``manifest.check``), and ``index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from corral.protocol import (
    BODIES,
    KERNEL_OPS,
    LIFECYCLE_OPS,
    PROTOCOL,
    AppSpec,
    BindMount,
    InstanceRecord,
    InstanceSpec,
    LaunchPlan,
    ManifestChecked,
    PlanFragment,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"
LIFECYCLE_MODELS: tuple[type[BaseModel], ...] = (
    AppSpec, InstanceSpec, InstanceRecord, BindMount, PlanFragment, LaunchPlan, ManifestChecked,
)


def _schema(model: type[BaseModel], path: str, **extra: Any) -> dict[str, Any]:
    return {"$schema": DRAFT, "$id": f"cdp1/{path}", **model.model_json_schema(), **extra}


def schemas() -> dict[str, dict[str, Any]]:
    """Every schema of CDP/1 by relative path, in a stable order."""
    out: dict[str, dict[str, Any]] = {}
    index: dict[str, Any] = {"protocol": PROTOCOL, "bodies": {}, "kernel_ops": {},
                             "driver_ops": {}, "lifecycle": {}}
    for command, body in BODIES.items():
        path = f"bodies/{command}.json"
        out[path] = _schema(body, path)
        index["bodies"][command] = path
    roles: dict[str, list[str]] = {}
    for role, table in KERNEL_OPS.items():
        for name in table:
            roles.setdefault(name, []).append(role)
    for name in sorted(roles):
        op = next(t[name] for t in KERNEL_OPS.values() if name in t)
        path = f"ops/kernel/{name}.json"
        out[path] = _schema(op.args, path, description=op.doc, **{"x-roles": sorted(roles[name])})
        index["kernel_ops"][name] = {"schema": path, "roles": sorted(roles[name]), "doc": op.doc}
    for name, op in LIFECYCLE_OPS.items():
        path = f"ops/driver/{name}.json"
        out[path] = _schema(op.args, path, description=op.doc)
        index["driver_ops"][name] = {"schema": path, "doc": op.doc}
    for model in LIFECYCLE_MODELS:
        path = f"lifecycle/{model.__name__}.json"
        out[path] = _schema(model, path)
        index["lifecycle"][model.__name__] = path
    out["index.json"] = index
    return out


def render(schema: dict[str, Any]) -> str:
    """The exact text written for ``schema`` (the checked-in files are compared to it)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema under ``directory``; remove stale ``*.json`` there. The files written."""
    wanted = schemas()
    written = []
    for rel, schema in wanted.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(schema))
        written.append(path)
    for stale in directory.rglob("*.json"):
        if stale.relative_to(directory).as_posix() not in wanted:
            stale.unlink()
    return written
