"""What the kernel keeps in memory per app and per instance (the ledger has it durably)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from corral.protocol import AppSpec, InstanceRecord, InstanceSpec


@dataclass
class Live:
    """A running instance the kernel watches."""

    record: InstanceRecord
    spec_hash: str
    generation: int
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False
    restarts: int = 0
    exit_status: str = ""
    waiting: str = ""  # why a crashed instance is not restarted yet (a driver it needs is down)
    launched_at: float = field(default_factory=time.monotonic)
    # socket activation: the kernel's copies of the sockets the instance got as fd 3.., kept
    # so that a restart hands it the same sockets (the lb still routes to them)
    listen_fds: list[int] = field(default_factory=list)

    @property
    def slot(self) -> str:
        """The instance slot ('<app>.<process>.<index>') this instance fills (a replacement
        of generation N is '<slot>-gN' but fills the same slot)."""
        spec = self.record.spec
        return spec.env.get("CORRAL_INSTANCE", spec.id)

    def age(self) -> float:
        """Seconds since the instance was launched."""
        return time.monotonic() - self.launched_at

    def close_listen_fds(self) -> None:
        """Drop the kernel's copies of the instance's sockets (it is gone for good)."""
        fds, self.listen_fds = self.listen_fds, []
        for fd in fds:
            os.close(fd)

    def view(self) -> dict[str, Any]:
        """The instance as `corral ps` and a deploy's result show it."""
        rec = self.record
        return {"id": rec.spec.id, "app": rec.spec.app, "process": rec.spec.process,
                "pid": rec.pid, "state": rec.state, "address": rec.address, "port": rec.spec.port,
                "generation": self.generation, "restarts": self.restarts,
                "started": rec.start_time, "waiting": self.waiting}


@dataclass
class Job:
    """A spawned job (cron run): watched until it ends; its status kept for instance.wait."""

    record: InstanceRecord
    output: str | None
    done: asyncio.Future[dict[str, Any]]
    watcher: asyncio.Task[None] | None = None


@dataclass
class AppState:
    """An app as the kernel keeps it in memory (the ledger has the same, durably)."""

    spec: AppSpec
    instances: dict[str, Live] = field(default_factory=dict)
    deploying: bool = False
    # the deployed release's record (corral.release) and its secrets' values, which reach
    # processes only through their launch plans; None/empty for an app deployed before releases
    release: dict[str, Any] | None = None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    # a spread app's share run here for its home host (corral.deploy._spread): the home's
    # name, and what of its placement this share follows; None for an app homed here
    home: str | None = None
    follows: dict[str, Any] | None = None


def spec_hash(spec: InstanceSpec) -> str:
    """Identity of an instance's configuration: same hash, no need to replace it."""
    data = spec.model_dump(mode="json", exclude={"env", "id"})
    env = {k: v for k, v in spec.env.items() if k not in ("NOTIFY_SOCKET", "CORRAL_INSTANCE_ID")}
    raw = json.dumps([data, env], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
