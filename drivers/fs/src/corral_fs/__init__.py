"""corral fs driver: per-instance roots (mount views), cgroup limits, per-app users."""

from corral.protocol import DriverDescription

DRIVER = DriverDescription(
    name="fs",
    capability="fs",
    version="0.1.0",
    module="corral_fs.driver",
    reset="corral_fs.reset",
    doc="process sandbox: read-only system, granted paths, private /tmp, cgroup limits",
    sections={"limits": "corral_fs.sections:LIMITS"},
)
