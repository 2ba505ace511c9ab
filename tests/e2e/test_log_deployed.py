"""The log driver through the real kernel: apps deployed with `corral up`, read with the CLI.

A KernelProcess runs corrald with the log and fs drivers (the app runs sandboxed, as its own
uid, in a pid namespace under tini), so what is checked here is what a user meets: `corral
logs` (order, instance, stream, --grep, --since, --json, -f), `corral errors`, `corral top`,
`corral ps`, the guarantee of docs/drivers/log.md across a kill -9 of the driver, and the
[logs] sinks of a manifest.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral.testing import KernelProcess, running_kernel, wait_for
from corral_log.testing import SyslogReceiver

pytestmark = pytest.mark.root

HOST = "[drivers.log]\nconfig = { metrics = false }\n[drivers.fs]\n"



def drivers(k: KernelProcess) -> dict[str, dict[str, Any]]:
    r = k.cli("drivers", "--json")
    assert r.returncode == 0, r.stderr
    return {d["name"]: d for d in json.loads(r.stdout)}


def all_running(k: KernelProcess, names: tuple[str, ...]) -> bool:
    found = drivers(k)
    return all(found.get(n, {}).get("state") == "running" for n in names)


def cli_json(k: KernelProcess, *argv: str) -> Any:
    r = k.cli(*argv, "--json")
    assert r.returncode == 0, f"corral {' '.join(argv)}: {r.stderr}"
    return json.loads(r.stdout)


def records(k: KernelProcess, app: str, *extra: str) -> list[dict[str, Any]]:
    """`corral logs APP --json`: one JSON record per line."""
    r = k.cli("logs", app, "-n", "100000", *extra, "--json")
    assert r.returncode == 0, f"corral logs {app} {' '.join(extra)}: {r.stderr}"
    return [json.loads(line) for line in r.stdout.splitlines()]


def make_app(d: Path, name: str, script: str, extra: str = "") -> Path:
    d.mkdir(parents=True)
    (d / "app.py").write_text(textwrap.dedent(script))
    data = d / "data"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is chosen at deploy
    (d / "corral.toml").write_text(
        f'[app]\nname = "{name}"\n[processes]\n'
        'main = { command = "python3 -u app.py", ready = "started" }\n'
        '[paths]\ndata = { path = "data", mode = "rw" }\n' + extra)
    d.chmod(0o755)
    return d


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    with running_kernel(public_dir / "k", HOST, drivers=("log", "fs")) as k:
        yield k


# The app: a plain line, a JSON line, a traceback, a pause, the same traceback again from the
# same code (one group, count 2), then a numbered tick every 0.2 s for `corral logs -f`.
TALKER = '''
    import json, sys, time, traceback
    def divide():
        return 1 / 0
    def fail():
        try:
            divide()
        except ZeroDivisionError:
            traceback.print_exc()
            sys.stderr.flush()
    print("plain alpha", flush=True)
    time.sleep(0.3)
    print(json.dumps({"level": "warn", "msg": "structured beta", "n": 7}), flush=True)
    time.sleep(0.3)
    fail()
    time.sleep(1.5)
    print("plain gamma", flush=True)
    time.sleep(0.3)
    fail()
    time.sleep(1.5)
    i = 0
    while True:
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(0.2)
'''


def test_logs_errors_top_ps_of_a_deployed_app(kernel: KernelProcess, public_dir: Path) -> None:
    """corral logs shows plain, JSON and traceback lines in order with instance and stream;
    --grep, --since, --json and -f work; errors groups the two tracebacks; top and ps see it."""
    app = make_app(public_dir / "talker", "talker", TALKER)
    r = kernel.cli("up", str(app), "--json")
    assert r.returncode == 0, r.stderr
    inst = json.loads(r.stdout)["instances"][0]
    assert psutil.Process(inst["pid"]).uids().real >= 61000

    recs = wait_for(lambda: (lambda rs: rs if any(x["message"] == "tick 0" for x in rs)
                             else None)(records(kernel, "talker")))
    msgs = [x["message"] for x in recs]
    assert msgs[:2] == ["plain alpha", json.dumps({"level": "warn", "msg": "structured beta",
                                                   "n": 7})]
    assert all(x["instance"] == "talker.main.1" and x["process"] == "main" for x in recs)
    assert recs[0]["stream"] == "stdout" and recs[1]["stream"] == "stdout"
    assert recs[1]["fields"] == {"level": "warn", "msg": "structured beta", "n": 7}
    tb1 = msgs.index("Traceback (most recent call last):")
    gamma = msgs.index("plain gamma")
    tb2 = msgs.index("Traceback (most recent call last):", gamma)
    assert 1 < tb1 < gamma < tb2 < msgs.index("tick 0")
    zero = [i for i, m in enumerate(msgs) if m == "ZeroDivisionError: division by zero"]
    assert len(zero) == 2 and tb1 < zero[0] < gamma < zero[1]
    assert {recs[i]["stream"] for i in range(tb1, zero[0] + 1)} == {"stderr"}
    assert [x["time_ns"] for x in recs] == sorted(x["time_ns"] for x in recs)

    # the text form: time, instance, '!' for stderr, the message
    text = kernel.cli("logs", "talker").stdout.splitlines()
    assert any(re.fullmatch(r"\S+Z talker\.main\.1 \| plain alpha", ln) for ln in text), text[:5]
    assert any(ln.endswith("talker.main.1!| ZeroDivisionError: division by zero")
               for ln in text)

    # --grep (a regular expression on the message), --since (ISO instant, and a duration)
    grepped = records(kernel, "talker", "--grep", "^plain (alpha|gamma)$")
    assert [x["message"] for x in grepped] == ["plain alpha", "plain gamma"]
    since = records(kernel, "talker", "--since", recs[gamma]["time"])
    assert since[0]["message"] == "plain gamma" and "plain alpha" not in {
        x["message"] for x in since}
    assert records(kernel, "talker", "--since", "1h")[0]["message"] == "plain alpha"
    assert records(kernel, "talker", "--grep", "^no such line$") == []

    # -f: lines written after the command started arrive on its stdout while it runs
    last_tick = max(int(m.split()[1]) for m in msgs if m.startswith("tick "))
    follow = subprocess.Popen([sys.executable, "-m", "corral.cli", "logs", "talker", "-f",
                               "-n", "1", "--grep", "^tick "], env=kernel.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        live = _read_for(follow, 4.0)
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
    ticks = [int(m.group(1)) for ln in live if (m := re.search(r"\| tick (\d+)$", ln))]
    fresh = [t for t in ticks if t > last_tick + 1]
    assert len(fresh) >= 5, f"live tail showed {ticks}"
    assert fresh == sorted(fresh) and len(set(fresh)) == len(fresh)

    # errors: one group, seen twice, at two different times
    groups = cli_json(kernel, "errors", "talker")["groups"]
    (g,) = [x for x in groups if x["type"] == "ZeroDivisionError"]
    assert g["count"] == 2 and g["language"] == "python", g
    assert g["last_seen_ns"] - g["first_seen_ns"] >= 1_000_000_000
    assert "divide" in g["sample"]
    out = kernel.cli("errors", "talker").stdout
    assert re.search(r"^\s+2x\s+ZeroDivisionError\s+\(python\)\s+first 20\d\d-.*last 20\d\d-",
                     out, re.M), out

    # top: the instance (tini and the app under it) with real figures
    rows = cli_json(kernel, "top", "--once")
    (row,) = [x for x in rows if x["instance"] == "talker.main.1"]
    assert row["pid"] == inst["pid"]
    assert row["rss_bytes"] > 5 * 2**20, row  # a python interpreter, not tini alone
    assert row["processes"] >= 2 and row["threads"] >= 2 and row["open_files"] >= 3

    # ps: the log driver's figures for the app
    ps = cli_json(kernel, "ps")
    (entry,) = [a for a in ps if a["app"] == "talker"]
    figures = entry["drivers"]["log"]
    assert figures["records"] >= len(recs) and figures["dropped_lines"] == 0, figures
    assert figures["instances"]["talker.main.1"]["records"] > 0


def _read_for(proc: subprocess.Popen[str], seconds: float) -> list[str]:
    """Lines ``proc`` printed within ``seconds`` (it keeps running)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    os.set_blocking(proc.stdout.fileno(), False)
    buf = ""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sel.select(left):
            chunk = proc.stdout.read()
            if chunk:
                buf += chunk
            elif proc.poll() is not None:
                break
    return buf.splitlines()


# numbered lines, 40 bytes each (8 MB in all, eight times the pipe), about 2 s, then idle
COUNTER = '''
    import os, sys, time
    n = 200000
    pad = "x" * 24
    out = sys.stdout.buffer
    for base in range(0, n, 500):
        out.write(b"".join(b"seq %06d %s\\n" % (i, pad.encode()) for i in range(base,
                                                                             min(n, base + 500))))
        out.flush()
        time.sleep(0.003)  # about 2 s of writing: the kill lands in the middle
    open(os.path.join(os.environ["CORRAL_PATH_DATA"], "done"), "w").close()
    time.sleep(3600)
'''


def test_kill9_of_the_log_driver_loses_no_line(kernel: KernelProcess, public_dir: Path) -> None:
    """docs/drivers/log.md: delivery is at least once. A kill -9 of the driver while an app
    writes 200,000 numbered lines: the app is not restarted (same pid), keeps writing (blocks
    meanwhile), the driver comes back, and `corral logs` has every number; duplicates, if any,
    are one contiguous block of at most pipe_size (1 MiB) stored twice."""
    total = 200_000
    app = make_app(public_dir / "counter", "counter", COUNTER)
    old = drivers(kernel)["log"]
    r = kernel.cli("up", str(app), "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["instances"][0]["pid"]
    log_file = kernel.home / "logs" / "counter" / "app.log"
    wait_for(lambda: log_file.exists() and log_file.stat().st_size > 2**19, timeout=30,
             step=0.002)
    os.kill(old["pid"], signal.SIGKILL)
    assert not (app / "data" / "done").exists(), "the app finished before the kill: no test"
    back = wait_for(lambda: (lambda d: d if d["state"] == "running" and d["pid"] != old["pid"]
                             else None)(drivers(kernel)["log"]), timeout=30)
    assert back["restarts"] >= 1
    wait_for(lambda: (app / "data" / "done").exists(), timeout=60)
    inst = cli_json(kernel, "ps")[0]["instances"][0]
    assert inst["pid"] == pid and inst["restarts"] == 0, "the app was restarted"

    def complete() -> Counter[int] | None:
        # query.log.read, the operation behind `corral logs`, in raw-line form: 10,000 lines
        # per reply stay under CDP/1's 1 MiB (the CLI's JSON records would need 80 calls)
        seen: Counter[int] = Counter()
        for block in range(total // 10_000):
            res = kernel.call("driver.query", {"capability": "log", "query": "read", "args": {
                "app": "counter", "grep": f"^seq {block:02d}\\d{{4}} ", "limit": 20_000,
                "json": False}})
            assert "truncated" not in res
            for line in res["lines"]:
                seen[int(line.split()[4])] += 1
        return seen if len(seen) == total else None

    seen = wait_for(complete, timeout=60, step=1.0)
    assert set(seen) == set(range(total)), "lines were lost"
    dup = sorted(n for n, c in seen.items() if c > 1)
    assert all(seen[n] == 2 for n in dup), "a line was stored more than twice"
    if dup:
        assert dup == list(range(dup[0], dup[-1] + 1)), "duplicates are not one block"
        assert len(dup) * 40 <= 2**20, f"{len(dup)} duplicated lines exceed one pipe_size"
    stats = cli_json(kernel, "ps")[0]["drivers"]["log"]
    assert stats["dropped_lines"] == 0
    # and the CLI shows the same lines
    cli = records(kernel, "counter", "--grep", "^seq 1234\\d\\d ")
    assert [int(x["message"].split()[1]) for x in cli if seen[int(x["message"].split()[1])] == 1
            ] == [n for n in range(123400, 123500) if seen[n] == 1]


SINK_APP = '''
    import sys, time
    for i in range(50):
        print(f"to the sinks {i}", flush=True)
    print("an error line", file=sys.stderr, flush=True)
    time.sleep(3600)
'''


def test_manifest_sinks_receive_lines(kernel: KernelProcess, public_dir: Path) -> None:
    """[logs] sinks of a deployed app: syslog over UDP and TCP to receivers the test runs,
    and a file sink in the app's directory, all get the app's lines (RFC 5424, in order)."""
    udp = SyslogReceiver("udp").start()
    tcp = SyslogReceiver("tcp").start()
    try:
        sinks = (f'sinks = [{{ type = "syslog", address = "{udp.address}", name = "u" }},\n'
                 f'  {{ type = "syslog", address = "{tcp.address}", name = "t",'
                 ' facility = "local3" },\n'
                 '  { type = "file", path = "data/app-out.log", name = "f" }]\n')
        app = make_app(public_dir / "sinky", "sinky", SINK_APP, extra="[logs]\n" + sinks)
        r = kernel.cli("up", str(app))
        assert r.returncode == 0, r.stderr

        def got(rcv: SyslogReceiver) -> list[bytes] | None:
            msgs = [m for m in list(rcv.messages) if b"to the sinks" in m
                    or b"an error line" in m]
            return msgs if len(msgs) == 51 else None

        for rcv in (udp, tcp):
            msgs: list[bytes] = wait_for(lambda rcv=rcv: got(rcv))  # type: ignore[misc]
            bodies = [m.rsplit(b"] ", 1)[-1].decode() for m in msgs]
            assert [b for b in bodies if b.startswith("to the sinks")] == [
                f"to the sinks {i}" for i in range(50)]
            assert all(b" sinky sinky.main.1 " in m for m in msgs)
            err = next(m for m in msgs if m.endswith(b"an error line"))
            facility = 19 if rcv is tcp else 1  # local3 / user
            assert err.startswith(f"<{facility * 8 + 3}>1 ".encode()), err
        out = app / "data" / "app-out.log"
        lines = wait_for(lambda: (lambda t: t if t.count("to the sinks") == 50 else None)(
            out.read_text() if out.exists() else ""))
        assert re.search(r"^\S+Z sinky\.main\.1 out to the sinks 0$", lines, re.M), lines[:300]
        assert re.search(r"^\S+Z sinky\.main\.1 err an error line$", lines, re.M)
        stats = cli_json(kernel, "ps")[0]["drivers"]["log"]
        assert set(stats["sinks"]) == {"u", "t", "f"}
        assert all(s["up"] and s["dropped_lines"] == 0 for s in stats["sinks"].values()), stats
    finally:
        udp.stop()
        tcp.stop()
