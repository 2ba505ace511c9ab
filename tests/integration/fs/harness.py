"""Test harness: real fs prepare + real launch of sandboxed apps, with exact cleanup."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import require
from corral.launch import become_subreaper, is_alive, launch, reap, signal_instance
from corral.protocol._lifecycle import AppSpec, InstanceSpec, LaunchPlan
from corral_fs.sandbox import Sandbox

PROBES = Path(__file__).parent / "probes"
PYTHON = "/usr/bin/python3"  # the host system's python, visible through the ro /usr


@dataclass
class Running:
    """One launched instance."""

    instance_id: str
    pid: int
    start_time: float
    output: Path
    exit_code: int | None = None

    def wait(self, timeout: float = 30.0) -> int:
        """Exit code of the instance (we are its subreaper)."""
        deadline = time.monotonic() + timeout
        while self.exit_code is None and time.monotonic() < deadline:
            self.exit_code = reap(self.pid)
            if self.exit_code is None:
                time.sleep(0.01)
        if self.exit_code is not None:
            return self.exit_code
        raise TimeoutError(f"{self.instance_id} still runs after {timeout}s")

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait, then parse the probe's JSON line."""
        code = self.wait(timeout)
        text = self.output.read_text()
        assert code == 0, f"probe failed ({code}): {text}"
        return json.loads(text.strip().splitlines()[-1])  # type: ignore[no-any-return]


@dataclass
class Host:
    """A scratch corral host: base dir outside /tmp, a runtime dir, a Sandbox."""

    base: Path
    sandbox: Sandbox
    running: list[Running] = field(default_factory=list)
    _uids: itertools.count = field(default_factory=lambda: itertools.count(61900))

    def app(self, name: str, manifest: dict[str, Any] | None = None) -> AppSpec:
        directory = self.base / "apps" / name
        directory.mkdir(parents=True)
        for probe in PROBES.iterdir():
            shutil.copy(probe, directory / probe.name)
        return AppSpec(name=name, directory=str(directory), manifest=manifest or {},
                       uid=next(self._uids))

    def start(self, app: AppSpec, argv: list[str], env: dict[str, str] | None = None,
              index: int = 0, seccomp: bool = True) -> Running:
        """Launch ``argv`` in ``app``'s sandbox; ``seccomp=False`` leaves out only the system
        call filter, to show what the filter alone refuses."""
        assert app.uid is not None
        instance = InstanceSpec(id=f"{app.name}.web.{index}", app=app.name, process="web",
                                index=index, argv=argv, cwd=app.directory,
                                env={"PATH": "/usr/bin:/bin", **(env or {})})
        fragment = self.sandbox.prepare(app, instance, app.uid, app.uid)
        output = self.base / f"{instance.id}.out"
        plan = LaunchPlan(instance=instance, root=fragment.root,
                          cgroup_procs=fragment.cgroup_procs, uid=fragment.uid,
                          gid=fragment.gid, pid_namespace=bool(fragment.pid_namespace),
                          seccomp=fragment.seccomp if seccomp else None,
                          stdout=str(output), stderr=str(output))
        try:
            pid, start = launch(plan)
        except BaseException:
            self.sandbox.release(instance.id)
            raise
        run = Running(instance.id, pid, start, output)
        self.running.append(run)
        return run

    def stop(self, run: Running) -> None:
        if is_alive(run.pid, run.start_time):
            signal_instance(run.pid, run.start_time, 9)
        try:
            run.wait(10)
        except TimeoutError:
            pass
        self.sandbox.release(run.instance_id)

    def close(self) -> None:
        for run in self.running:
            self.stop(run)
        shutil.rmtree(self.base, ignore_errors=True)


def make_host() -> Host:
    """A host under /var/tmp (not /tmp: the sandbox has a private /tmp over the host's)."""
    become_subreaper()
    base = Path(tempfile.mkdtemp(prefix="corral-fs-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    return Host(base, Sandbox(base / "run"))


@contextmanager
def sandbox_host() -> Iterator[Host]:
    """A Host for the fs tests, closed on exit; what it needs is required first (under
    CI=true a missing piece fails the test instead of skipping it)."""
    require(os.path.exists(PYTHON), f"{PYTHON} (the probes run on the host's python)")
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    h = make_host()
    try:
        yield h
    finally:
        h.close()
