"""What a Python driver imports: the ``Driver`` base, the ``op`` decorator and ``run``.

``corral.sdk.sections`` (how a driver owns manifest sections) is cheap to import; the names
below load the runtime (the bus, ZeroMQ) on first use, so importing it does not.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.sdk._driver import Driver, KernelLink, op, run

__all__ = ["Driver", "KernelLink", "op", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("corral.sdk._driver"), name)
    raise AttributeError(f"module 'corral.sdk' has no attribute {name!r}")
