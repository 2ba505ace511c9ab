"""The fs driver process: per-app users, per-instance roots and cgroups over CDP/1."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import structlog

from corral.errors import ConflictError, CorralError, ErrorCode
from corral.protocol import AppSpec, PlanFragment, Welcome
from corral.sdk import Driver, op, run
from corral_fs import DRIVER
from corral_fs._cgroups import favor_dynamic_changes
from corral_fs.sandbox import DEFAULT_UID_RANGE, Sandbox

log = structlog.get_logger("corral_fs")

UID_KIND = "uid"


class FsDriver(Driver):
    """Confines each instance: its own root, cgroup limits and an unprivileged per-app uid."""

    name = "fs"
    capability = "fs"
    description = DRIVER  # its [section]s, checked by manifest.check
    features = frozenset({"app_users"})
    version = "0.1.0"

    def __init__(self) -> None:
        super().__init__()
        self._sandbox: Sandbox | None = None
        self._uids: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._favored = False

    def welcomed(self, welcome: Welcome) -> None:
        """Take the kernel's config (``uid_range``; ``favor_dynmods``, default true: make
        cgroup migrations cheap host-wide, see ``favor_dynamic_changes``), then, the first
        time, apply ``favor_dynmods``: a failure is logged, launches are only slower."""
        super().welcomed(welcome)
        if self._favored or not self.config.get("favor_dynmods", True):
            return
        self._favored = True
        try:
            log.info("cgroup favordynmods", result=favor_dynamic_changes())
        except OSError as exc:
            log.warning("cgroup favordynmods not set; each launch waits for an RCU grace "
                        "period when it enters its cgroups", error=str(exc))

    @property
    def sandbox(self) -> Sandbox:
        """The host-side work, created once the kernel told us the runtime dir."""
        if self._sandbox is None:
            self._sandbox = Sandbox(self.runtime_dir)
        return self._sandbox

    def _range(self) -> tuple[int, int]:
        low, high = self.config.get("uid_range", DEFAULT_UID_RANGE)
        return int(low), int(high)

    async def _uid(self, app: AppSpec) -> int:
        """The app's uid: its own if set, else one claimed in the ledger (kind 'uid')."""
        if app.uid is not None:
            return app.uid
        async with self._lock:
            if app.name in self._uids:
                return self._uids[app.name]
            held = await self.kernel.call("ledger.list", {"owner": app.name, "kind": UID_KIND})
            for record in held.get("records", []):
                self._uids[app.name] = int(record["key"])
                return self._uids[app.name]
            low, high = self._range()
            size = high - low + 1
            # start at a stable point per name so that redeploys tend to get the same uid
            start = int(hashlib.sha256(app.name.encode()).hexdigest(), 16) % size
            for i in range(size):
                uid = low + (start + i) % size
                claim = {"kind": UID_KIND, "key": str(uid), "value": {"gid": uid}}
                try:
                    await self.kernel.call("ledger.claim", {"owner": app.name, "claims": [claim]})
                except CorralError as exc:
                    # the bus may hand back a plain CorralError carrying the 409 code
                    if exc.code != ErrorCode.CONFLICT:
                        raise
                    continue
                self._uids[app.name] = uid
                return uid
            raise ConflictError(
                f"no free uid in {low}-{high} for app {app.name!r}",
                kind=UID_KIND,
                key=f"{low}-{high}",
                holder="(all held)",
            )

    @op("instance.prepare")
    async def prepare(self, args: Any) -> PlanFragment:
        """Build the instance's root and cgroup; the fragment tells the launcher to use them."""
        uid = await self._uid(args.app)
        gid = args.app.gid if args.app.gid is not None else uid
        return await asyncio.to_thread(self.sandbox.prepare, args.app, args.instance, uid, gid)

    @op("instance.stopped")
    async def stopped(self, args: Any) -> dict[str, Any]:
        """Release the instance's cgroup (killing leftovers) and root."""
        await asyncio.to_thread(self.sandbox.release, args.instance_id)
        return {"released": args.instance_id}

    @op("app.detach")
    async def detach(self, args: Any) -> dict[str, Any]:
        """Release every instance of the app and its uid."""
        prefix = f"{args.app}."
        ids = sorted(i for i in self.sandbox.known() if i.startswith(prefix))
        for instance_id in ids:
            await asyncio.to_thread(self.sandbox.release, instance_id)
        self._uids.pop(args.app, None)
        held = await self._held_uids(args.app)
        if held:
            keys = [[UID_KIND, key] for key in held]
            await self.kernel.call("ledger.release", {"owner": args.app, "keys": keys})
        return {"released": ids, "uids": held}

    async def _held_uids(self, app: str) -> list[str]:
        held = await self.kernel.call("ledger.list", {"owner": app, "kind": UID_KIND})
        return [str(r["key"]) for r in held.get("records", [])]

    @op("state.sync")
    async def sync(self, args: Any) -> dict[str, Any]:
        """Re-create missing roots/cgroups of live instances; release those of dead ones."""
        apps = {a.name: a for a in args.apps}
        live = {r.spec.id: r for r in args.instances if r.state != "exited"}
        rebuilt = []
        for instance_id, record in sorted(live.items()):
            app = apps.get(record.spec.app)
            if app is None or self.sandbox.is_complete(instance_id):
                continue
            uid = await self._uid(app)
            gid = app.gid if app.gid is not None else uid
            # the running app has its own copy of the mounts; this restores the host side
            await asyncio.to_thread(self.sandbox.restore, app, record.spec, uid, gid)
            rebuilt.append(instance_id)
        released = await asyncio.to_thread(self.sandbox.collect, live)
        if rebuilt or released:
            log.info("fs state synced", rebuilt=rebuilt, released=released)
        return {"rebuilt": rebuilt, "released": released}


def main() -> None:
    """Run the fs driver (``python -m corral_fs.driver``)."""
    run(FsDriver)


if __name__ == "__main__":
    main()
