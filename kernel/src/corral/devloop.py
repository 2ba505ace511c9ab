"""``corral dev``: the dev loop. The app runs in the foreground with its production contract.

Same resolved manifest, same environment (PORT, CORRAL_*, CORRAL_MANIFEST), same working
directory as under the kernel, and the same launch path. As a user, the mount view (system
read-only, the app directory read-only, the manifest's [paths] with their modes, a private
/tmp and pid namespace) is built in a user namespace where the host allows one; what cannot
be enforced is said once, plainly, before the app starts. As root, the app runs as nobody.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corral import launch as launcher
from corral import manifest as manifests
from corral.protocol import BindMount, InstanceSpec

NOBODY = 65534


def run_foreground(directory: Path, *, set_: list[str], offset: int, env: list[str]) -> int:
    """Start every instance of the app on this terminal; stop them all on Ctrl-C/SIGTERM."""
    resolved = manifests.load(directory, set_=set_, offset=offset, env=env)
    doc = resolved.as_json()
    tmp = Path(tempfile.mkdtemp(prefix="corral-run-"))
    running: list[tuple[str, int, float]] = []
    try:
        return _start_and_wait(resolved, doc, tmp, running)
    except BaseException:
        # a launch failed part-way: what started must not outlive the run it belongs to
        for _iid, pid, start in running:
            launcher.signal_instance(pid, start, signal.SIGKILL, group=True)
            launcher.reap(pid)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the resolved manifest the instances read


def _start_and_wait(resolved: manifests.ResolvedManifest, doc: dict[str, Any], tmp: Path,
                    running: list[tuple[str, int, float]]) -> int:
    """Write the manifest into ``tmp``, start every instance (appended to ``running``), wait."""
    manifest_path = tmp / "manifest.json"
    manifest_path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.chmod(tmp, 0o755)
    os.chmod(manifest_path, 0o644)
    grants = [BindMount(source=str(tmp), target=str(tmp), mode="ro")]
    for grant in (doc.get("paths") or {}).values():
        path = Path(grant["path"])
        if grant.get("create") and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, NOBODY, NOBODY)
        grants.append(BindMount(source=str(path), target=str(path), mode=grant["mode"]))
    limits = any(v is not None for v in (doc.get("limits") or {}).values())
    said: list[str] = []
    for process, index, command, port in resolved.instances():
        iid = f"{doc['app']['name']}.{process}.{index}"
        penv = manifests.app_environment(resolved, process=process, index=index,
                                         manifest_path=manifest_path)
        spec = InstanceSpec(id=iid, app=doc["app"]["name"], process=process, index=index,
                            argv=["/bin/sh", "-c", f"exec {command}"], env=penv,
                            cwd=str(resolved.directory), port=port)
        plan, notes = launcher.unprivileged_plan(spec, str(resolved.directory), grants,
                                                 limits=limits)
        if os.geteuid() == 0:
            # As root the enforced setup is `corral up` (fs driver roots); here: drop to nobody.
            plan.uid = plan.gid = NOBODY
            plan.mounts, plan.pid_namespace = [], False
            notes = [n.replace("as your own user, not as a dedicated unprivileged user",
                               "as nobody (uid 65534), not as a dedicated app user")
                     for n in notes]
            notes.append("The file system is not confined: as root, use `corral up` for the "
                         "sandboxed mount view.")
        plan.stdout, plan.stderr = "inherit:stdout", "inherit:stderr"
        for note in notes:
            if note not in said:
                said.append(note)
                print(f"corral dev: not enforced: {note}", file=sys.stderr, flush=True)
        pid, start = launcher.launch(plan)
        running.append((iid, pid, start))
        print(f"corral dev: {iid} started (pid {pid}"
              f"{f', port {port}' if port else ''})", file=sys.stderr, flush=True)
    return _wait(running)


def _wait(running: list[tuple[str, int, float]]) -> int:
    """Wait until every instance exited; the first signal stops them all."""
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for _iid, pid, start in running:
            launcher.signal_instance(pid, start, signal.SIGTERM, group=True)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    left = list(running)
    while left:
        for item in list(left):
            launcher.reap(item[1])
            if not launcher.is_alive(item[1], item[2]):
                left.remove(item)
                if not stopping:
                    print(f"corral dev: {item[0]} exited", file=sys.stderr, flush=True)
        time.sleep(0.05)
    return 0
