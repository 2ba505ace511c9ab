"""The CDP/1 conformance kit: start a driver as the kernel would and check it obeys CDP/1.

``python -m corral.conformance -- CMD ARGS...`` prints one PASS/FAIL line per check and exits
non-zero on any failure. From Python (pytest): ``run_kit(command).passed``.
"""

from corral.conformance._checks import CHECKS, CheckFailed, CheckSpec, Run
from corral.conformance._kit import KitResult, Outcome, run_checks, run_kit
from corral.conformance._stand_in import StandIn

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckSpec",
    "KitResult",
    "Outcome",
    "Run",
    "StandIn",
    "run_checks",
    "run_kit",
]
