"""`corral up` of examples/hello until it answers over HTTP (goal <= 1 s), with the CLI.

Timed from the start of the `corral up` process to the first successful HTTP answer, so the
figure includes the CLI's interpreter start, validation, the ledger transaction, the launch
and readiness. Repeated; prints the median and the worst.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from _kernel import NO_DRIVERS, kernel

HELLO = Path(__file__).resolve().parents[1] / "examples" / "hello"
RUNS = int(os.environ.get("BENCH_RUNS", "7"))


def main() -> int:
    for label, host in (("kernel_only", NO_DRIVERS), ("all_drivers", "")):
        times = measure(host)
        if not times:
            return 1
        print(f"up_hello_{label}_until_answer_median: {statistics.median(times):.3f} s "
              "(goal <= 1.0)")
        print(f"up_hello_{label}_until_answer_max: {max(times):.3f} s")
    return 0


def measure(host: str) -> list[float]:
    app = Path(tempfile.mkdtemp(prefix="corral-bench-hello-", dir="/tmp"))
    app.chmod(0o755)
    shutil.copytree(HELLO, app / "hello")
    overrides = ["--set", "ports.http=18480"]
    if host == NO_DRIVERS:
        # no driver owns [lb] or [limits] on such a host: the kernel alone deploys the rest
        drop_sections(app / "hello" / "corral.toml", {"lb", "limits"})
    else:
        overrides += ["--set", "lb.frontend=18481"]
    times: list[float] = []
    with kernel(host) as k:
        if host == "":
            time.sleep(2)  # let the drivers connect
        for _ in range(RUNS):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "corral.cli", "up", str(app / "hello"),
                                *overrides, "-q"],
                               env=k.env, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return []
            while True:
                try:
                    with urllib.request.urlopen("http://127.0.0.1:18480/", timeout=1) as resp:
                        resp.read()
                    break
                except OSError:
                    time.sleep(0.002)
            times.append(time.perf_counter() - t0)
            k.cli("down", "hello")
    shutil.rmtree(app, ignore_errors=True)
    return times


def drop_sections(toml: Path, names: set[str]) -> None:
    """Remove the tables ``names`` (and their sub-tables) from a corral.toml."""
    keep, skipping = [], False
    for line in toml.read_text().splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip("[] \n").split(".")[0] in names
        if not skipping:
            keep.append(line)
    toml.write_text("".join(keep))


if __name__ == "__main__":
    raise SystemExit(main())
