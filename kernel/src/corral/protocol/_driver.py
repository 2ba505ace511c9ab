"""What a driver package's entry point targets: a cheap description, never the driver class."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DriverDescription:
    """A driver as the supervisor needs to know it before starting it.

    ``module`` is run as ``python -m module`` with the kernel's interpreter; ``argv`` instead
    runs an executable (drivers in other languages). Importing the description must not
    import the driver's code or its dependencies.

    ``reset`` (optional) names a module that ``corral host reset`` runs as
    ``python -m reset`` to find and remove what the driver leaves on the host outside the
    runtime dir (namespaces, nft tables, mounts, cgroups), by its naming conventions alone: the
    home and the ledger may be gone. Its contract is :mod:`corral.sdk` ``serve_reset``: a
    JSON request on stdin, a JSON report on stdout.
    """

    name: str
    capability: str
    version: str
    module: str | None = None
    argv: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("CDP/1",)
    doc: str = field(default="")
    reset: str | None = None
    sections: dict[str, str] = field(default_factory=dict)
    """The manifest sections the driver owns: section name -> ``"module:attribute"`` of its
    ``corral.sdk.sections.Section``, in a module cheap to import (pydantic, corral.units,
    corral.errors, corral.protocol, corral.sdk.sections). ``corral check`` loads it without
    starting the driver; the running driver serves the same check as ``manifest.check``."""

    def command(self) -> list[str]:
        """The command line that starts this driver."""
        if self.argv:
            return list(self.argv)
        if self.module is None:
            raise ValueError(f"driver {self.name!r} has neither module nor argv")
        return [sys.executable, "-m", self.module]

    def reset_command(self) -> list[str] | None:
        """The command line of this driver's host reset (None: it leaves nothing to reset)."""
        return [sys.executable, "-m", self.reset] if self.reset else None
