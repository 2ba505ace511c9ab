"""``corral run``: the dev loop. The app runs in the foreground with its production contract.

Same resolved manifest, same environment (PORT, CORRAL_*, CORRAL_MANIFEST), same working
directory as under the kernel. What the host can enforce for an unprivileged user is used;
what it cannot is said once, plainly, before the app starts.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from corral import manifest as manifests

NOBODY = 65534


def enforcement_notes() -> list[str]:
    """Plain sentences saying what `corral run` does not enforce on this host, as this user."""
    if os.geteuid() == 0:
        return [
            "corral run: running as root: the app runs as nobody (uid 65534), but without the "
            "kernel's sandbox (no mount view, network rules or cgroup limits); use `corral up` "
            "for the enforced setup."
        ]
    return [
        "corral run: not root: paths, network peers and limits of the manifest are NOT "
        "enforced here; the app gets the same resolved manifest and environment as in "
        "production. Use `corral up` under a root kernel for enforcement."
    ]


def run_foreground(directory: Path, *, set_: list[str], offset: int, env: list[str]) -> int:
    """Start every instance of the app, relay their output, stop them all on Ctrl-C."""
    resolved = manifests.load(directory, set_=set_, offset=offset, env=env)
    doc = resolved.as_json()
    tmp = Path(tempfile.mkdtemp(prefix="corral-run-"))
    manifest_path = tmp / "manifest.json"
    manifest_path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.chmod(tmp, 0o755)
    os.chmod(manifest_path, 0o644)
    for note in enforcement_notes():
        print(note, file=sys.stderr)
    as_root = os.geteuid() == 0
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sel = selectors.DefaultSelector()
    instances = resolved.instances()
    width = max((len(f"{p}.{i}") for p, i, _c, _port in instances), default=0)
    for process, index, command, _port in instances:
        name = f"{process}.{index}"
        penv = manifests.app_environment(resolved, process=process, index=index,
                                         manifest_path=str(manifest_path))
        proc = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command}"], cwd=str(resolved.directory), env=penv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
            user=NOBODY if as_root else None, group=NOBODY if as_root else None,
            extra_groups=[] if as_root else None,
        )
        procs[name] = proc
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ, name)
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    status = 0
    open_streams = len(procs)
    while open_streams:
        for key, _ in sel.select(timeout=0.5):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            prefix = f"{key.data.ljust(width)} | " if len(procs) > 1 else ""
            sys.stdout.write(prefix + line.decode("utf-8", "replace"))
            sys.stdout.flush()
    for p in procs.values():
        code = p.wait()
        if code != 0 and not stopping:
            status = status or code
    return status
