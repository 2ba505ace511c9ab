"""Ledger claim+release round trips per second on etcd (goal >= 1,000/s), beside SQLite.

32 threads share one ledger object, as a kernel's request handlers would, each claiming one
key then releasing it, over and over, so 32 round trips are in flight. Each backend runs for
``BENCH_SECONDS`` (default 10) in the same run, so the ratio compares like with like:

- etcd: a 3-member cluster on this machine (loopback, data in /dev/shm, started with the
  tests' harness ``tests/etcdcluster.py``), through ``etcd://`` URL of all three members;
  a commit is a read transaction then a compare-and-swap transaction, each a raft round;
- SQLite: ``SqliteLedger`` in a temporary directory (WAL, synchronous=NORMAL, the default),
  every call serialised by its lock.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _kernel import exit_on_sigterm

from corral.ledger import Claim, Ledger, SqliteLedger, open_ledger
from etcdcluster import ETCD, etcd_cluster

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
THREADS = 32
GOAL = 1000


def claim_release(ledger: Ledger, threads: int, seconds: float) -> tuple[int, float]:
    """Claim+release pairs done by ``threads`` threads in ``seconds``: (pairs, elapsed)."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = 0.0

    def worker(w: int) -> None:
        start.wait()
        i = 0
        try:
            while time.perf_counter() < deadline:
                key = f"bench-{w}-{i}"
                ledger.claim("bench", [Claim("lease", key)])
                ledger.release("bench", [("lease", key)])
                counts[w] += 1
                i += 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} workers failed; first: {errors[0]!r}")
    return sum(counts), elapsed


def main() -> int:
    exit_on_sigterm()
    if not os.access(ETCD, os.X_OK):
        print(f"skipped: needs etcd at {ETCD}")
        return 0
    home = Path(tempfile.mkdtemp(prefix="corral-bench-ledger-"))
    try:
        with etcd_cluster(3) as cluster:
            etcd = open_ledger(cluster.url, home)
            claim_release(etcd, THREADS, 1.0)  # warm up: connections, leader settled
            n, s = claim_release(etcd, THREADS, SECONDS)
            etcd.close()
        etcd_rate = n / s
        print(f"etcd_claim_release_per_s: {etcd_rate:.0f}/s ({THREADS} in flight, "
              f"3 members, {n} pairs in {s:.1f} s)")

        sqlite = SqliteLedger(home / "ledger.sqlite3")
        claim_release(sqlite, THREADS, 1.0)
        n, s = claim_release(sqlite, THREADS, SECONDS)
        sqlite.close()
        sqlite_rate = n / s
        print(f"sqlite_claim_release_per_s: {sqlite_rate:.0f}/s ({THREADS} in flight, "
              f"{n} pairs in {s:.1f} s)")
        print(f"etcd_vs_sqlite_ratio: {etcd_rate / sqlite_rate:.2f}")
        print(f"goal: etcd >= {GOAL}/s ({'met' if etcd_rate >= GOAL else 'NOT met'})")
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
