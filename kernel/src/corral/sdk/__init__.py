"""What a Python driver imports: the ``Driver`` base, the ``op`` decorator and ``run``; and,
for ``corral host reset``, ``serve_reset`` with its request and report."""

from corral.sdk._driver import Driver, KernelLink, op, run
from corral.sdk._reset import ResetReport, ResetRequest, serve_reset

__all__ = ["Driver", "KernelLink", "ResetReport", "ResetRequest", "op", "run", "serve_reset"]
