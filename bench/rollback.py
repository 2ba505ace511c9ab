"""Rollback to serving the previous release (goal <= 1 s, 0 failed requests under load), and
`corral up` of an unchanged hello-sized app (a no-op; goal <= 1 s).

A real kernel with the net, fs, lb and log drivers. The app is hello-sized: a standard-library
HTTP/1.1 keep-alive server (two instances) answering `GET /` with "<instance> <VERSION file>"
and `/healthz` with 200, behind the lb's HTTP proxy (health checked every 0.5 s, rise 1).
v1 and v2 differ only in their VERSION file. Then, while keep-alive clients load the lb
frontend, rounds alternate `corral rollback APP` (back to v1: the release deployed before the
live one) and `corral rollback APP v2` (forward again); each is timed from the CLI's start
until the frontend answers with the target release (polled with new connections every 5 ms).
The time until the CLI returns (the rollout done, the old instances drained) is printed
beside it. Failed requests are counted over the load and the polls. The rounds run twice:
under 1,000 requests/s from 6 keep-alive clients (a process of its own), then under as many as
those clients can make (on a 2-core machine that takes about a core, so the rollback competes
for CPU). Last, `corral up` of the unchanged app directory is timed from the CLI's start to its
exit, a few times.

BENCH_ROUNDS (default 6, made even so the app ends on v2) and BENCH_NOOP_RUNS (default 5).
"""

from __future__ import annotations

import http.client
import multiprocessing
import multiprocessing.queues
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from _kernel import exit_on_sigterm, kernel, scoped_host_toml

from corral.testing import KernelProcess, free_port

APP = "rolly"
LB_NAME = "rolly.bench.test"
DRIVERS = ("net", "fs", "lb", "log")
ROUNDS = max(2, int(os.environ.get("BENCH_ROUNDS", "6")) // 2 * 2)
NOOP_RUNS = int(os.environ.get("BENCH_NOOP_RUNS", "5"))
SERVE_TIMEOUT_S = 60.0
CLIENTS = 6
# (name, requests/s in all; 0: as fast as the clients go, which takes about a core here)
LOADS = (("load1000", 1000.0), ("saturating", 0.0))

WEB = textwrap.dedent('''
    import http.server, os, socket, socketserver
    iid = os.environ.get("CORRAL_INSTANCE", "?")
    version = open("VERSION").read().strip()
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall
        def do_GET(self):
            body = (f"{iid} {version}\\n" if self.path != "/healthz" else "ok\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 256
        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()
    S(("::", int(os.environ["PORT"])), H).serve_forever()
''')


class CannotMeasure(Exception):
    """Something the benchmark needs is missing or failed."""


class Load:
    """Keep-alive HTTP clients on the frontend, in a process of their own (so they never hold
    up the poll that times a rollback), until stopped; counts answers and failures (as
    tests/e2e/test_lb_deployed.py's Load). ``rate``: requests per second in all (0: as many
    as the clients can make)."""

    def __init__(self, port: int, rate: float, clients: int = CLIENTS) -> None:
        ctx = multiprocessing.get_context("fork")
        self._ok = ctx.Value("q", 0)
        self._failed = ctx.Value("q", 0)
        self._stop = ctx.Event()
        self._samples: multiprocessing.queues.Queue[str] = ctx.Queue()
        self._proc = ctx.Process(target=_load, daemon=True, args=(
            port, rate, clients, self._ok, self._failed, self._stop, self._samples))
        self.failures: list[str] = []  # the first few, once stopped

    @property
    def ok(self) -> int:
        return int(self._ok.value)

    @property
    def failed(self) -> int:
        return int(self._failed.value)

    def start(self) -> Load:
        self._proc.start()
        return self

    def alive(self) -> bool:
        return self._proc.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(20)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        while True:
            try:
                self.failures.append(self._samples.get(timeout=0.2))
            except queue.Empty:
                break


def _load(port: int, rate: float, clients: int, ok: Any, failed: Any, stop: Any,
          samples: Any) -> None:
    """The load process: ``clients`` threads, each on one keep-alive connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    parent = os.getppid()
    sent_samples = [0]

    def fail(what: str) -> None:
        with failed.get_lock():
            failed.value += 1
            if sent_samples[0] < 10:
                sent_samples[0] += 1
                samples.put(f"{time.time():.3f} {what}")

    def client() -> None:
        conn: http.client.HTTPConnection | None = None
        gap = clients / rate if rate > 0 else 0.0
        due = time.monotonic()
        while not stop.is_set() and os.getppid() == parent:  # ends with the benchmark
            if gap:
                due += gap
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/", headers={"Host": LB_NAME})
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status == 200:
                    with ok.get_lock():
                        ok.value += 1
                else:
                    fail(f"http {resp.status}: {body!r}")
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                fail(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples.close()
    samples.join_thread()


def main() -> int:
    exit_on_sigterm()
    try:
        check_host()
        with tempfile.TemporaryDirectory(prefix="corral-bench-rollback-", dir="/tmp") as tmp:
            work = Path(tmp)
            work.chmod(0o755)
            return measure(work)
    except CannotMeasure as exc:
        print(f"rollback: could not measure: {exc}", file=sys.stderr)
        return 1


def check_host() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the net, fs and lb drivers need it)")
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    for path in ("/usr/bin/tini-static", "/usr/bin/python3"):
        if not os.path.exists(path):
            missing.append(path)
    if missing:
        raise CannotMeasure("missing " + ", ".join(missing))


def corral_cli() -> list[str]:
    """The `corral` a user runs: the entry point beside this interpreter."""
    script = Path(sys.executable).parent / "corral"
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral.cli"]


def write_app(d: Path, front: int) -> Path:
    d.mkdir(parents=True)
    (d / "web.py").write_text(WEB)
    (d / "VERSION").write_text("1\n")
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{APP}"
        [ports]
        http = {free_port()}
        [processes]
        web = {{ command = "python3 web.py", port = "http", instances = 2 }}
        [lb]
        name = "{LB_NAME}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''').lstrip())
    for path in (d, *d.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return d


def version_at(front: int) -> str:
    """The release version the frontend answers now (a new connection); raises on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", front, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": LB_NAME, "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status != 200:
            raise http.client.HTTPException(f"http {resp.status}: {body!r}")
        return body.split()[1]
    finally:
        conn.close()


def cli_ok(k: KernelProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*corral_cli(), *argv], env=k.env, capture_output=True, text=True,
                       timeout=300, check=False)
    if r.returncode != 0:
        raise CannotMeasure(f"corral {' '.join(argv)} exited {r.returncode}:\n{r.stdout}\n"
                            f"{r.stderr[-3000:]}")
    return r


def until_serving(argv: list[str], env: dict[str, str], front: int, target: str,
                  polls: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """Run ``argv`` (a rollback, an up, a push): (seconds until the frontend answers
    ``target``, polled with new connections every 5 ms, seconds until the command exits)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    serving = None
    out = err = ""
    try:
        while time.perf_counter() - t0 < SERVE_TIMEOUT_S:
            try:
                seen = version_at(front)
                polls.append("")
                if seen == target:
                    serving = time.perf_counter() - t0
                    break
            except (OSError, http.client.HTTPException, IndexError) as exc:
                polls.append(f"{time.time():.3f} poll {type(exc).__name__}: {exc}")
            if proc.poll() is not None and proc.returncode != 0:
                break
            time.sleep(0.005)
        out, err = proc.communicate(timeout=SERVE_TIMEOUT_S)
        done = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or serving is None:
        raise CannotMeasure(f"{' '.join(argv)} exited {proc.returncode}; the frontend never "
                            f"answered {target}:\n{out}\n{err[-3000:]}")
    return serving, done


def rollback_round(k: KernelProcess, front: int, argv: list[str], target: str,
                   polls: list[str]) -> tuple[float, float]:
    """`corral ARGV` (a rollback): (seconds until the frontend answers ``target``, seconds
    until the CLI exits)."""
    return until_serving([*corral_cli(), *argv], k.env, front, target, polls)


def measure(work: Path) -> int:
    front = free_port()
    app = write_app(work / APP, front)
    noop: list[float] = []
    phases = []
    with kernel(scoped_host_toml(DRIVERS), drivers=DRIVERS) as k:
        cli_ok(k, "up", str(app))
        (app / "VERSION").write_text("2\n")
        cli_ok(k, "up", str(app))
        if version_at(front) != "2":
            raise CannotMeasure("v2 is not what the frontend answers after `corral up`")
        for name, rate in LOADS:
            phases.append((name, *rollbacks(k, front, rate)))
        # the app runs v2 again: its directory is unchanged, so `corral up` is a no-op
        for _ in range(NOOP_RUNS):
            t0 = time.perf_counter()
            r = cli_ok(k, "up", str(app))
            noop.append(time.perf_counter() - t0)
            if "unchanged" not in r.stdout:
                raise CannotMeasure(f"`corral up` of the unchanged app was not a no-op:\n"
                                    f"{r.stdout}\n{r.stderr[-2000:]}")
    for name, serving, done, requests, failures, rps in phases:
        for line in failures[:10]:
            print(f"failed request ({name}): {line}", file=sys.stderr)
        print(f"rollback_{name}_until_serving_median: {statistics.median(serving):.3f} s "
              "(goal <= 1.0)")
        print(f"rollback_{name}_until_serving_max: {max(serving):.3f} s (goal <= 1.0)")
        print(f"rollback_{name}_cli_done_median: {statistics.median(done):.3f} s "
              "(informative, no goal)")
        print(f"rollback_{name}_failed_requests: {len(failures)} of {requests} "
              f"(keep-alive load at {rps:.0f} req/s, and polls; goal 0)")
    print(f"up_unchanged_noop_median: {statistics.median(noop):.3f} s (goal <= 1.0)")
    print(f"up_unchanged_noop_max: {max(noop):.3f} s (informative, no goal)")
    return 0


def rollbacks(k: KernelProcess, front: int, rate: float
              ) -> tuple[list[float], list[float], int, list[str], float]:
    """ROUNDS rollbacks (back to v1, forward to v2, ...) under a load of ``rate``:
    (seconds until serving, seconds until the CLI is done, requests made, failed ones,
    the load's answers per second)."""
    serving: list[float] = []
    done: list[float] = []
    polls: list[str] = []  # one entry per poll: "" answered, else what failed
    load = Load(front, rate).start()
    load_t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 20
        while load.ok < 100:
            if time.monotonic() > deadline or not load.alive():
                raise CannotMeasure(f"the load gets no answers ({load.failed} failed)")
            time.sleep(0.05)
        for i in range(ROUNDS):
            if i % 2 == 0:
                argv, target = ["rollback", APP], "1"
            else:
                argv, target = ["rollback", APP, "v2"], "2"
            s, d = rollback_round(k, front, argv, target, polls)
            serving.append(s)
            done.append(d)
            print(f"round {i + 1}: `corral {' '.join(argv)}` serving v{target} after "
                  f"{s:.3f} s, CLI done after {d:.3f} s; load {load.ok} answers, "
                  f"{load.failed} failed", file=sys.stderr)
            time.sleep(1.0)  # steady state between rounds, under load
    finally:
        took = time.monotonic() - load_t0
        load.stop()
    rps = load.ok / took
    print(f"load: {rps:.0f} answers/s over {took:.1f} s ({CLIENTS} keep-alive clients, "
          f"{'unthrottled' if not rate else f'{rate:.0f}/s asked'})", file=sys.stderr)
    failures = load.failures + [p for p in polls if p]
    failed = load.failed + sum(1 for p in polls if p)
    failures += ["..."] * (failed - len(failures))
    return serving, done, load.ok + load.failed + len(polls), failures, rps


if __name__ == "__main__":
    raise SystemExit(main())
