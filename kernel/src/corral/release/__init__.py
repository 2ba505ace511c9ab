"""Releases: source snapshots, builds, config vars and secrets (WORKFLOW.md).

``_source`` decides which files a release takes and fingerprints them; ``_store`` keeps the
numbered releases (ledger records and directories); ``_config`` keeps config vars and the
root-only secrets; ``_build`` decides what a build runs. The deploy sequence
(``corral.deploy``) runs builds and release phases in the app's sandbox and rolls releases out.
"""

from corral.release._build import BuildPlan, Step, choose_python, host_pythons, uv_binary
from corral.release._build import plan as build_plan
from corral.release._config import MASK, AppConfig, ConfigStore, check_name
from corral.release._source import NEVER_SHIPPED, Snapshot, listing, remove_tree, snapshot
from corral.release._store import KIND, ReleaseStore

__all__ = [
    "KIND",
    "MASK",
    "NEVER_SHIPPED",
    "AppConfig",
    "BuildPlan",
    "ConfigStore",
    "ReleaseStore",
    "Snapshot",
    "Step",
    "build_plan",
    "check_name",
    "choose_python",
    "host_pythons",
    "listing",
    "remove_tree",
    "snapshot",
    "uv_binary",
]
