"""The manifest's ``[limits]`` section: its schema (cgroup limits), owned by the fs driver.
Cheap to import: ``corral check`` loads it without starting the driver."""

from __future__ import annotations

from corral.sdk.sections import Cpu, Positive, PositiveSize, Section, SectionModel

_Section = SectionModel


class Limits(_Section):
    """``[limits]``: cgroup limits; unset means the host default."""

    processes: Positive | None = None
    memory: PositiveSize | None = None
    cpu: Cpu | None = None


LIMITS = Section("limits", Limits, doc="cgroup limits of every process of the app")
