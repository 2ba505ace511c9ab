"""Deploys end to end through the real kernel: up, ps, down, conflicts, live restore, crashes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral.ledger import open_ledger
from corral.testing import KernelProcess, free_port, running_kernel
from e2e.apps import write_app

# no drivers at all, so no sandbox: said on purpose, as a host must (else deploys are refused)
NO_DRIVERS = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'
HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    with running_kernel(public_dir / "k", NO_DRIVERS) as k:
        yield k


def test_up_ps_down_hello(public_dir: Path) -> None:
    """examples/hello deploys, answers on its manifest port, shows in ps, and goes away; the lb
    that owns its [lb] section has the deploy claim the lb name and frontend. (Its [limits]
    belong to the fs driver, not enabled on this host: the copy deployed here has none.)"""
    app = public_dir / "hello"
    shutil.copytree(HELLO, app)
    text = (app / "corral.toml").read_text()
    start = text.index("[limits]")
    (app / "corral.toml").write_text(text[:start] + text[text.index("[lb]"):])
    base = public_dir / "k"
    base.mkdir()
    with KernelProcess(base, 'disabled = ["net", "fs", "log", "cron"]\nunconfined = true\n'
                       ) as kernel:
        _up_ps_down_hello(kernel, app)


def _up_ps_down_hello(kernel: KernelProcess, app: Path) -> None:
    port, front = free_port(), free_port()
    r = kernel.cli("up", str(app), "--set", f"ports.http={port}", "--set", f"lb.frontend={front}",
                   "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["app"] == "hello" and len(res["instances"]) == 1
    assert "hello from hello.web.1" in get(port)
    ps = json.loads(kernel.cli("ps", "--json").stdout)
    inst = ps[0]["instances"][0]
    assert inst["state"] == "ready" and inst["port"] == port
    proc = psutil.Process(inst["pid"])
    if os.geteuid() == 0:
        assert proc.uids().real != 0, "apps never run as root"
    ledger = json.loads(kernel.cli("ledger", "--json").stdout)["records"]
    held = {(r["kind"], r["key"]) for r in ledger if r["owner"] == "hello"}
    assert {("app", "hello"), ("port", str(port)), ("lbname", "hello.corral.test"),
            ("port", str(front)), ("instance", "hello.web.1")} <= held
    r = kernel.cli("down", "hello")
    assert r.returncode == 0, r.stderr
    assert not psutil.pid_exists(inst["pid"]) or psutil.Process(inst["pid"]).status() == "zombie"
    ledger = json.loads(kernel.cli("ledger", "--json").stdout)["records"]
    assert [r for r in ledger if r["owner"] == "hello"] == []


def test_second_app_on_held_port_is_refused_and_claims_nothing(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """A conflict names the holder; the refused app holds nothing afterwards."""
    p1, p2 = free_port(), free_port()
    a = write_app(public_dir / "a", "blog", {"http": p1}, {"web": '{ command = "python3 server.py",'
                                                              ' port = "http" }'})
    b = write_app(public_dir / "b", "shop", {"admin": p2, "http": p1},
                  {"web": '{ command = "python3 server.py", port = "http" }'})
    assert kernel.cli("up", str(a)).returncode == 0
    r = kernel.cli("up", str(b))
    assert r.returncode == 1
    assert f"port {p1} is held by app 'blog' since" in r.stderr
    recs = kernel.call("ledger.list", {"owner": "shop"})["records"]
    assert recs == []
    assert kernel.call("ledger.list", {"kind": "port"})["records"][0]["owner"] == "blog"


def test_bad_manifest_exits_2_and_claims_nothing(kernel: KernelProcess, public_dir: Path) -> None:
    """corral up of an invalid manifest: file, line, field in the message; exit 2; no claim."""
    d = write_app(public_dir / "bad", "bad", {"http": 70000},
                  {"web": '{ command = "python3 server.py", port = "http" }'})
    r = kernel.cli("up", str(d))
    assert r.returncode == 2
    assert "corral.toml:4" in r.stderr and "ports.http" in r.stderr
    assert [r for r in kernel.call("ledger.list")["records"]
            if not r["owner"].startswith("host:")] == []  # the host's own records only


def test_readiness_by_sd_notify(kernel: KernelProcess, public_dir: Path) -> None:
    """A portless process is ready when it sends READY=1 on NOTIFY_SOCKET."""
    d = public_dir / "notify"
    d.mkdir()
    (d / "w.py").write_text(
        "import os, socket, time\ntime.sleep(0.7)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'STATUS=warming\\nREADY=1', os.environ['NOTIFY_SOCKET'])\n"
        "time.sleep(600)\n")
    (d / "corral.toml").write_text('[app]\nname = "worker"\n[processes]\n'
                                   'work = { command = "python3 w.py", ready = "notify" }\n')
    t0 = time.monotonic()
    r = kernel.cli("up", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["instances"][0]["state"] == "ready"
    assert time.monotonic() - t0 >= 0.7


def test_instance_that_dies_before_ready_fails_the_deploy_cleanly(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """The deploy names the step and the exit; everything claimed is released."""
    port = free_port()
    d = write_app(public_dir / "crash", "crash", {"http": port},
                  {"web": '{ command = "python3 -c \'import sys; print(42); sys.exit(4)\'", '
                          'port = "http" }'})
    r = kernel.cli("up", str(d))
    assert r.returncode == 1
    assert "step 'launch'" in r.stderr and "exited before it was ready" in r.stderr
    assert "exit 4" in r.stderr and "42" in r.stderr
    assert kernel.call("ledger.list", {"owner": "crash"})["records"] == []


def test_crashed_instance_is_restarted(kernel: KernelProcess, public_dir: Path) -> None:
    """An instance that dies after it was ready is relaunched by the kernel."""
    port = free_port()
    d = write_app(public_dir / "r", "resto", {"http": port},
                  {"web": '{ command = "python3 server.py", port = "http" }'})
    assert kernel.cli("up", str(d)).returncode == 0
    pid = kernel.call("app.ps")["apps"][0]["instances"][0]["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    new = pid
    while time.monotonic() < deadline:
        insts = kernel.call("app.ps")["apps"][0]["instances"]
        if insts and insts[0]["pid"] != pid and insts[0]["state"] == "ready":
            new = insts[0]["pid"]
            break
        time.sleep(0.05)
    assert new != pid
    assert get(port).strip() == "resto.web.1"


def test_instances_survive_kernel_restarts(public_dir: Path) -> None:
    """Live restore: kill -9 and SIGTERM of corrald leave the app serving; it is re-adopted."""
    port = free_port()
    d = write_app(public_dir / "lr", "lr", {"http": port},
                  {"web": '{ command = "python3 server.py", port = "http", instances = 2 }'})
    base = public_dir / "k"
    base.mkdir()
    k = KernelProcess(base, NO_DRIVERS)
    k.start()
    try:
        r = k.cli("up", str(d), "--set", "processes.web.instances=1")
        assert r.returncode == 0, r.stderr
        before = k.call("app.ps")["apps"][0]["instances"]
        k.kill9()
        assert get(port).strip() == "lr.web.1"
        k.start()
        after = k.call("app.ps")["apps"][0]["instances"]
        assert [(i["id"], i["pid"]) for i in after] == [(i["id"], i["pid"]) for i in before]
        k.stop()  # orderly stop: apps keep running too
        assert get(port).strip() == "lr.web.1"
        k.start()
        again = k.call("app.ps")["apps"][0]["instances"]
        assert again[0]["pid"] == before[0]["pid"]
        # the re-adopted instance is still supervised: kill it, it comes back
        os.kill(before[0]["pid"], 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            insts = k.call("app.ps")["apps"][0]["instances"]
            if insts and insts[0]["pid"] != before[0]["pid"] and insts[0]["state"] == "ready":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("re-adopted instance was not restarted")
    finally:
        k.teardown()


def test_kill9_of_kernel_during_up_is_all_or_nothing_and_rerun_completes(
    public_dir: Path,
) -> None:
    """kill -9 of corrald at random moments of `corral up`, repeatedly.

    After each kill: the ledger holds the whole claim set of the deploy or none of it; a rerun
    completes; instances that were already running are not killed by the rerun.
    """
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}
    procs = {n: f'{{ command = "python3 server.py", port = "{n}" }}' for n in ports}
    d = write_app(public_dir / "slow", "slow", ports, procs,
                  extra='[paths]\ndata = { path = "data", mode = "rw", create = true }\n')
    (d / "corral.toml").write_text((d / "corral.toml").read_text())
    base = public_dir / "k"
    base.mkdir()
    rng = random.Random(1234)
    k = KernelProcess(base, NO_DRIVERS + "heartbeat_ms = 250\n", extra_env={"START_DELAY": "0.15"})
    try:
        for round_ in range(6):
            k.start()
            cli = subprocess.Popen([sys.executable, "-m", "corral.cli", "up", str(d)], env=k.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.0, 0.9))
            k.kill9()
            cli.wait(30)
            ledger = open_ledger("sqlite:", k.home)
            held = {(r.kind, r.key) for r in ledger.list(owner="slow")}
            claim_set = {("app", "slow"), *{("port", str(p)) for p in ports.values()}}
            if os.geteuid() == 0:
                claim_set |= {r for r in held if r[0] == "uid"}
            claim_set.add(("path", str(d / "data")))
            assert held & claim_set in (set(), claim_set), f"round {round_}: partial {held}"
            ledger.close()
            k.start()
            running = {i["id"]: i["pid"] for a in k.call("app.ps")["apps"]
                       for i in a["instances"] if i["state"] == "ready"}
            r = k.cli("up", str(d))
            assert r.returncode == 0, f"round {round_}: rerun failed: {r.stderr}"
            now = {i["id"]: i["pid"] for i in k.call("app.ps")["apps"][0]["instances"]}
            assert len(now) == 3
            for iid, pid in running.items():
                assert now[iid] == pid, f"round {round_}: running {iid} was replaced"
            for name, port in ports.items():
                assert get(port).strip() == f"slow.{name}.1"
            if round_ % 2:
                assert k.cli("down", "slow").returncode == 0
            k.kill9()
    finally:
        k.start()
        k.teardown()
    assert not [p for p in psutil.process_iter() if _is_ours(p, k)]


def _is_ours(p: psutil.Process, k: KernelProcess) -> bool:
    try:
        return p.environ().get("CORRAL_MANIFEST", "").startswith(str(k.home))
    except (psutil.Error, OSError):
        return False


def _held(k: KernelProcess, owner: str) -> set[tuple[str, str, str]]:
    """What ``owner`` holds apart from instance records, values included."""
    return {(r["kind"], r["key"], json.dumps(r["value"], sort_keys=True))
            for r in k.call("ledger.list", {"owner": owner})["records"] if r["kind"] != "instance"}


def test_failed_redeploy_leaves_the_previous_generation_as_it_was(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """A redeploy that fails undoes itself: the ledger holds exactly what it held (a port the
    new manifest wanted is free again), the app's manifest file is the old one, and the
    previous instances serve, whether they were kept running or stopped to make room."""
    p1, p2 = free_port(), free_port()
    d = write_app(public_dir / "redo", "redo", {"http": p1},
                  {"web": '{ command = "python3 server.py", port = "http" }'})
    r = kernel.cli("up", str(d))
    assert r.returncode == 0, r.stderr
    held, manifest = _held(kernel, "redo"), (kernel.home / "apps/redo/manifest.json").read_text()
    pid = kernel.call("app.ps")["apps"][0]["instances"][0]["pid"]
    crash = "python3 -c 'import sys; sys.exit(3)'"

    # 1. a new worker process dies before it is ready (web, of the new release too, was
    # replaced first: without instance addresses it shares the port, so the old one went
    # first and is started again by the undo)
    r = kernel.cli("up", str(d), "--set", f"processes.worker.command={crash}")
    assert r.returncode == 1 and "step 'launch'" in r.stderr, r.stderr
    assert _held(kernel, "redo") == held
    assert (kernel.home / "apps/redo/manifest.json").read_text() == manifest
    [app] = kernel.call("app.ps")["apps"]
    assert [i["id"] for i in app["instances"]] == ["redo.web.1"] and app["release"] == 1
    assert app["instances"][0]["pid"] != 0 and pid != 0
    assert get(p1).strip() == "redo.web.1"

    # 2. web moves to another port (so the old one is stopped first) and dies
    r = kernel.cli("up", str(d), "--set", f"ports.http={p2}",
                   "--set", f"processes.web.command={crash}")
    assert r.returncode == 1 and "step 'launch'" in r.stderr, r.stderr
    assert _held(kernel, "redo") == held  # p2 released, p1 held again
    assert not [r for r in kernel.call("ledger.list", {"kind": "port"})["records"]
                if r["key"] == str(p2)]
    assert (kernel.home / "apps/redo/manifest.json").read_text() == manifest
    [inst] = kernel.call("app.ps")["apps"][0]["instances"]
    assert inst["state"] == "ready" and inst["port"] == p1
    assert get(p1).strip() == "redo.web.1"

    # and a good redeploy goes through afterwards
    r = kernel.cli("up", str(d), "--set", f"ports.http={p2}")
    assert r.returncode == 0, r.stderr
    assert get(p2).strip().startswith("redo.web.1")


def test_scale_sets_instance_counts_of_the_deployed_manifest(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """`corral scale APP worker=3`: new instances start, the others are kept as they run; down
    to 1 stops the surplus; the deployed manifest is scaled, not the directory's current one;
    unknown processes, unknown apps and bad counts are refused and change nothing."""
    port = free_port()
    sleeper = '{ command = "python3 -c \'import time; time.sleep(1e6)\'", ready = "started" }'
    d = write_app(public_dir / "sc", "sc", {"http": port},
                  {"web": '{ command = "python3 server.py", port = "http" }',
                   "worker": sleeper})
    assert kernel.cli("up", str(d)).returncode == 0

    def pids() -> dict[str, int]:
        [app] = kernel.call("app.ps")["apps"]
        return {i["id"]: i["pid"] for i in app["instances"] if i["state"] == "ready"}

    before = pids()
    assert set(before) == {"sc.web.1", "sc.worker.1"}
    # edit the directory's manifest: scale must not pick this up
    (d / "corral.toml").write_text((d / "corral.toml").read_text().replace("1e6", "2e6"))
    r = kernel.cli("scale", "sc", "worker=3", "--json")
    assert r.returncode == 0, r.stderr
    after = pids()
    assert set(after) == {"sc.web.1", "sc.worker.1", "sc.worker.2", "sc.worker.3"}
    assert {k: after[k] for k in before} == before  # kept, not restarted
    assert json.loads(r.stdout)["generation"] == 2
    for pid in after.values():
        assert "2e6" not in " ".join(psutil.Process(pid).cmdline())

    held = _held(kernel, "sc")
    for argv, code, message in (
        (["scale", "sc", "nope=2"], 1, "has no process 'nope'"),
        (["scale", "sc", "worker=-1"], 2, "expected PROCESS=N with N >= 0"),
        (["scale", "sc", "worker=many"], 2, "expected PROCESS=N with N >= 0"),
        (["scale", "ghost", "web=2"], 1, "no app named 'ghost'"),
    ):
        r = kernel.cli(*argv)
        assert r.returncode == code and message in r.stderr, (argv, r.returncode, r.stderr)
    assert pids() == after and _held(kernel, "sc") == held

    r = kernel.cli("scale", "sc", "worker=1")
    assert r.returncode == 0, r.stderr
    assert pids() == {"sc.web.1": before["sc.web.1"], "sc.worker.1": before["sc.worker.1"]}
    for gone in ("sc.worker.2", "sc.worker.3"):
        assert not psutil.pid_exists(after[gone]) or \
            psutil.Process(after[gone]).status() == psutil.STATUS_ZOMBIE
