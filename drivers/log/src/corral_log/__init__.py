"""corral log driver: capture through FIFOs, sinks with disk spools, tracebacks, metrics.

Importing this package is cheap: it only defines ``DRIVER``, what the ``corral.drivers``
entry point targets. The library lives in ``corral_log.records``, ``.framing``, ``.capture``,
``.sinks``, ``.spool``, ``.tracebacks``, ``.reading``, ``.metrics``, ``.service``, ``.driver``.
"""

from corral.protocol import DriverDescription

DRIVER = DriverDescription(
    name="log",
    capability="log",
    version="0.1.0",
    module="corral_log",
    doc="output capture through FIFOs, sinks (file, syslog, journald, Loki), tracebacks, metrics",
    sections={"logs": "corral_log.sections:LOGS"},
)

__all__ = ["DRIVER"]
