"""The kernel alone, idle: RSS and CPU over a measurement window (goals: <= 40 MiB, <= 0.2 %).

Also reports the kernel with all five drivers, idle (goal: <= 200 MiB in all), when they are
installed and start.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(__file__))

from _kernel import kernel

WINDOW = float(os.environ.get("BENCH_SECONDS", "20"))


def measure(pids: list[int]) -> tuple[float, float, float]:
    procs = [psutil.Process(p) for p in pids]
    before = [p.cpu_times() for p in procs]
    t0 = time.monotonic()
    time.sleep(WINDOW)
    elapsed = time.monotonic() - t0
    cpu = sum((a.user + a.system) - (b.user + b.system)
              for a, b in zip((p.cpu_times() for p in procs), before, strict=True))
    rss = sum(p.memory_info().rss for p in procs)
    # PSS shares each shared page among the processes mapping it: the honest "in all" figure
    pss = sum(p.memory_full_info().pss for p in procs)
    return rss / 2**20, pss / 2**20, 100 * cpu / elapsed


def main() -> int:
    with kernel() as k:
        assert k.proc is not None
        time.sleep(2)  # let start-up settle
        rss, pss, cpu = measure([k.proc.pid])
        print(f"kernel_idle_rss: {rss:.1f} MiB (goal <= 40)")
        print(f"kernel_idle_pss: {pss:.1f} MiB")
        print(f"kernel_idle_cpu: {cpu:.3f} % (goal <= 0.2)")
    with kernel("") as k:  # every installed driver
        assert k.proc is not None
        time.sleep(3)
        drivers = [d for d in k.call("drivers.list")["drivers"] if d["pid"]]
        pids = [k.proc.pid, *(d["pid"] for d in drivers)]
        rss, pss, cpu = measure(pids)
        print(f"kernel_plus_{len(drivers)}_drivers_idle_rss_sum: {rss:.1f} MiB")
        print(f"kernel_plus_{len(drivers)}_drivers_idle_pss: {pss:.1f} MiB (goal <= 200)")
        print(f"kernel_plus_{len(drivers)}_drivers_idle_cpu: {cpu:.3f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
