"""What a Python driver imports: the ``Driver`` base, the ``op`` decorator and ``run``;
``inherited_sockets`` (the listening sockets the kernel kept for it); and, for ``corral host
reset``, ``serve_reset`` with its request and report.

``corral.sdk.sections`` (how a driver owns manifest sections) is cheap to import; the names
below load the runtime (the bus, ZeroMQ) on first use, so importing it does not.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.sdk._driver import Driver, KernelLink, op, run
    from corral.sdk._reset import ResetReport, ResetRequest, serve_reset
    from corral.sdk._sockets import inherited_sockets

_HOMES = {"Driver": "_driver", "KernelLink": "_driver", "op": "_driver", "run": "_driver",
          "ResetReport": "_reset", "ResetRequest": "_reset", "serve_reset": "_reset",
          "inherited_sockets": "_sockets"}
__all__ = ["Driver", "KernelLink", "ResetReport", "ResetRequest", "inherited_sockets", "op",
           "run", "serve_reset"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        return getattr(import_module(f"corral.sdk.{home}"), name)
    raise AttributeError(f"module 'corral.sdk' has no attribute {name!r}")
