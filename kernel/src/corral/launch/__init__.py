"""The launch path: start one sandboxed process from a LaunchPlan, identify and signal it."""

from corral.launch._identity import become_subreaper, is_alive, reap, signal_instance
from corral.launch._spawn import launch
from corral.launch._unprivileged import Enforcement, capabilities, unprivileged_plan

__all__ = [
    "Enforcement",
    "become_subreaper",
    "capabilities",
    "is_alive",
    "launch",
    "reap",
    "signal_instance",
    "unprivileged_plan",
]
