"""The launch path: start one sandboxed process from a LaunchPlan, identify and signal it."""

from corral.launch._identity import (
    become_subreaper,
    describe_exit,
    is_alive,
    reap,
    signal_instance,
    take_fd,
    terminate,
    wait_exit,
)
from corral.launch._spawn import launch
from corral.launch._unprivileged import Enforcement, capabilities, unprivileged_plan

__all__ = [
    "Enforcement",
    "become_subreaper",
    "capabilities",
    "describe_exit",
    "is_alive",
    "launch",
    "reap",
    "signal_instance",
    "take_fd",
    "terminate",
    "unprivileged_plan",
    "wait_exit",
]
