"""kill -9 of a process in the middle of ledger transactions leaves every transaction whole."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from corral.ledger import SqliteLedger

KEYS = 12  # keys per transaction
KILLS = 24
OWNER = "crash"

# The writer loops forever over three kinds of transaction, each touching all KEYS keys:
# claim them all (new), claim them all again with a new value (update), release them all;
# on even runs it commits them in batches of three (commit_many). After each commit it prints
# the revision, so the test knows what was acknowledged.
WRITER = """
import sys
from pathlib import Path
from corral.ledger import SqliteLedger, Txn

path, keys, run = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ledger = SqliteLedger(path, history=10**9)
print("ready", flush=True)

def txn(i):
    txn = Txn()
    if i % 3 == 0:
        txn.release_all("crash")
    else:
        for k in range(keys):
            txn.claim("crash", "slot", f"k{k:02d}", {"txn": i, "pad": "x" * (40 + k)})
        txn.claim("crash", "last", "txn", {"txn": i})
    return txn

i = run * 1_000_000
while True:
    if run % 2:
        i += 1
        revision = ledger.commit(txn(i))
    else:  # even runs: group commits of three transactions
        i += 3
        revision = ledger.commit_many([txn(i - 2), txn(i - 1), txn(i)])[-1]
    print(revision, flush=True)
"""


def acknowledged(output: bytes) -> int:
    """The last revision the writer printed in full (a line cut by the kill does not count)."""
    lines = output.decode().split("\n")[:-1]  # the part after the last newline may be cut
    revisions = [int(line) for line in lines if line.isdigit()]
    return max(revisions, default=0)


def assert_whole(path: Path) -> int:
    """Check integrity and that every transaction is all there or not at all; return revision."""
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        raw.close()

    with SqliteLedger(path, history=10**9) as ledger:
        slots = ledger.list(owner=OWNER, kind="slot")
        last = ledger.get("last", "txn")
        if slots:
            assert [r.key for r in slots] == [f"k{k:02d}" for k in range(KEYS)]
            txns = {r.value["txn"] for r in slots}
            assert len(txns) == 1, f"a torn transaction: slots carry txn values {txns}"
            assert last is not None and last.value["txn"] in txns
        else:
            assert last is None

        # The change log holds whole transactions too, and replays to the current state.
        per_revision: dict[int, list[Any]] = defaultdict(list)
        state: dict[tuple[str, str], dict[str, Any]] = {}
        for change in ledger.changes(0):
            per_revision[change.revision].append(change)
            if change.type == "put":
                state[change.kind, change.key] = change.value
            else:
                state.pop((change.kind, change.key), None)
        for revision, changes in per_revision.items():
            assert len(changes) == KEYS + 1, f"revision {revision} has {len(changes)} changes"
            assert len({c.type for c in changes}) == 1
        assert state == {(r.kind, r.key): r.value for r in ledger.list()}
        revision = ledger.revision()
        assert sorted(per_revision) == list(range(1, revision + 1))
        return revision


def test_kill_9_never_leaves_half_a_transaction(tmp_path: Path) -> None:
    """SIGKILL a writer at random moments, 24 times; each time the ledger is whole and intact.

    Also: nothing the writer saw committed is lost (kill -9 is not power loss, so WAL with
    synchronous=NORMAL keeps every acknowledged commit).
    """
    path = tmp_path / "ledger.sqlite3"
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    progress = 0
    for run in range(1, KILLS + 1):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(KEYS), str(run)],
            stdout=subprocess.PIPE,
        )
        assert writer.stdout is not None
        if run % 6 == 0:
            # Every sixth run dies while starting: importing, opening, maybe migrating.
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            assert writer.stdout.readline() == b"ready\n", f"seed {seed}: writer did not start"
            time.sleep(rng.uniform(0.005, 0.2))
        writer.send_signal(signal.SIGKILL)
        output, _ = writer.communicate(timeout=30)
        assert writer.returncode == -signal.SIGKILL, f"seed {seed}: writer exited by itself"

        revision = assert_whole(path)
        assert revision >= acknowledged(output), f"seed {seed}: an acknowledged commit was lost"
        assert revision >= progress
        progress = revision
    assert progress > KILLS, f"seed {seed}: the writer hardly committed anything ({progress})"
