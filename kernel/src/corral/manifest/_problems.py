"""Turn pydantic's validation errors on the kernel's sections into located sentences."""

from __future__ import annotations

from typing import Any

from pydantic_core import ErrorDetails

from corral.manifest._locate import Path_
from corral.manifest._model import Manifest
from corral.sdk import sections


def describe(error: ErrorDetails, document: Any) -> tuple[Path_, str]:
    """Return the field path and the sentence for one pydantic error on ``document``."""
    return sections.describe(error, document, Manifest)
