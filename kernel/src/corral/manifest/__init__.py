"""The manifest: load ``corral.toml``, apply overrides, validate, and hand it to apps."""

from __future__ import annotations

from typing import Any

from corral.manifest._environment import app_environment
from corral.manifest._load import InstanceSlot, ResolvedManifest, load
from corral.manifest._model import Manifest


def schema() -> dict[str, Any]:
    """Return the JSON Schema of ``corral.toml`` (what `corral schema` prints)."""
    return Manifest.model_json_schema()


__all__ = [
    "InstanceSlot",
    "Manifest",
    "ResolvedManifest",
    "app_environment",
    "load",
    "schema",
]
