"""The deploy sequence against a fake driver set (httpx's MockTransport, Nomad's driver
harness): a failure injected at each step undoes exactly the earlier steps; conflicting plan
fragments are refused; a launch driver missing from a plan stops the launch; a redeploy that
fails its health gate leaves the running generation untouched.

The ledger is the real SQLite one; processes are real (``sleep``) but started by a fake
launcher without a sandbox, so these tests need no root and no driver process.
"""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral import launch as primitives
from corral.deploy import Deployer, DriverCallError
from corral.errors import CorralError, DriverUnavailableError, ErrorCode, LaunchError
from corral.host import HostConfig
from corral.ledger import Ledger, SqliteLedger, Txn, open_ledger
from corral.protocol import LaunchPlan, ManifestCheck, ManifestChecked
from corral.protocol._ops import Deploy


class FakeDrivers:
    """``corral.deploy.Drivers`` with two drivers, 'a' and 'b', that do what the test says.

    ``fail[op] = driver``: that driver fails ``op``. ``fragments[driver]``: its
    ``instance.prepare`` reply. ``unhealthy``: instance ids the health gate refuses.
    ``calls``: every (op, driver, instance-or-app) in order.
    """

    names = ("a", "b")

    def __init__(self) -> None:
        self.fail: dict[str, str] = {}
        self.fail_on_instance: dict[str, str] = {}  # op -> instance id that makes it fail
        self.fragments: dict[str, dict[str, Any]] = {"a": {}, "b": {}}
        self.unhealthy: set[str] = set()
        self.rolling = True
        self.drop_from_plan: str | None = None
        self.calls: list[tuple[str, str, str]] = []

    @staticmethod
    def _subject(args: dict[str, Any]) -> str:
        if "instance" in args:
            inst = args["instance"]
            return str(inst["spec"]["id"] if "spec" in inst else inst["id"])
        if "instance_id" in args:
            return str(args["instance_id"])
        app = args.get("app")
        return str(app["name"] if isinstance(app, dict) else app)

    def _one(self, op: str, driver: str, args: dict[str, Any]) -> dict[str, Any] | None:
        subject = self._subject(args)
        self.calls.append((op, driver, subject))
        if self.fail.get(op) == driver or (
                driver == "b" and self.fail_on_instance.get(op) == subject):
            return None
        if op == "instance.prepare":
            return dict(self.fragments[driver])
        return {}

    async def gather(self, op: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for d in self.names:
            if op == "instance.prepare" and d == self.drop_from_plan:
                continue
            res = self._one(op, d, args)
            if res is None:
                raise CorralError(f"driver {d!r} failed {op}: injected", code=ErrorCode.INTERNAL)
            out[d] = res
        return out

    async def broadcast(self, op: str, args: dict[str, Any], *, only: list[str] | None = None,
                        strict: bool = True) -> list[str]:
        ok, failed = [], []
        for d in self.names:
            if only is not None and d not in only:
                continue
            (ok if self._one(op, d, args) is not None else failed).append(d)
        if strict and failed:
            raise DriverCallError(f"{failed} failed {op}", code=ErrorCode.INTERNAL,
                                  succeeded=ok)
        return ok

    async def require(self, manifest: dict[str, Any] | None, *, doing: str) -> None:
        return None

    async def owners(self, sections: Collection[str]) -> dict[str, str]:
        return {}

    async def check_manifest(self, request: ManifestCheck) -> ManifestChecked:
        return ManifestChecked()

    def missing(self, replied: Collection[str]) -> DriverUnavailableError | None:
        for d in self.names:
            if d not in replied:
                return DriverUnavailableError(f"driver {d!r} is restarting", driver=d,
                                              state="restarting", driver_reason="")
        return None

    def confined(self) -> bool:
        return True

    def has_feature(self, feature: str) -> bool:
        return feature == "instance_addresses" and self.rolling

    async def ask_each(self, op: str, make_args: Callable[[float], dict[str, Any]], *,
                       within: float, abort: Callable[[], str | None], what: str,
                       judge: Callable[[str, dict[str, Any]], None]) -> None:
        args = make_args(within)
        subject = self._subject(args)
        self.calls.append((op, "b", subject))
        if subject in self.unhealthy:
            judge("b", {"healthy": False, "health": "http 500"})
        else:
            judge("b", {"healthy": True, "health": "ok"})

    async def output_tail(self, app: str, instance: str) -> str:
        return ""

    def ops(self, op: str) -> list[tuple[str, str]]:
        """(driver, subject) of every call of ``op``."""
        return [(d, s) for o, d, s in self.calls if o == op]


class FakeLauncher:
    """The real process primitives, but ``launch`` runs the command without a sandbox;
    ``fail_on`` names an instance id whose launch fails."""

    def __init__(self) -> None:
        self.fail_on: str | None = None
        self.started: list[int] = []

    def launch(self, plan: LaunchPlan) -> tuple[int, float]:
        if plan.instance.id == self.fail_on:
            raise LaunchError("injected launch failure", step="exec")
        proc = subprocess.Popen(plan.instance.argv, env=plan.instance.env,
                                cwd=plan.instance.cwd, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(proc.pid)
        return proc.pid, psutil.Process(proc.pid).create_time()

    is_alive = staticmethod(primitives.is_alive)
    terminate = staticmethod(primitives.terminate)
    signal_instance = staticmethod(primitives.signal_instance)
    reap = staticmethod(primitives.reap)
    describe_exit = staticmethod(primitives.describe_exit)
    wait_exit = staticmethod(primitives.wait_exit)
    take_fd = staticmethod(primitives.take_fd)


class Recorder:
    """``Events``: keeps every topic published."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        self.topics.append(topic)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.app = tmp / "app"
        self.app.mkdir()
        self.write(version="1")
        self.ledger: Ledger = open_ledger("sqlite:", tmp / "home")
        self.drivers = FakeDrivers()
        self.launcher = FakeLauncher()
        self.events = Recorder()
        self.deployer = Deployer(
            ledger=self.ledger, drivers=self.drivers, events=self.events, home=tmp / "home",
            notify_dir=tmp / "notify", config=HostConfig(), launcher=self.launcher,
            as_root=False)

    def write(self, *, version: str) -> None:
        (self.app / "corral.toml").write_text(textwrap.dedent(f'''
            [app]
            name = "seq"
            [processes]
            web = {{ command = "sleep 600 # {version}", instances = 2 }}
        '''))

    def up(self, version: str = "1") -> dict[str, Any]:
        self.write(version=version)
        return asyncio.run(self._up())

    async def _up(self) -> dict[str, Any]:
        try:
            return await self.deployer.deploy(Deploy(directory=str(self.app), wait_s=10))
        finally:  # the instances' watchers belong to this loop: cancel them before it closes
            for state in self.deployer.apps.values():
                for live in state.instances.values():
                    if live.watcher is not None:
                        live.watcher.cancel()

    def held(self) -> set[tuple[str, str]]:
        return {(r.kind, r.key) for r in self.ledger.list(owner="seq")}

    def cleanup(self) -> None:
        for pid in self.launcher.started:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
            primitives.reap(pid)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_first_deploy_goes_through_every_step(h: Harness) -> None:
    """attach, then per instance prepare and launch, then the join; the ledger holds the app
    and both instances; the events tell the story in order."""
    res = h.up()
    assert [i["id"] for i in res["instances"]] == ["seq.web.1", "seq.web.2"]
    assert all(_alive(i["pid"]) for i in res["instances"])
    assert h.held() == {("app", "seq"), ("instance", "seq.web.1"), ("instance", "seq.web.2")}
    ops = [op for op, _, _ in h.drivers.calls]
    assert ops == ["app.attach", "app.attach", "instance.prepare", "instance.prepare",
                   "instance.prepare", "instance.prepare", "instance.started",
                   "instance.started"]
    topics = [t.removeprefix("app.seq.") for t in h.events.topics]
    assert topics == ["release.created", "deploy.started", "instance.started", "instance.ready",
                      "instance.started", "instance.ready", "instance.healthy",
                      "instance.healthy", "deployed"]


@pytest.mark.parametrize("step", ["attach", "prepare", "launch", "health"])
def test_a_failure_at_each_step_undoes_exactly_the_earlier_steps(h: Harness, step: str
                                                                  ) -> None:
    """The failure is injected in the second instance (or the second driver's attach):
    what was done before it is undone, in reverse, and nothing else; the ledger is empty;
    no process is left; only drivers that attached are detached."""
    if step == "attach":
        h.drivers.fail["app.attach"] = "b"
    elif step == "prepare":
        h.drivers.fail_on_instance["instance.prepare"] = "seq.web.2"
    elif step == "launch":
        h.launcher.fail_on = "seq.web.2"
    else:
        h.drivers.unhealthy.add("seq.web.2")
    with pytest.raises(CorralError) as err:
        h.up()
    assert f"failed at step {step if step in ('attach', 'health') else 'launch'!r}" in (
        err.value.reason), err.value.reason
    assert h.held() == set()
    assert not any(_alive(p) for p in h.launcher.started)
    assert "seq" not in h.deployer.apps
    detached = {d for d, _ in h.drivers.ops("app.detach")}
    assert detached == ({"a"} if step == "attach" else {"a", "b"})
    launched = len(h.launcher.started)
    assert launched == {"attach": 0, "prepare": 1, "launch": 1, "health": 2}[step]
    # every launched instance was drained and stopped through the drivers
    stopped = {s for _, s in h.drivers.ops("instance.stopped")}
    expected = {"attach": set(), "prepare": {"seq.web.1", "seq.web.2"},
                "launch": {"seq.web.1", "seq.web.2"}, "health": {"seq.web.1", "seq.web.2"}}
    assert stopped == expected[step]
    assert h.events.topics[-1] == "app.seq.deploy.failed"


def test_a_redeploy_failing_its_health_gate_keeps_the_running_generation(h: Harness) -> None:
    """Generation 2 starts beside generation 1 (instance addresses) and one of its instances
    stays unhealthy: both new instances are stopped, the old ones were never touched, the
    ledger holds what it held, the manifest file is generation 1's."""
    first = h.up("1")
    old = {i["id"]: i["pid"] for i in first["instances"]}
    held = h.held()
    manifest = (h.deployer.home / "apps" / "seq" / "manifest.json").read_text()
    h.drivers.unhealthy.add("seq.web.2-g2")
    with pytest.raises(LaunchError, match=r"did not turn healthy.*running release was kept"):
        h.up("2")
    state = h.deployer.apps["seq"]
    assert {i: lv.record.pid for i, lv in state.instances.items()} == old
    assert all(_alive(p) for p in old.values())
    assert h.held() == held
    assert (h.deployer.home / "apps" / "seq" / "manifest.json").read_text() == manifest
    assert state.spec.generation == 1
    assert not {s for _, s in h.drivers.ops("instance.stopping")} & set(old)


def test_conflicting_fragments_from_two_drivers_are_refused(h: Harness) -> None:
    """Two drivers both setting the instance's network namespace, differently: refused
    before anything starts, naming both."""
    h.drivers.fragments["a"] = {"netns": "/run/netns/one"}
    h.drivers.fragments["b"] = {"netns": "/run/netns/two"}
    with pytest.raises(CorralError, match="drivers 'a' and 'b' both set netns"):
        h.up()
    assert h.launcher.started == [] and h.held() == set()


def test_a_launch_driver_missing_from_the_plan_stops_the_launch(h: Harness) -> None:
    """A driver every launch needs did not contribute (it dropped out after the wait):
    the instance is not started, the deploy fails closed naming it."""
    h.drivers.drop_from_plan = "b"
    with pytest.raises(DriverUnavailableError, match="driver 'b' is restarting"):
        h.up()
    assert h.launcher.started == [] and h.held() == set()


def test_without_instance_addresses_an_old_instance_goes_before_its_replacement(
        h: Harness) -> None:
    """No driver gives instances their own address: a slot's old instance is stopped before
    the new one starts, and a failed redeploy starts the old one again."""
    h.drivers.rolling = False
    h.up("1")
    h.drivers.unhealthy.add("seq.web.1")
    with pytest.raises(LaunchError):
        h.up("2")
    state = h.deployer.apps["seq"]
    assert set(state.instances) == {"seq.web.1", "seq.web.2"}
    assert all(_alive(lv.record.pid) for lv in state.instances.values())
    assert state.spec.generation == 1


def test_restart_replaces_unchanged_instances_beside_the_old_ones(h: Harness) -> None:
    """`corral restart`: every instance is replaced although its spec did not change (a rerun
    of `up` would keep it), the new ones join before the old ones are stopped; an unknown
    process is refused and changes nothing."""
    from corral.protocol._ops import Restart

    first = h.up("1")
    old = {i["id"]: i["pid"] for i in first["instances"]}
    assert {i["pid"] for i in h.up("1")["instances"]} == set(old.values())  # up keeps them

    async def restart(**kw: Any) -> dict[str, Any]:
        try:
            return await h.deployer.restart(Restart(name="seq", **kw))
        finally:
            for live in h.deployer.apps["seq"].instances.values():
                if live.watcher is not None:
                    live.watcher.cancel()

    with pytest.raises(CorralError, match="has no process 'api'"):
        asyncio.run(restart(process="api"))
    assert {lv.record.pid for lv in h.deployer.apps["seq"].instances.values()} == set(
        old.values())
    mark = len(h.drivers.calls)
    res = asyncio.run(restart())
    assert sorted(i["id"] for i in res["instances"]) == ["seq.web.1-g3", "seq.web.2-g3"]
    assert not {i["pid"] for i in res["instances"]} & set(old.values())
    assert not any(_alive(p) for p in old.values())
    # the joins came before the first old instance was drained
    order = [(op, s) for op, _, s in h.drivers.calls[mark:]
             if op in ("instance.started", "instance.stopping")]
    first_stop = next(i for i, (op, _) in enumerate(order) if op == "instance.stopping")
    assert {s for op, s in order[:first_stop] if op == "instance.started"} == {
        "seq.web.1-g3", "seq.web.2-g3"}


def test_the_formation_set_by_scale_outlives_the_next_deploy_and_0_is_allowed(h: Harness
                                                                            ) -> None:
    """`corral scale web=3`, then `corral up` of the same manifest (which says 2): still 3
    (Heroku's formation outlives a push); `scale web=0` stops them all and the app stays
    deployed with none; the next `up` keeps it at 0."""
    from corral.protocol._ops import Scale

    async def scale(n: int) -> dict[str, Any]:
        try:
            return await h.deployer.scale(Scale(name="seq", counts={"web": n}))
        finally:
            for live in h.deployer.apps["seq"].instances.values():
                if live.watcher is not None:
                    live.watcher.cancel()

    h.up("1")
    assert len(asyncio.run(scale(3))["instances"]) == 3
    assert len(h.up("1")["instances"]) == 3
    assert h.deployer.formation("seq") == {"web": 3}
    assert asyncio.run(scale(0))["instances"] == []
    assert not any(_alive(p) for p in h.launcher.started)
    assert h.up("1")["instances"] == [] and "seq" in h.deployer.apps
    assert ("app", "seq") in h.held()


def test_stop_grace_is_per_process(h: Harness) -> None:
    """An instance that ignores SIGTERM is killed after its process's stop_grace (1 s here),
    not the host's default (30 s)."""
    import time

    (h.app / "corral.toml").write_text(textwrap.dedent('''
        [app]
        name = "seq"
        [processes]
        web = { command = "sh -c \\"trap '' TERM; sleep 600\\"", stop_grace = "1s" }
    '''))
    res = asyncio.run(h._up())
    pid = res["instances"][0]["pid"]

    async def down() -> float:
        t0 = time.monotonic()
        await h.deployer.down("seq")
        return time.monotonic() - t0

    took = asyncio.run(down())
    assert not _alive(pid)
    assert 0.9 <= took < 10, took


class NetworkedLedger(SqliteLedger):
    """A SQLite ledger that says it is networked (as etcd is) and whose commits, once
    ``hold`` is set, wait until the test lets them go: a commit run on the event loop would
    wait for a release the loop itself must give, and time out."""

    remote = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold = False
        self.waiting = threading.Event()
        self.go = threading.Event()
        self.threads: set[str] = set()

    def commit(self, txn: Txn) -> int:
        self.threads.add(threading.current_thread().name)
        if self.hold:
            self.waiting.set()
            if not self.go.wait(5):
                raise CorralError("the commit waited on the event loop: nothing let it go")
        return super().commit(txn)


def test_on_a_networked_ledger_a_deploy_s_ledger_steps_leave_the_loop_free(
        tmp_path: Path) -> None:
    """A commit that waits (an etcd that lost its quorum waits out its timeout) runs off
    the kernel's event loop: the loop lets it go meanwhile, and the deploy completes."""
    h = Harness(tmp_path)
    h.ledger = h.deployer.ledger = NetworkedLedger(tmp_path / "net.sqlite3")
    h.deployer.instances.ledger = h.deployer.releaser.ledger = h.ledger
    h.deployer.releaser.store.ledger = h.ledger
    ledger = h.ledger
    ledger.hold = True

    async def scenario() -> dict[str, Any]:
        async def let_go() -> None:
            while not ledger.waiting.is_set():
                await asyncio.sleep(0.01)
            ledger.go.set()

        helper = asyncio.ensure_future(let_go())
        try:
            return await h._up()
        finally:
            helper.cancel()

    try:
        res = asyncio.run(scenario())
        assert [i["id"] for i in res["instances"]] == ["seq.web.1", "seq.web.2"]
        assert h.held() == {("app", "seq"), ("instance", "seq.web.1"),
                            ("instance", "seq.web.2")}
        assert ledger.waiting.is_set() and threading.main_thread().name not in ledger.threads
    finally:
        h.cleanup()


class RacingLedger(SqliteLedger):
    """A SQLite ledger on which, ``races`` times, another host's deploy claims the free uid
    that was just read as free (between our list of uids and our claim)."""

    def __init__(self, path: Path, races: int) -> None:
        super().__init__(path)
        self.races = races
        self.taken: list[str] = []

    def list(self, **kw: Any) -> Any:  # type: ignore[override]
        records = super().list(**kw)
        if kw == {"kind": "uid"} and self.races > 0:
            self.races -= 1
            held = {int(r.key) for r in records}
            uid = next(u for u in range(60000, 70000) if u not in held)
            super().put(f"other{self.races}", "uid", str(uid), {"app": "other"})
            self.taken.append(str(uid))
        return records


@pytest.mark.parametrize("races", [1, 3])
def test_a_uid_claimed_by_another_host_meanwhile_is_passed_over(tmp_path: Path,
                                                                races: int) -> None:
    ledger = RacingLedger(tmp_path / "race.sqlite3", races)
    config = HostConfig(app_uids=(60000, 60999))
    deployer = Deployer(ledger=ledger, drivers=FakeDrivers(), events=Recorder(),
                        home=tmp_path / "home", notify_dir=tmp_path / "notify", config=config,
                        launcher=FakeLauncher(), as_root=True)
    uid, gid, claimed = deployer._hold_uid("seq")
    assert claimed and uid == gid == 60000 + races
    assert [r.key for r in ledger.list(owner="seq")] == [str(uid)]
    assert len(ledger.taken) == races and str(uid) not in ledger.taken
    assert deployer._hold_uid("seq") == (uid, gid, False)  # held already: kept
    deployer._unhold_uid("seq", uid, claimed)  # the app never came to run
    assert ledger.list(owner="seq") == []


def test_uids_raced_away_every_time_give_a_clear_error_and_claim_nothing(
        tmp_path: Path) -> None:
    ledger = RacingLedger(tmp_path / "race.sqlite3", races=100)
    deployer = Deployer(ledger=ledger, drivers=FakeDrivers(), events=Recorder(),
                        home=tmp_path / "home", notify_dir=tmp_path / "notify",
                        config=HostConfig(app_uids=(60000, 60999)), launcher=FakeLauncher(),
                        as_root=True)
    with pytest.raises(CorralError, match="no app uid could be claimed in 8 tries") as exc:
        deployer._hold_uid("seq")
    assert exc.value.code == ErrorCode.CONFLICT and ledger.list(owner="seq") == []
