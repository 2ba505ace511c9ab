"""Log pipeline throughput: a real app's stdout through the FIFO to the default file sink,
against ``cat`` of the same lines to a file, alternately in the same run.

The app is ``seq`` printing N numbered lines (~80 bytes each). Reference: ``seq ... | cat >
file``. corral: ``seq`` with stdout on the instance's FIFO (opened O_WRONLY, as the launcher
does), read by the log service running in this process, written to ``<home>/logs/<app>/``.
Every line is then checked (all numbers present): ``log_lost`` counts the missing ones.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral_log.service import LogService

N = int(os.environ.get("LOG_BENCH_LINES", "1000000"))
ROUNDS = int(os.environ.get("LOG_BENCH_ROUNDS", "3"))
FMT = "request %.0f served GET /api/v1/items?page=7 status=200 bytes=5120 duration_ms=3.2"


def seq_cmd() -> list[str]:
    """The app: seq printing N numbered lines."""
    return ["seq", "-f", FMT, "1", str(N)]


def run_cat(tmp: Path) -> float:
    """seconds for ``seq | cat > file``."""
    out = tmp / "cat.out"
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        seq = subprocess.Popen(seq_cmd(), stdout=subprocess.PIPE)
        cat = subprocess.Popen(["cat"], stdin=seq.stdout, stdout=f)
        assert seq.stdout is not None
        seq.stdout.close()
        cat.wait()
        seq.wait()
    dt = time.perf_counter() - t0
    out.unlink()
    return dt


async def run_corral(tmp: Path, k: int) -> tuple[float, int]:
    """(seconds until the last line is in the default file, lines lost)."""
    home = tmp / f"home{k}"
    svc = LogService(home, config={"metrics": False, "keepers": False, "default_rotate": "4GiB"})
    await svc.start()
    svc.attach("bench", {})
    out, _err = svc.prepare("bench", "bench.web.1")
    fd = os.open(out, os.O_WRONLY)
    t0 = time.perf_counter()
    seq = subprocess.Popen(seq_cmd(), stdout=fd)
    os.close(fd)
    appl = svc.apps["bench"]
    while appl.records < N:
        await asyncio.sleep(0.002)
        if seq.poll() is not None and appl.records < N and time.perf_counter() - t0 > 60:
            break
    dt = time.perf_counter() - t0
    seq.wait()
    svc.stopped("bench", "bench.web.1")
    await svc.close()
    seen = bytearray(N + 1)
    with open(home / "logs" / "bench" / "app.log", "rb") as f:
        for line in f:
            num = line.split(b" ", 5)[4]
            seen[int(num)] = 1
    lost = N - sum(seen)
    shutil.rmtree(home)
    return dt, lost


async def main() -> int:
    if shutil.which("seq") is None or shutil.which("cat") is None:
        print("log_pipeline: needs coreutils seq and cat", file=sys.stderr)
        return 1
    cat_t, corral_t, lost = [], [], 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for k in range(ROUNDS):
            cat_t.append(run_cat(tmp))
            t, lost_k = await run_corral(tmp, k)
            corral_t.append(t)
            lost += lost_k
    c, r = statistics.median(cat_t), statistics.median(corral_t)
    print(f"lines: {N} x {ROUNDS} rounds; cat {c:.3f}s, corral {r:.3f}s (medians)")
    print(f"log_vs_cat: {c / r:.2f} (goal >= 0.5)")
    print(f"log_lines_per_s: {N / r:.0f} (goal >= 250000)")
    print(f"log_lost: {lost} (goal 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
