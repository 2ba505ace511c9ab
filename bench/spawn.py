"""Sandboxed spawn of /bin/true through corral's launch path vs `bwrap --unshare-all /bin/true`.

Both run alternately in one process; each sample is the time from the start of the spawn to
the exit of /bin/true (median of ROUNDS samples each, default 200). corral's launch uses a root
prepared by the fs driver library (done once, as the driver does at instance.prepare), a
network namespace (as the net driver provides), a cgroup, a pid namespace with tini, the uid
drop, no capabilities and the seccomp filter. launch() forks in the fork server, started by
the first launch, whose time is printed apart as `spawn_first_ms` (it includes the server's
interpreter start, paid once per kernel). Prints `spawn_ratio: X (goal <= 2.0)` and the
absolute medians. Needs root, bubblewrap, tini.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = int(os.environ.get("ROUNDS", "200"))


def main() -> int:
    if os.geteuid() != 0:
        print("spawn: needs root (namespaces, cgroups, uid switch)", file=sys.stderr)
        return 2
    for binary, package in (("bwrap", "bubblewrap"), ("tini-static", "tini")):
        if shutil.which(binary) is None:
            subprocess.run(["apt-get", "install", "-y", package], check=False,
                           stdout=subprocess.DEVNULL)
        if shutil.which(binary) is None:
            print(f"spawn: {binary} missing (apt-get install -y {package})", file=sys.stderr)
            return 2
    from corral.launch import become_subreaper, launch, reap
    from corral.protocol._lifecycle import AppSpec, InstanceSpec, LaunchPlan
    from corral_fs.sandbox import Sandbox

    become_subreaper()
    base = Path(tempfile.mkdtemp(prefix="corral-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    (base / "app").mkdir(mode=0o755)
    # not "corral-...": net drivers on this host collect namespaces with their prefix
    netns = f"spawnbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    sandbox = Sandbox(base / "run")
    app = AppSpec(name="bench", directory=str(base / "app"),
                  manifest={"limits": {"processes": 64, "memory": "128MiB", "cpu": 1}})
    spec = InstanceSpec(id="bench.web.0", app="bench", process="web", index=0,
                        argv=["/bin/true"], env={"PATH": "/usr/bin:/bin"}, cwd="/")
    try:
        fragment = sandbox.prepare(app, spec, 61999, 61999)
        plan = LaunchPlan(instance=spec, root=fragment.root, cgroup_procs=fragment.cgroup_procs,
                          uid=61999, gid=61999, pid_namespace=True, seccomp="default",
                          netns=f"/run/netns/{netns}")

        def corral_spawn() -> float:
            t0 = time.perf_counter()
            pid, _ = launch(plan)
            while reap(pid) is None:
                time.sleep(0.0002)
            return time.perf_counter() - t0

        def bwrap_spawn() -> float:
            # bwrap re-applies the flags of every mount under /; one that vanishes meanwhile
            # (a network namespace of another program) fails that run: measure it again
            for _ in range(5):
                t0 = time.perf_counter()
                done = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/",
                                       "/bin/true"], stderr=subprocess.DEVNULL)
                if done.returncode == 0:
                    return time.perf_counter() - t0
            raise RuntimeError("bwrap failed 5 times in a row")

        first = corral_spawn()  # starts the fork server, compiles the seccomp filter
        bwrap_spawn()  # warm up the page cache
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(corral_spawn())
            theirs.append(bwrap_spawn())
    finally:
        sandbox.release("bench.web.0")
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(base, ignore_errors=True)
    a, b = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
    print(f"spawn_ratio: {a / b:.2f} (goal <= 2.0)")
    print(f"spawn_corral_ms: {a:.2f}")
    print(f"spawn_bwrap_ms: {b:.2f}")
    print(f"spawn_first_ms: {first * 1000:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
