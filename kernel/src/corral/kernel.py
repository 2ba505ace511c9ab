"""corrald: the microkernel. Owns the ledger, the bus, driver supervision and deploys.

The kernel never imports a driver's code. Requests are dispatched from ``KERNEL_OPS`` (the
table of the peer's role) to the handler of the same name in ``Kernel.handlers``; the two
tables are checked against each other at start-up so no operation can be half-defined.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from corral import __version__
from corral._forksafety import protect_signal_handlers
from corral.bus import BusServer, Peer
from corral.deploy import Deployer, DriverSet
from corral.deploy._spread import PLACEMENT, split_placement_key
from corral.errors import CorralError, ErrorCode, ManifestError, NotFoundError, UnavailableError
from corral.forwarding import FORWARDED, Forwarder
from corral.host import (
    HostConfig,
    ensure_private_dir,
    home,
    load_config,
    runtime_dir,
)
from corral.hosts import ALIVE, HostRegistry, forget_host, host_name, host_of, list_hosts
from corral.launch import become_subreaper, take_fd
from corral.ledger import SEALED_KINDS, GroupCommit, HostView, Ledger, Record, Txn, open_ledger
from corral.protocol import KERNEL_OPS, PROTOCOL, QUERY_OP, Args, Hello, Request, Welcome
from corral.protocol._ops import (
    AppAdopt,
    AppName,
    Check,
    ConfigSet,
    ConfigUnset,
    Deploy,
    DeployBranch,
    Down,
    DriverName,
    DriverQuery,
    HostName,
    InstanceId,
    InstanceSignal,
    InstanceWait,
    KeyAdd,
    KeyName,
    LedgerClaim,
    LedgerList,
    LedgerRelease,
    Publish,
    Restart,
    Rollback,
    RunCommand,
    Scale,
    SocketKeep,
    SocketKey,
    Spawn,
)
from corral.remote import Account, Branches, KeyStore, authorize, gateway_path, unpacked
from corral.socketstore import SocketStore
from corral.supervisor import DriverSlot, Supervisor

if TYPE_CHECKING:
    from corral.cluster import ClusterMember
    from corral.replication import Channel

log = structlog.get_logger("corral.kernel")

PS_TIMEOUT_S = 5.0  # how long `corral ps` waits for each other host's apps
FORWARDED_PEER = b"forwarded"
"""The identity of the peer a request forwarded by another host runs as (``_run_forwarded``)."""

LEDGER_CHANGES = frozenset({
    "app.deploy", "app.down", "app.scale", "app.restart", "app.rollback", "app.config.set",
    "app.config.unset", "app.run", "instance.spawn", "keys.add", "keys.remove", "app.adopt",
    "hosts.drain"})
"""Operations whose steps write the ledger from the kernel's loop: with a networked ledger
they first check that it answers (``Kernel._ledger_answers``)."""
LEDGER_PROBE_S = 3.0

Handler = Callable[[Peer, Any], Awaitable[dict[str, Any]]]


class Kernel:
    """One kernel: construct, then ``await run()``."""

    def __init__(
        self,
        config: HostConfig | None = None,
        *,
        home_dir: Path | None = None,
        runtime: Path | None = None,
        stop_drivers_on_exit: bool = False,
    ) -> None:
        self.config = config or load_config()
        self.home = ensure_private_dir(home_dir or home())
        os.chmod(self.home, 0o711)  # apps read their manifest under home/apps (0711 dirs)
        self.runtime = ensure_private_dir(runtime or runtime_dir())
        self.notify_dir = Path(str(self.runtime) + "-notify")
        self.notify_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.notify_dir, 0o711)
        self.stop_drivers_on_exit = stop_drivers_on_exit
        shared = open_ledger(self.config.ledger, self.home)
        this_host = host_name(self.config.host.name)
        # A networked ledger may serve several hosts: this kernel sees it through its host's
        # view (cluster-wide names unique, host ports and instances its own; HostView).
        self.ledger: Ledger = HostView(shared, this_host) if shared.remote else shared
        self.group_commit = GroupCommit(self.ledger)
        self.started = time.time()
        self.bus = BusServer(
            self.runtime,
            admit=self.admit,
            on_hello=self.on_hello,
            dispatch=self.dispatch,
            on_lost=self.on_lost,
            heartbeat_ms=self.config.heartbeat_ms,
        )
        self.sockets = SocketStore()  # listening sockets kept for drivers across restarts
        self.supervisor = Supervisor(
            self.config,
            self.ledger,
            env=self._driver_env(),
            log_dir=self.home / "drivers",
            on_ready=self._driver_ready,
            forget=self.bus.forget,
            sockets=self.sockets,
        )
        self.deployer = Deployer(
            ledger=self.ledger, drivers=DriverSet(self.supervisor, self.bus, self.config),
            events=self.bus, home=self.home, notify_dir=self.notify_dir, config=self.config)
        ssh = self.config.ssh
        self.gateway_dir = Path(str(self.runtime) + "-gateway")
        self.keys = KeyStore(self.home / "keys.json", Account(
            user=ssh.user, home=Path(ssh.home) if ssh.home else self.home / "ssh",
            gateway=gateway_path(), python=Path(sys.executable),
            bus=f"ipc://{self.gateway_dir / 'bus.sock'}",
            events=f"ipc://{self.gateway_dir / 'events.sock'}"))
        self.branches = Branches(self.home / "git-branches.json")
        self.hosts = HostRegistry(shared, this_host, self.config.host.address,
                                  self.config.host.ttl_s, tuple(self.config.host.labels))
        # on a shared ledger, requests about another host's apps go to that host
        self.forwarder = (Forwarder(shared, this_host, lambda: self.hosts.lease,
                                    self._run_forwarded) if shared.remote else None)
        # ... and the hosts copy each other's releases, fence, lead and adopt (cluster.py)
        self.cluster: ClusterMember | None = None
        if self.forwarder is not None:
            from corral.cluster import ClusterMember

            self.cluster = ClusterMember.build(shared, self.hosts, self.deployer,
                                               self.forwarder, self.config, self.home,
                                               self.bus.publish)
        self.handlers: dict[str, Handler] = {
            "app.deploy": self._deploy,
            "app.check": self._check,
            "app.down": self._down,
            "app.scale": self._scale,
            "app.restart": self._restart,
            "app.releases": self._releases,
            "app.rollback": self._rollback,
            "app.config": self._config,
            "app.config.set": self._config_set,
            "app.config.unset": self._config_unset,
            "app.run": self._run,
            "app.ps": self._ps,
            "app.get": self._app_get,
            "ledger.list": self._ledger_list,
            "ledger.claim": self._ledger_claim,
            "ledger.release": self._ledger_release,
            "app.branch": self._branch,
            "keys.add": self._keys_add,
            "keys.list": self._keys_list,
            "keys.remove": self._keys_remove,
            "keys.whoami": self._keys_whoami,
            "hosts.list": self._hosts_list,
            "hosts.forget": self._hosts_forget,
            "app.adopt": self._adopt,
            "hosts.drain": self._hosts_drain,
            "drivers.list": self._drivers_list,
            "driver.restart": self._driver_restart,
            "driver.query": self._driver_query,
            "kernel.status": self._status,
            "instance.spawn": self._spawn,
            "instance.signal": self._signal,
            "instance.stop": self._stop_instance,
            "instance.wait": self._wait_instance,
            "event.publish": self._publish,
            "socket.keep": self._socket_keep,
            "socket.list": self._socket_list,
            "socket.release": self._socket_release,
        }
        declared = {name for table in KERNEL_OPS.values() for name in table}
        if declared != set(self.handlers):
            raise RuntimeError(f"operation tables disagree: {declared ^ set(self.handlers)}")
        self._admins = {0, os.getuid(), *self.config.admins}
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()

    def _driver_env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "CI", "TZ")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            CORRAL_BUS=self.bus.endpoint,
            CORRAL_EVENTS=self.bus.events,
            CORRAL_HOME=str(self.home),
            CORRAL_RUNTIME_DIR=str(self.runtime),
        )
        return env

    # ---- bus callbacks -----------------------------------------------------------------------

    def admit(self, uid: int) -> bool:
        """Local peers admitted to the bus: root, the kernel's own uid, configured admins,
        and the SSH gateway's account (which may speak for its keys only)."""
        return uid in self._admins or self._is_gateway(uid)

    def _is_gateway(self, uid: int) -> bool:
        ids = self.keys.account.ids()
        return ids is not None and ids[0] == uid and uid not in self._admins

    def _share_with_gateway(self) -> None:
        """Bind the bus for the gateway's account too, once that account exists."""
        ids = self.keys.account.ids()
        if ids is not None and os.geteuid() == 0:
            self.bus.share(self.gateway_dir, ids[1])

    async def on_hello(self, identity: bytes, uid: int, hello: Hello) -> Welcome:
        """Accept or refuse a HELLO (raise CorralError to refuse)."""
        if PROTOCOL not in hello.protocols:
            raise CorralError(
                f"no common protocol version: kernel speaks {PROTOCOL}, peer {hello.protocols}",
                code=ErrorCode.VERSION,
            )
        gateway = self._is_gateway(uid)
        if gateway != (hello.role == "remote"):
            raise CorralError("the SSH gateway's account speaks for SSH keys only (role "
                              "remote), and nobody else may", code=ErrorCode.FORBIDDEN)
        if gateway and self.keys.get(hello.name) is None:
            raise CorralError(f"no SSH key named {hello.name!r}",
                              code=ErrorCode.UNAUTHENTICATED)
        peer_id = secrets.token_hex(4)
        config: dict[str, Any] = {}
        if hello.role == "driver":
            slot = self.supervisor.accept(hello, uid)
            config = self._driver_config(slot)
            asyncio.get_running_loop().call_soon(self._mark_connected, identity, slot)
        return Welcome(peer_id=peer_id, heartbeat_ms=self.config.heartbeat_ms, config=config,
                       home=str(self.home), runtime_dir=str(self.runtime))

    def _driver_config(self, slot: DriverSlot) -> dict[str, Any]:
        """The driver's own section of the host config, with the host-wide settings that
        go with the features it declared (``corral.protocol.FEATURES``)."""
        config = dict(slot.config)
        if "instance_addresses" in slot.features:
            config.setdefault("pool4", self.config.address_pool)
            config.setdefault("pool6", self.config.address_pool6)
        if "app_users" in slot.features:
            config.setdefault("uid_range", list(self.config.app_uids))
        return config

    def _mark_connected(self, identity: bytes, slot: DriverSlot) -> None:
        peer = self.bus.peers.get(identity)
        if peer is not None:
            task = asyncio.ensure_future(self.supervisor.connected(slot, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _driver_ready(self, slot: DriverSlot) -> None:
        log.info("driver connected", driver=slot.name, ops=slot.ops)
        self.bus.publish(f"driver.{slot.name}.connected", {"pid": slot.pid})
        if slot.peer is not None and "state.sync" in slot.ops:
            try:
                await self.bus.call(slot.peer, "state.sync", self.deployer.sync_args())
            except CorralError as exc:
                log.error("state.sync failed", driver=slot.name, error=exc.reason)
            # a driver that collected a dead build's sandbox may have freed its release
            await asyncio.to_thread(self.deployer.releaser.collect_abandoned)

    async def on_lost(self, peer: Peer) -> None:
        """A peer left or stopped answering."""
        if peer.role == "driver":
            await self.supervisor.lost(peer)

    async def dispatch(self, peer: Peer, req: Request) -> dict[str, Any]:
        """Look ``req.op`` up in the table of the peer's role; validate; run its handler."""
        table = KERNEL_OPS[peer.role]
        op = table.get(req.op)
        if op is None:
            if any(req.op in t for t in KERNEL_OPS.values()):
                raise CorralError(f"operation {req.op!r} is not allowed for {peer.role}s",
                                  code=ErrorCode.FORBIDDEN)
            raise CorralError(f"unknown operation {req.op!r}", code=ErrorCode.UNKNOWN_OPERATION)
        try:
            args: Args = op.args.model_validate(req.args)
        except Exception as exc:
            raise CorralError(f"{req.op}: invalid arguments: {_first(exc)}",
                              code=ErrorCode.INVALID) from None
        if req.op in LEDGER_CHANGES and self.ledger.remote:
            await self._ledger_answers(req.op)
        if peer.role != "remote":
            return await self._handle(peer, req.op, args)
        key = self.keys.get(peer.hello.name)  # read again: a key removed is out at once
        if key is None:
            raise CorralError(f"SSH key {peer.hello.name!r} was removed",
                              code=ErrorCode.UNAUTHENTICATED)
        answer = authorize(key, req.op, args)
        return answer(key, await self._handle(peer, req.op, args))

    async def _handle(self, peer: Peer, op: str, args: Args) -> dict[str, Any]:
        """Run ``op`` here, or, for an app another host holds (a shared ledger), on that
        host (``corral.forwarding``); the caller was checked already."""
        host = await self._host_of_app(op, args) if self.forwarder is not None else None
        if host is None or self.forwarder is None:
            return await self.handlers[op](peer, args)
        if op not in FORWARDED:
            raise CorralError(
                f"app {getattr(args, 'name', '')!r} runs on host {host}: run this there "
                "(`corral config set` sends no config values between hosts; `run` needs the "
                "app's host)", code=ErrorCode.FORBIDDEN)
        return await self.forwarder.call(host, op, args.model_dump(mode="json"),
                                         f"{_who(peer)}@{self.hosts.name}")

    async def _host_of_app(self, op: str, args: Args) -> str | None:
        """The other host that holds the app ``op`` is about, or None (here, or no app)."""
        if isinstance(args, DriverQuery) and args.host not in (None, self.hosts.name):
            return await self._live_host(args.host)  # asked of that host's driver
        if not isinstance(self.ledger, HostView):
            return None
        if isinstance(args, DriverQuery):
            app = args.args.get("app")
        elif op.startswith("app.") and op not in ("app.ps", "app.deploy", "app.check",
                                                  "app.adopt"):
            app = getattr(args, "name", None)  # every other app.* names its app
        else:
            return None
        if not isinstance(app, str):
            return None
        state = self.deployer.apps.get(app)
        # an app homed here is answered here; a spread app's share this host runs for its
        # home answers only for itself to the drivers' queries (its instances' logs...)
        if state is not None and (state.home is None or isinstance(args, DriverQuery)):
            return None
        holder = await asyncio.to_thread(self.ledger.holder, "app", app)
        host = host_of(holder, self.hosts.name) if holder is not None else None
        if host is None or host == self.hosts.name:
            return None
        if await asyncio.to_thread(self.hosts.ledger.get, ALIVE, host) is None:
            raise UnavailableError(
                f"app {app!r} runs on host {host}, which is lost (`corral hosts`); nothing "
                "was done")
        return host

    async def _live_host(self, host: str) -> str:
        """``host``, another live host of this ledger; an error naming it otherwise."""
        if not isinstance(self.ledger, HostView):
            raise NotFoundError(f"no host {host!r}: this host ({self.hosts.name}) shares its "
                                "ledger with none")
        if await asyncio.to_thread(self.hosts.ledger.get, ALIVE, host) is None:
            raise UnavailableError(f"host {host!r} is not live (`corral hosts`); nothing "
                                   "was asked of it")
        return host

    async def _run_forwarded(self, op: str, raw: dict[str, Any], by: str) -> dict[str, Any]:
        """Run a request another host forwarded (``corral.forwarding``): as a local client's
        (validated again), in the name of who asked there, never forwarded again."""
        args = KERNEL_OPS["client"][op].args.model_validate(raw)
        if op in LEDGER_CHANGES:
            await self._ledger_answers(op)
        peer = Peer(identity=FORWARDED_PEER, uid=0, peer_id="forwarded",
                    hello=Hello.model_construct(role="client", name=by, version="",
                                                protocols=[PROTOCOL]))
        return await self.handlers[op](peer, args)

    async def _ledger_answers(self, op: str) -> None:
        """Refuse ``op`` at once, changing nothing, when a networked ledger does not give its
        revision within LEDGER_PROBE_S (a lost quorum, say): its steps call the ledger on
        the kernel's loop, which would otherwise wait out the ledger's own timeout per
        call, with the loop (heartbeats, every other request) held meanwhile."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.ledger.revision), LEDGER_PROBE_S)
        except (TimeoutError, CorralError) as exc:
            why = getattr(exc, "reason", "") or f"no answer in {LEDGER_PROBE_S:g} s"
            raise CorralError(
                f"{op} refused: the ledger is unavailable ({why}); nothing was changed, and "
                "running apps keep running; try again once the ledger has its quorum back",
                code=ErrorCode.UNAVAILABLE) from None

    # ---- handlers ----------------------------------------------------------------------------

    async def _deploy(self, peer: Peer, args: Deploy) -> dict[str, Any]:
        if args.upload is None:
            return await self.deployer.deploy(args, by=_who(peer))
        assert args.name is not None  # Deploy's validator: an upload names its app
        if args.git is not None:
            branch = self.branches.get(args.name)
            if args.git.ref != f"refs/heads/{branch}":
                pushed = args.git.ref.removeprefix("refs/heads/")
                raise CorralError(
                    f"{args.name} deploys pushes to {branch!r}, not {pushed!r}: push with "
                    f"`git push REMOTE {pushed}:{branch}`, or make {pushed!r} the deploy "
                    f"branch with `corral branch {args.name} {pushed}`", code=ErrorCode.INVALID)
        max_bytes = self.config.ssh.max_upload_mb << 20
        with unpacked(self.keys.account, args.upload, args.name, self.home / "uploads",
                      max_bytes) as directory:
            local = args.model_copy(update={"directory": str(directory), "upload": None})
            try:
                return await self.deployer.deploy(
                    local, by=_who(peer), uploaded="git push" if args.git else "upload")
            except CorralError as exc:
                raise _without_prefix(exc, f"{directory}/") from None

    async def _branch(self, peer: Peer, args: DeployBranch) -> dict[str, Any]:
        if args.branch is not None:
            self.branches.set(args.name, args.branch)
        return {"app": args.name, "branch": self.branches.get(args.name)}

    async def _keys_add(self, peer: Peer, args: KeyAdd) -> dict[str, Any]:
        key = await asyncio.to_thread(self.keys.add, args.name, args.key, apps=args.apps,
                                      admin=args.admin, by=_who(peer))
        self._share_with_gateway()
        self.bus.publish("keys.added", key.listing())
        return {"key": key.listing(), "user": self.keys.account.user,
                "authorized_keys": str(self.keys.account.authorized_keys)}

    async def _keys_list(self, peer: Peer, args: Any) -> dict[str, Any]:
        return {"keys": [k.listing() for k in self.keys.all()],
                "user": self.keys.account.user}

    async def _keys_remove(self, peer: Peer, args: KeyName) -> dict[str, Any]:
        key = await asyncio.to_thread(self.keys.remove, args.name)
        self.bus.publish("keys.removed", {"name": key.name, "by": _who(peer)})
        return {"removed": key.listing()}

    async def _keys_whoami(self, peer: Peer, args: Any) -> dict[str, Any]:
        key = self.keys.get(peer.hello.name) if peer.role == "remote" else None
        if key is None:
            return {"key": None, "user": _who(peer), "admin": True}
        return {"key": key.name, "apps": list(key.apps), "admin": key.admin}

    async def _releases(self, peer: Peer, args: AppName) -> dict[str, Any]:
        return self.deployer.lifecycle.releases(args.name)

    async def _rollback(self, peer: Peer, args: Rollback) -> dict[str, Any]:
        return await self.deployer.lifecycle.rollback(args, by=_who(peer))

    async def _config(self, peer: Peer, args: AppName) -> dict[str, Any]:
        return self.deployer.lifecycle.config(args.name)

    async def _config_set(self, peer: Peer, args: ConfigSet) -> dict[str, Any]:
        return await self.deployer.lifecycle.config_set(args, by=_who(peer))

    async def _config_unset(self, peer: Peer, args: ConfigUnset) -> dict[str, Any]:
        return await self.deployer.lifecycle.config_unset(args, by=_who(peer))

    async def _run(self, peer: Peer, args: RunCommand) -> dict[str, Any]:
        return await self.deployer.lifecycle.run(args, caller_uid=peer.uid)

    async def _check(self, peer: Peer, args: Check) -> dict[str, Any]:
        """The resolved manifest, or its problems (a bad manifest is this op's answer, not a
        failure of it; the directory is read with the kernel's rights)."""
        try:
            resolved = await self.deployer.check(args)
        except ManifestError as exc:
            return {"problems": exc.problems}
        return {"manifest": resolved.as_json()}

    async def _scale(self, peer: Peer, args: Scale) -> dict[str, Any]:
        return await self.deployer.scale(args)

    async def _restart(self, peer: Peer, args: Restart) -> dict[str, Any]:
        return await self.deployer.restart(args)

    async def _down(self, peer: Peer, args: Down) -> dict[str, Any]:
        result = await self.deployer.down(args.name, purge=args.purge)
        if args.purge:  # its pushed history and deploy branch go too
            repo = self.keys.account.repos / f"{args.name}.git"
            await asyncio.to_thread(shutil.rmtree, repo, True)
            repo.with_suffix(".lock").unlink(missing_ok=True)
            self.branches.set(args.name, None)
        return result

    async def _ps(self, peer: Peer, args: Any) -> dict[str, Any]:
        """This host's apps, each with its ``host``; on a shared ledger (asked by a client
        here, not forwarded) also every other live host's, asked for theirs. A host that
        does not answer is listed in ``unanswered``."""
        apps = self.deployer.ps()
        stats = await self._driver_stats()
        for app in apps:
            app["host"] = self.hosts.name
            app["drivers"] = {name: s.get("apps", {}).get(app["app"], {})
                              for name, s in stats.items()}
            app["shown"] = {name: list(s.get("shown", [])) for name, s in stats.items()}
        unanswered: list[dict[str, str]] = []
        if self.forwarder is not None and peer.identity != FORWARDED_PEER:
            alive = await asyncio.to_thread(self.hosts.ledger.list, kind=ALIVE)
            others = sorted(r.key for r in alive if r.key != self.hosts.name)
            answers = await asyncio.gather(
                *(self.forwarder.call(h, "app.ps", {}, f"{_who(peer)}@{self.hosts.name}",
                                      timeout_s=PS_TIMEOUT_S) for h in others),
                return_exceptions=True)
            for host, answer in zip(others, answers, strict=True):
                if isinstance(answer, BaseException):
                    unanswered.append({"host": host, "reason": str(answer)})
                else:
                    apps.extend(answer.get("apps", []))
            apps.sort(key=lambda a: (str(a.get("app")), str(a.get("host"))))
        return {"apps": apps, "unanswered": unanswered} if unanswered else {"apps": apps}

    async def _driver_stats(self) -> dict[str, dict[str, Any]]:
        """Per-app figures from drivers that offer ``query.<cap>.stats``, with the names of
        those worth a glance in `corral ps` (``shown``: refused, dropped...)."""
        out: dict[str, dict[str, Any]] = {}
        for slot in self.supervisor.slots.values():
            op = f"query.{slot.capability}.stats"
            if slot.peer is None or op not in slot.ops:
                continue
            try:
                res = await self.bus.call(slot.peer, op, {}, timeout=2.0)
                out[slot.name] = {"apps": dict(res.get("apps", {})),
                                  "shown": [str(k) for k in res.get("shown", [])]}
            except CorralError:
                continue
        return out

    async def _app_get(self, peer: Peer, args: AppName) -> dict[str, Any]:
        state = self.deployer.apps.get(args.name)
        if state is None:
            raise NotFoundError(f"no app named {args.name!r}")
        hosts = [self.hosts.name]
        if state.home is None and isinstance(self.ledger, HostView):  # its shares' hosts
            placed = await asyncio.to_thread(self.ledger.list, owner=args.name,
                                             kind=PLACEMENT)
            hosts += sorted(split_placement_key(r.key)[1] for r in placed)
        return {"app": state.spec.model_dump(mode="json"),
                "instances": [lv.record.model_dump(mode="json")
                              for lv in state.instances.values()],
                "hosts": hosts}

    async def _ledger_list(self, peer: Peer, args: LedgerList) -> dict[str, Any]:
        def read() -> tuple[list[Any], int]:
            return self.ledger.list(owner=args.owner, kind=args.kind), self.ledger.revision()

        recs, revision = await asyncio.to_thread(read) if self.ledger.remote else read()
        return {"revision": revision,
                "records": [{"kind": r.kind, "key": r.key, "owner": r.owner, "since": r.since,
                             "revision": r.revision, "value": self._shown(peer, r)}
                            for r in recs]}

    def _sealer(self, peer: Peer, kind: str) -> Channel | None:
        """The cluster key's channel when ``peer`` is the driver a sealed ``kind`` belongs to
        (``SEALED_KINDS``: only the lb reads and writes certificates), else None."""
        channel = self.cluster.channel if self.cluster is not None else None
        if channel is None or peer.role != "driver":
            return None
        slot = self.supervisor.by_capability(SEALED_KINDS[kind])
        return channel if slot is not None and slot.peer is peer else None

    def _shown(self, peer: Peer, rec: Record) -> dict[str, Any]:
        """A record's value as ``peer`` may see it: a sealed kind's (``SEALED_KINDS``: a
        private key) opened for the driver it belongs to only; anyone else sees
        ``{"sealed": true}``."""
        if rec.kind not in SEALED_KINDS:
            return rec.value
        channel = self._sealer(peer, rec.kind)
        if channel is None:
            return {"sealed": True}
        try:
            return channel.open_record(rec.kind, rec.key, rec.value)
        except CorralError as exc:
            log.warning("a sealed record does not open", kind=rec.kind, key=rec.key,
                        error=exc.reason)
            return {"sealed": True, "error": exc.reason}

    async def _ledger_claim(self, peer: Peer, args: LedgerClaim) -> dict[str, Any]:
        txn = Txn()
        for c in args.claims:
            value = c.value
            if c.kind in SEALED_KINDS:
                if self.cluster is None or self.cluster.channel is None:
                    raise CorralError(
                        f"a {c.kind} record holds a secret: it is kept only on hosts sharing "
                        "a ledger under a cluster key (host.toml [host] cluster_key)",
                        code=ErrorCode.INVALID)
                channel = self._sealer(peer, c.kind)
                if channel is None:
                    raise CorralError(f"a {c.kind} record is the {SEALED_KINDS[c.kind]} "
                                      "driver's to write", code=ErrorCode.FORBIDDEN)
                value = channel.seal_record(c.kind, c.key, c.value)
            txn.claim(args.owner, c.kind, c.key, value)
        return {"revision": await self.group_commit.commit(txn)}

    async def _ledger_release(self, peer: Peer, args: LedgerRelease) -> dict[str, Any]:
        txn = Txn()
        if args.keys is None:
            txn.release_all(args.owner)
        else:
            for kind, key in args.keys:
                txn.release(args.owner, kind, key)
        return {"revision": await self.group_commit.commit(txn)}

    async def _hosts_list(self, peer: Peer, args: Any) -> dict[str, Any]:
        return {"hosts": await asyncio.to_thread(list_hosts, self.hosts.ledger,
                                                 self.hosts.name),
                "this": self.hosts.name}

    async def _hosts_forget(self, peer: Peer, args: HostName) -> dict[str, Any]:
        return await asyncio.to_thread(forget_host, self.hosts.ledger, args.name,
                                       self.hosts.name)

    async def _adopt(self, peer: Peer, args: AppAdopt) -> dict[str, Any]:
        if self.cluster is None:
            raise CorralError("app.adopt is for hosts sharing an etcd ledger; this host's "
                              "ledger is its own", code=ErrorCode.INVALID)
        return await self.cluster.adopt(args, by=_who(peer))

    async def _hosts_drain(self, peer: Peer, args: HostName) -> dict[str, Any]:
        """``hosts.drain``: run on the host drained (asked of any host: forwarded there)."""
        if self.cluster is None or self.forwarder is None:
            raise CorralError("hosts.drain is for hosts sharing an etcd ledger; this host's "
                              "ledger is its own", code=ErrorCode.INVALID)
        if args.name != self.hosts.name:
            if await asyncio.to_thread(self.hosts.ledger.get, ALIVE, args.name) is None:
                raise NotFoundError(f"host {args.name!r} is not a live host of this ledger "
                                    "(`corral hosts`)")
            return await self.forwarder.call(args.name, "hosts.drain", {"name": args.name},
                                             f"{_who(peer)}@{self.hosts.name}")
        return await self.cluster.drain(by=_who(peer))

    async def _drivers_list(self, peer: Peer, args: Any) -> dict[str, Any]:
        return {"drivers": [{**s.as_json(),
                             "kept_sockets": [k.key for k in self.sockets.list(s.name)]}
                            for s in self.supervisor.slots.values()]}

    async def _driver_restart(self, peer: Peer, args: DriverName) -> dict[str, Any]:
        slot = await self.supervisor.restart(args.name)
        self.bus.publish(f"driver.{slot.name}.restarting", {"by": "request"})
        return {"driver": slot.as_json()}

    async def _driver_query(self, peer: Peer, args: DriverQuery) -> dict[str, Any]:
        op = f"query.{args.capability}.{args.query}"
        assert QUERY_OP.match(op)
        slot = self.supervisor.by_capability(args.capability)
        if slot is None or slot.peer is None:
            raise CorralError(f"no {args.capability} driver is connected",
                              code=ErrorCode.UNAVAILABLE)
        if op not in slot.ops:
            raise CorralError(f"driver {slot.name!r} does not serve {op}",
                              code=ErrorCode.UNKNOWN_OPERATION)
        return await self.bus.call(slot.peer, op, args.args)

    async def _status(self, peer: Peer, args: Any) -> dict[str, Any]:
        """The kernel's own figures (``kernel.status``: the log driver's /metrics). The
        kernel answers whatever its ledger does: a networked ledger that does not give its
        revision within a second is reported unavailable (``revision`` null, ``ledger``)."""
        drivers: dict[str, int] = {}
        for slot in self.supervisor.slots.values():
            drivers[slot.state] = drivers.get(slot.state, 0) + 1
        revision: int | None
        ledger = "ok"
        if self.ledger.remote:
            try:
                revision = await asyncio.wait_for(asyncio.to_thread(self.ledger.revision), 1.0)
            except (TimeoutError, CorralError) as exc:
                revision = None
                ledger = f"unavailable: {getattr(exc, 'reason', '') or 'no answer in 1 s'}"
        else:
            revision = self.ledger.revision()
        return {"pid": os.getpid(), "version": __version__, "protocol": PROTOCOL,
                "uptime_s": round(time.time() - self.started, 3), "home": str(self.home),
                "runtime_dir": str(self.runtime), "revision": revision, "ledger": ledger,
                "host": self.hosts.name, "shared_ledger": self.ledger.remote,
                # kinds whose values this kernel keeps sealed in the shared ledger, refusing
                # them without a cluster key (a driver keeps a secret there only when its
                # kind is listed: an older kernel would keep it as it came)
                "sealed_kinds": sorted(SEALED_KINDS) if self.ledger.remote else [],
                "peers": len(self.bus.peers), "bus": dict(self.bus.stats),
                "apps": len(self.deployer.apps),
                "instances": sum(len(a.instances) for a in self.deployer.apps.values()),
                "drivers": drivers}

    async def _spawn(self, peer: Peer, args: Spawn) -> dict[str, Any]:
        # a job is named by the driver that spawned it (<app>.<driver>.<job>.<run>)
        slot = next((s for s in self.supervisor.slots.values()
                     if s.peer is not None and s.peer.identity == peer.identity), None)
        requester = slot.name if slot is not None else "job"
        if args.listen_fd is None:
            return await self.deployer.spawn(args, requester=requester)
        fd = self._take_listen_fd(
            self._listen_sockets_driver(peer, "instance.spawn", "pass listen_fd"),
            args.listen_fd.pid, args.listen_fd.fd, op="instance.spawn")
        try:
            return await self.deployer.spawn(args, listen_fd=fd, requester=requester)
        finally:
            os.close(fd)  # the instance's Live holds its own copy

    def _listen_sockets_driver(self, peer: Peer, op: str, what: str) -> DriverSlot:
        """The calling driver's slot if it declared the ``listen_sockets`` feature (403
        otherwise)."""
        slot = next((s for s in self.supervisor.slots.values()
                     if s.peer is not None and s.peer.identity == peer.identity), None)
        if slot is None or "listen_sockets" not in slot.features:
            raise CorralError(f"{op}: only a driver declaring the listen_sockets feature may "
                              f"{what}", code=ErrorCode.FORBIDDEN)
        return slot

    def _take_listen_fd(self, slot: DriverSlot, pid: int, fd: int, *, op: str) -> int:
        """A copy of a driver's listening socket ``fd`` (socket activation, ``socket.keep``).

        Only a driver that declared the ``listen_sockets`` feature may pass one (the caller
        got ``slot`` from ``_listen_sockets_driver``), and only from its own process: ``pid``
        must be the pid the supervisor started for that driver (and the process still the one
        it started), so no peer can make the kernel lift a descriptor out of anyone else."""
        if slot.pid is None or pid != slot.pid:
            raise CorralError(f"{op}: pid {pid} is not the process of driver {slot.name!r} "
                              f"({slot.pid})", code=ErrorCode.FORBIDDEN)
        try:
            copy = take_fd(pid, slot.start_time, fd)
        except ProcessLookupError:
            raise CorralError(f"{op}: process {pid} is no longer driver {slot.name!r}",
                              code=ErrorCode.FORBIDDEN) from None
        except OSError as err:
            raise CorralError(f"{op}: cannot take descriptor {fd} of driver {slot.name!r} "
                              f"(pid {pid}): {os.strerror(err.errno or 0)}",
                              code=ErrorCode.INVALID) from None
        try:
            sock = socket.socket(fileno=copy)
            try:
                listening = (sock.type == socket.SOCK_STREAM
                             and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
            finally:
                sock.detach()
        except OSError:
            listening = False
        if not listening:
            os.close(copy)
            raise CorralError(f"{op}: descriptor {fd} of driver {slot.name!r} is not a "
                              "listening stream socket", code=ErrorCode.INVALID)
        return copy

    async def _socket_keep(self, peer: Peer, args: SocketKeep) -> dict[str, Any]:
        """Keep a copy of the driver's listening TCP socket for its next process."""
        slot = self._listen_sockets_driver(peer, "socket.keep", "keep sockets")
        copy = self._take_listen_fd(slot, args.pid, args.fd, op="socket.keep")
        kept, replaced = self.sockets.keep(slot.name, args.key, copy)
        log.info("socket kept", driver=slot.name, key=kept.key,
                 address=f"{kept.host}:{kept.port}", replaced=replaced)
        return {**kept.as_json(), "replaced": replaced}

    async def _socket_list(self, peer: Peer, args: Any) -> dict[str, Any]:
        """The sockets kept for the calling driver (never another driver's)."""
        slot = self._listen_sockets_driver(peer, "socket.list", "list kept sockets")
        return {"sockets": [k.as_json() for k in self.sockets.list(slot.name)]}

    async def _socket_release(self, peer: Peer, args: SocketKey) -> dict[str, Any]:
        """Close the kernel's copy the calling driver kept under ``key``."""
        slot = self._listen_sockets_driver(peer, "socket.release", "release kept sockets")
        released = self.sockets.release(slot.name, args.key)
        if released:
            log.info("socket released", driver=slot.name, key=args.key)
        return {"released": released}

    async def _signal(self, peer: Peer, args: InstanceSignal) -> dict[str, Any]:
        return self.deployer.signal(args.instance_id, args.signal, args.group)

    async def _stop_instance(self, peer: Peer, args: InstanceId) -> dict[str, Any]:
        return await self.deployer.stop(args.instance_id)

    async def _wait_instance(self, peer: Peer, args: InstanceWait) -> dict[str, Any]:
        return await self.deployer.wait_job(args.instance_id, args.timeout_s)

    async def _publish(self, peer: Peer, args: Publish) -> dict[str, Any]:
        self.bus.publish(args.topic, args.data)
        return {}

    # ---- life ----------------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Start everything, serve until SIGTERM/SIGINT, then stop (apps keep running)."""
        become_subreaper()
        protect_signal_handlers()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await asyncio.to_thread(self.hosts.register)
        if self.cluster is not None:  # apps adopted elsewhere while this host was lost
            await asyncio.to_thread(self.cluster.evict)
        await self.bus.start()
        await asyncio.to_thread(self.keys.sync)
        self._share_with_gateway()
        serving = asyncio.ensure_future(self.bus.serve())
        self.deployer.restore()
        self.supervisor.load()
        await self.supervisor.start()
        housekeeping = asyncio.ensure_future(self._housekeeping())
        mailbox = (asyncio.ensure_future(self.forwarder.serve())
                   if self.forwarder is not None else None)
        if self.cluster is not None:
            self.cluster.start()
        (self.runtime / "kernel.pid").write_text(f"{os.getpid()}\n")
        log.info("kernel ready", endpoint=self.bus.endpoint, home=str(self.home),
                 drivers=[s.name for s in self.supervisor.slots.values()])
        _release_startup_memory()
        if ready is not None:
            ready()
        await self._stop.wait()
        log.info("kernel stopping; apps keep running")
        housekeeping.cancel()
        if mailbox is not None:
            mailbox.cancel()
        if self.cluster is not None:
            self.cluster.stop()
        await self.supervisor.stop(kill_drivers=self.stop_drivers_on_exit)
        if self.stop_drivers_on_exit:
            await self.bus.say_bye("kernel stopping")
        serving.cancel()
        self.bus.close()
        self.sockets.close()
        if self.cluster is not None and self.cluster.leader is not None and self.deployer.apps:
            # its apps run on: the host is not gone. The lease lapses after ttl_s unless a
            # kernel started meanwhile (a restart) takes it over; only then are they re-placed
            log.info("host lease left to lapse: apps keep running here",
                     ttl_s=self.hosts.ttl_s, apps=sorted(self.deployer.apps))
        else:
            await asyncio.to_thread(self.hosts.leave)
        self.ledger.close()
        (self.runtime / "kernel.pid").unlink(missing_ok=True)

    async def _housekeeping(self) -> None:
        beat = self.hosts.ttl_s / 3
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            self.ledger.expire()
            if self.cluster is None and time.monotonic() - last >= beat:
                last = time.monotonic()
                count = sum(len(a.instances) for a in self.deployer.apps.values())
                try:
                    await asyncio.to_thread(self.hosts.keepalive, count)
                except CorralError as exc:
                    log.error("host keepalive failed", error=exc.reason)


def _release_startup_memory() -> None:
    """Start-up (imports, entry-point scans) leaves freed heap behind: give it back."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _first(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(p) for p in e['loc']) or '(args)'}: {e['msg']}"
    return str(exc)


def _without_prefix(exc: CorralError, prefix: str) -> CorralError:
    """``exc`` with ``prefix`` (an upload's staging directory) cut from its text: the user
    reads ``corral.toml:3``, not where the kernel unpacked it."""
    import json

    if isinstance(exc, ManifestError):
        return ManifestError([p.replace(prefix, "") for p in exc.problems],
                             file=exc.file.replace(prefix, "") if exc.file else None)
    details = json.loads(json.dumps(exc.details, default=str).replace(prefix, ""))
    return CorralError(exc.reason.replace(prefix, ""), code=exc.code, retry=exc.retry,
                       details=details)


def _who(peer: Peer) -> str:
    """Who a client is, as releases record it: the user name of its uid, or the SSH key
    (``key:NAME``) a remote peer speaks for."""
    import pwd

    if peer.role == "remote":
        return f"key:{peer.hello.name}"
    if peer.identity == FORWARDED_PEER:  # already "who@host", as the asking host said
        return peer.hello.name
    try:
        return pwd.getpwuid(peer.uid).pw_name
    except KeyError:
        return f"uid {peer.uid}"
