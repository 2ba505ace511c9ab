"""What a Python driver imports: the ``Driver`` base, the ``op`` decorator and ``run``."""

from corral.sdk._driver import Driver, KernelLink, op, run

__all__ = ["Driver", "KernelLink", "op", "run"]
