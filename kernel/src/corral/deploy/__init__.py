"""The deploy and teardown sequence, and the instances it keeps running (docs/kernel.md).

- ``_sequence``: ``Deployer``: deploy, scale, down and their undo; spawn; the kernel's entry.
- ``_instances``: ``Instances``: launch (plan, readiness, the rollout's join), supervision
  and restart, stop, adoption after a kernel restart.
- ``_jobs``: ``Jobs``: one-shot processes (cron runs) and their exit status.
- ``_drivers``: ``Drivers`` (the narrow interface) and ``DriverSet``: fan-out to drivers and
  what a launch needs of them.
- ``_state``: what is kept in memory per app and instance.
"""

from corral.deploy._drivers import DriverCallError, Drivers, DriverSet, all_or_first_failure
from corral.deploy._instances import Events, Instances, Launcher
from corral.deploy._sequence import Deployer
from corral.deploy._state import AppState, Live, spec_hash

__all__ = [
    "AppState",
    "Deployer",
    "DriverCallError",
    "DriverSet",
    "Drivers",
    "Events",
    "Instances",
    "Launcher",
    "Live",
    "all_or_first_failure",
    "spec_hash",
]
