"""The manifest: load ``corral.toml``, apply overrides, validate, and hand it to apps."""

from __future__ import annotations

from typing import Any

from corral.manifest._environment import app_environment
from corral.manifest._load import Draft, InstanceSlot, ResolvedManifest, load, read
from corral.manifest._model import Manifest, PlacementSection
from corral.manifest._owners import LocalOwners


def schema(owners: LocalOwners | None = None) -> dict[str, Any]:
    """Return the JSON Schema of ``corral.toml`` (what `corral schema` prints): the kernel's
    sections and those of the drivers this host enables (``owners``), each from its owner."""
    document = Manifest.model_json_schema()
    owners = owners if owners is not None else LocalOwners.installed()
    for name, section in owners.schemas().items():
        defs = section.pop("$defs", {})
        document.setdefault("$defs", {}).update(defs)
        document["properties"][name] = section
    return document


__all__ = [
    "Draft",
    "InstanceSlot",
    "LocalOwners",
    "Manifest",
    "PlacementSection",
    "ResolvedManifest",
    "app_environment",
    "load",
    "read",
    "schema",
]
