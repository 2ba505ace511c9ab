"""Real etcd clusters on loopback for tests and benchmarks (Debian's ``etcd-server``, 3.4).

``etcd_cluster(n)`` starts ``n`` members (default 3) of a new cluster, each with its own client
and peer port on 127.0.0.1 and its data directory under a private temporary directory (in
/dev/shm when it exists and has room: a member fsyncs every commit, and tmpfs makes that
free), waits until every member reports healthy, yields the ``EtcdCluster``, and always stops
every member and deletes the data afterwards::

    with etcd_cluster() as cluster:
        ledger = open_ledger(cluster.url, home)  # etcd://127.0.0.1:P1,127.0.0.1:P2,...
        cluster.stop(0)                          # SIGTERM, then wait
        cluster.start(0)                         # back with its data, state "existing"
        cluster.wait_healthy()

Members run with a short heartbeat (50 ms) and election timeout (500 ms), so a new leader is
elected within about a second after one is stopped, and with etcd's periodic auto-compaction
on (retention 1 h: nothing written by a test is compacted unless it compacts itself). Each
member logs to ``<base>/<name>.log`` (``log(i)`` returns the text). The cluster token is
unique to each cluster, so members of two clusters can never join each other.

Importable from tests as ``from etcdcluster import EtcdCluster, etcd_cluster`` (the tests'
pythonpath includes ``tests/``) and from a benchmark after ``sys.path.insert(0, "<repo>/tests")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
HOST = "127.0.0.1"
SHM = Path("/dev/shm")
SHM_MIN_FREE = 1 << 30
"""/dev/shm is used only with this much free: a member preallocates 64 MiB WAL segments."""
HEARTBEAT_MS = 50
ELECTION_MS = 500


def require_etcd() -> None:
    """Skip the running test when /usr/bin/etcd is missing; under CI=true, fail it instead."""
    import pytest

    if os.access(ETCD, os.X_OK):
        return
    why = f"needs etcd at {ETCD} (apt-get install etcd-server etcd-client)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"cannot run under CI=true: {why}", pytrace=False)
    pytest.skip(why)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (all held open while picking, so no
    two are equal; another process may still take one before etcd binds it)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _temp_base() -> Path:
    parent: str | None = None
    with contextlib.suppress(OSError):
        st = os.statvfs(SHM)
        if os.access(SHM, os.W_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE:
            parent = str(SHM)
    return Path(tempfile.mkdtemp(prefix="corral-etcd-", dir=parent))


def member_argv(binary: str, name: str, data_dir: Path, client_url: str, peer_url: str,
                initial_cluster: str, state: str, token: str) -> list[str]:
    """The command line of one test member: the tests' heartbeat and election timeout,
    hourly compaction, its log as JSON on stderr."""
    return [
        binary,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-state", state,
        "--initial-cluster-token", token,
        "--heartbeat-interval", str(HEARTBEAT_MS),
        "--election-timeout", str(ELECTION_MS),
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        "--logger", "zap",
        "--log-outputs", "stderr",
    ]


class EtcdCluster:
    """``n`` etcd members on loopback; ``launch()`` starts them as a new cluster.

    Members are numbered 0..n-1 (named ``m0``...). ``stop``/``kill`` take one down, ``start``
    brings it back on the same ports and data; ``close()`` ends everything and deletes the
    data. Not thread-safe: drive it from one thread.
    """

    def __init__(self, n: int = 3, *, base: Path | None = None, binary: str = ETCD) -> None:
        if n < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got {n}")
        self.n = n
        self.binary = binary
        self.base = base if base is not None else _temp_base()
        self._own_base = base is None
        self.token = f"corral-test-{uuid.uuid4().hex[:12]}"
        ports = _free_ports(2 * n)
        self.client_ports = ports[:n]
        self.peer_ports = ports[n:]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self._logs: list[Path] = [self.base / f"m{i}.log" for i in range(n)]

    # -- addresses ------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Every member's client address, ``(host, port)``, in member order."""
        return [(HOST, port) for port in self.client_ports]

    @property
    def url(self) -> str:
        """The ledger URL naming every member: ``etcd://127.0.0.1:P0,127.0.0.1:P1,...``."""
        return self.url_from(0)

    def url_from(self, first: int) -> str:
        """The ledger URL listing member ``first`` first, then the others in a ring."""
        order = [(first + k) % self.n for k in range(self.n)]
        return "etcd://" + ",".join(f"{HOST}:{self.client_ports[i]}" for i in order)

    def client_url(self, i: int) -> str:
        """Member ``i``'s client URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.client_ports[i]}"

    def _peer_url(self, i: int) -> str:
        return f"http://{HOST}:{self.peer_ports[i]}"

    # -- processes ------------------------------------------------------------------------------

    def _argv(self, i: int, state: str) -> list[str]:
        initial = ",".join(f"m{k}={self._peer_url(k)}" for k in range(self.n))
        return member_argv(self.binary, f"m{i}", self.base / f"m{i}.etcd", self.client_url(i),
                           self._peer_url(i), initial, state, self.token)

    def _spawn(self, i: int, state: str) -> None:
        if self.running(i):
            raise RuntimeError(f"etcd member m{i} is already running")
        with open(self._logs[i], "ab") as log:
            self.procs[i] = subprocess.Popen(
                self._argv(i, state), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def launch(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member as a new cluster and wait until all are healthy."""
        self.base.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            self._spawn(i, "new")
        self.wait_healthy(timeout)
        return self

    def start(self, i: int) -> None:
        """Restart stopped member ``i`` with its data (``--initial-cluster-state existing``)."""
        self._spawn(i, "existing")

    def stop(self, i: int, timeout: float = 10.0) -> None:
        """Stop member ``i`` cleanly: SIGTERM, wait (SIGKILL after ``timeout`` seconds)."""
        self._end(i, signal.SIGTERM, timeout)

    def kill(self, i: int) -> None:
        """Kill member ``i`` at once (SIGKILL), as a crash would."""
        self._end(i, signal.SIGKILL, 10.0)

    def _end(self, i: int, sig: signal.Signals, timeout: float) -> None:
        end_member(self.procs[i], sig, timeout)
        self.procs[i] = None

    def running(self, i: int) -> bool:
        """Whether member ``i``'s process is alive (not whether it is healthy)."""
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    @property
    def running_members(self) -> list[int]:
        """The members whose process is alive."""
        return [i for i in range(self.n) if self.running(i)]

    def log(self, i: int, tail: int = 4000) -> str:
        """The last ``tail`` characters of member ``i``'s log."""
        try:
            return self._logs[i].read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # -- health ---------------------------------------------------------------------------------

    def healthy(self, i: int) -> bool:
        """Whether member ``i`` answers ``GET /health`` with ``{"health": "true"}``."""
        try:
            with urllib.request.urlopen(self.client_url(i) + "/health", timeout=2) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return bool(body.get("health") == "true")

    def wait_healthy(self, timeout: float = 30.0, members: Sequence[int] | None = None) -> None:
        """Wait until every running member (or those listed) is healthy; raise with the logs
        of the others after ``timeout`` seconds, or at once when a member process died."""
        deadline = time.monotonic() + timeout
        while True:
            wanted = list(self.running_members if members is None else members)
            for i in wanted:
                proc = self.procs[i]
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member m{i} exited with {proc.returncode}:\n{self.log(i)}")
            sick = [i for i in wanted if not self.healthy(i)]
            if not sick:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- m{i} ---\n{self.log(i, 1500)}" for i in sick)
                raise RuntimeError(f"etcd members {sick} not healthy after {timeout} s:\n{logs}")
            time.sleep(0.05)

    # -- maintenance ----------------------------------------------------------------------------

    def etcdctl(self, *args: str, member: int | None = None, timeout: float = 30.0) -> str:
        """Run ``etcdctl`` (API v3) against the running members (or one); return its stdout."""
        targets = self.running_members if member is None else [member]
        env = {**os.environ, "ETCDCTL_API": "3"}
        out = subprocess.run(
            [ETCDCTL, "--endpoints", ",".join(self.client_url(i) for i in targets), *args],
            env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def close(self) -> None:
        """Kill every member and delete the cluster's directory (if this object made it)."""
        for i in range(self.n):
            with contextlib.suppress(OSError):
                self.kill(i)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def etcd_cluster(n: int = 3, *, timeout: float = 30.0, attempts: int = 3
                 ) -> Iterator[EtcdCluster]:
    """A new, healthy ``n``-member cluster for the block; always stopped and deleted after.

    A start that fails (a port taken between picking and binding) is retried on new ports,
    up to ``attempts`` times.
    """
    for attempt in range(attempts):
        cluster = EtcdCluster(n)
        try:
            cluster.launch(timeout)
        except RuntimeError:
            cluster.close()
            if attempt == attempts - 1:
                raise
            continue
        try:
            yield cluster
        finally:
            cluster.close()
        return


def end_member(proc: subprocess.Popen[bytes] | None, sig: signal.Signals,
               timeout: float) -> None:
    """Send ``sig`` to an etcd member's process and wait for it (SIGKILL after ``timeout``)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
