"""Build of a small Python app (tests/apps/flask-uv: a uv.lock with flask and gunicorn) by
`corral up`, against `uv sync --frozen` of the same lock into a plain venv, same cache state.

Goals (docs BENCHMARKS.md): cold <= 1.3 x the reference; warm (lock unchanged) <= the
reference + 1 s.

- Reference: a fresh copy of the app in a temporary directory, then
  `uv sync --frozen --no-install-project --no-dev --python /usr/bin/python3.11` with the uv and
  the environment corral's builds use (UV_CACHE_DIR, UV_LINK_MODE=copy, UV_SYSTEM_CERTS=1,
  UV_DEFAULT_INDEX=https://pypi.org/simple, ...), timed as a process. Cold: an empty cache and
  no .venv; warm: the cache a previous run filled and a fresh copy of the source (no .venv),
  which is what a new release with an unchanged lock sees.
- corral: a real kernel with the net, fs and log drivers (the build runs in the app's
  sandbox as the app's uid). The figure the goal applies to is the build time corral records
  (`corral releases APP --json`: build.seconds of the new release); the wall time of
  `corral up` from the CLI's start until the app answers with the new release is printed
  beside it. Cold: the per-app cache (<home>/cache/APP) removed and a changed source; warm:
  the cache kept, the lock unchanged, a one-line change to a source file (VERSION, which the
  app answers). The app is polled for its version only once `corral up` said the build is
  over, so nothing but corral loads the machine while uv runs.

Reference and corral runs alternate (their order swapped every round); medians are printed,
and each round's values on stderr. BENCH_ROUNDS (default 5) sets the number of rounds.

What a run leaves behind (a cold cache, the reference's project copy) is moved aside, not
deleted, until every round is over: on ext4 without a journal (these machines' root file
system) an inode freed in the last 60 s (360 s while its table block is dirty) is skipped by
the allocator, which re-checks each such inode on every file it creates in that block group
(``recently_deleted`` in fs/ext4/ialloc.c). A run that follows the deletion of a cache of
~350 files by a second pays tens of milliseconds of system time for it (uv's CPU time rose
by ~35 ms per cold run here), a cost neither uv nor corral has and that fell on whichever
side ran after the other's deletion; os.sync() does not lift it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from _kernel import exit_on_sigterm, kernel, scoped_host_toml

from corral.release import uv_binary
from corral.testing import KernelProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
APP_SRC = ROOT / "tests" / "apps" / "flask-uv"
APP = "flask-uv"
PYTHON = "/usr/bin/python3.11"
INDEX = "https://pypi.org/simple"
DRIVERS = ("net", "fs", "log")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SERVE_TIMEOUT_S = 120.0


UV_SAID: dict[str, str] = {}  # what uv said of its own last run: "ref" and "corral"


def set_aside(path: Path, work: Path) -> None:
    """Move ``path`` (if it exists) under ``work``/set-aside, on the same file system, which
    is deleted with ``work`` once every round is over (see the module docstring)."""
    if path.exists():
        where = work / "set-aside"
        where.mkdir(exist_ok=True)
        path.rename(where / str(len(list(where.iterdir()))))


def uv_times(output: str) -> str:
    """uv's own timings in its output ("Prepared 8 packages in 160ms", "Installed ...")."""
    found = re.findall(r"^(Prepared|Installed) \d+ packages? in ([\d.]+m?s)", output, re.M)
    return ", ".join(f"{what.lower()} {took}" for what, took in found) or "-"


class CannotMeasure(Exception):
    """Something the benchmark needs is missing or failed."""


def main() -> int:
    exit_on_sigterm()
    try:
        check_host()
        with tempfile.TemporaryDirectory(prefix="corral-bench-build-", dir="/tmp") as tmp:
            work = Path(tmp)
            work.chmod(0o755)
            figures = measure(work)
    except CannotMeasure as exc:
        print(f"build: could not measure: {exc}", file=sys.stderr)
        return 1
    report(figures)
    return 0


def check_host() -> None:
    """What the benchmark needs: root (the drivers confine the build), the tools, the app."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the net and fs drivers need it)")
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    for path in ("/usr/bin/tini-static", PYTHON, str(APP_SRC / "uv.lock")):
        if not os.path.exists(path):
            missing.append(path)
    if missing:
        raise CannotMeasure("missing " + ", ".join(missing))


# ---- the reference -------------------------------------------------------------------------


def copy_app(dest: Path) -> Path:
    """A fresh copy of the app (no .venv), readable by an app uid."""
    shutil.copytree(APP_SRC, dest, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    for path in (dest, *dest.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def reference_env(cache: Path) -> dict[str, str]:
    """The environment corral gives a uv build (corral.release._build), with this cache."""
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": str(cache / "tmp"),
        "UV_CACHE_DIR": str(cache / "uv"),
        "UV_LINK_MODE": "copy",
        "UV_DEFAULT_INDEX": INDEX,
        "UV_NO_PROGRESS": "1",
        "UV_SYSTEM_CERTS": "1",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PYTHON_PREFERENCE": "only-system",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def reference(work: Path, cache: Path, label: str) -> float:
    """`uv sync --frozen` of a fresh copy of the app with ``cache``: seconds."""
    project = copy_app(work / f"ref-{label}")
    try:
        argv = [uv_binary(), "sync", "--frozen", "--no-install-project", "--no-dev",
                "--python", PYTHON]
        t0 = time.perf_counter()
        r = subprocess.run(argv, cwd=project, env=reference_env(cache), capture_output=True,
                           text=True, timeout=600, check=False)
        took = time.perf_counter() - t0
        UV_SAID["ref"] = uv_times(r.stderr)
        if r.returncode != 0 or not (project / ".venv" / "bin" / "gunicorn").exists():
            raise CannotMeasure(f"reference uv sync failed ({r.returncode}): {r.stderr[-2000:]}")
        return took
    finally:
        set_aside(project, work)


# ---- corral ---------------------------------------------------------------------------------


def corral_cli() -> list[str]:
    """The `corral` a user runs: the entry point beside this interpreter."""
    script = Path(sys.executable).parent / "corral"
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral.cli"]


def answer(port: int) -> str | None:
    """The version the app answers on ``port``, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
            return str(json.loads(resp.read())["version"])
    except (OSError, ValueError, KeyError):
        return None


def releases(k: KernelProcess) -> list[dict[str, object]]:
    r = k.cli("releases", APP, "--json")
    if r.returncode != 0:
        raise CannotMeasure(f"corral releases {APP}: {r.stderr}")
    return list(json.loads(r.stdout)["releases"])


def corral_up(k: KernelProcess, app: Path, port: int, version: str,
              extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """`corral up` of ``app`` whose VERSION is now ``version``: (build seconds as corral
    recorded them, wall seconds from the CLI's start until the app answers ``version``)."""
    (app / "VERSION").write_text(version + "\n")
    before = {int(str(r["release"])) for r in releases(k)} if k.home.joinpath(
        "apps", APP).exists() else set()
    t0 = time.perf_counter()
    cli = subprocess.Popen([*corral_cli(), "up", str(app), *extra], env=k.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The app is asked for its version only once the build is over: asking every 5 ms
    # while uv runs would load the CPU uv shares (the reference runs on a quiet machine).
    built = threading.Event()
    err_lines: list[str] = []

    def follow() -> None:
        assert cli.stderr is not None
        for line in cli.stderr:
            err_lines.append(line)
            if "built v" in line:
                built.set()
        built.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    serving = None
    try:
        while serving is None:
            if built.wait(0.005) and answer(port) == version:
                serving = time.perf_counter() - t0
                break
            if cli.poll() is not None and cli.returncode != 0:
                break
            if time.perf_counter() - t0 > SERVE_TIMEOUT_S:
                break
            time.sleep(0.005)
        out = cli.stdout.read() if cli.stdout is not None else ""
        cli.wait(timeout=SERVE_TIMEOUT_S)
        reader.join(timeout=SERVE_TIMEOUT_S)
        err = "".join(err_lines)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    if cli.returncode != 0 or serving is None:
        raise CannotMeasure(f"corral up ({version}) exited {cli.returncode}, serving "
                            f"{answer(port)!r}:\n{out}\n{err[-3000:]}")
    new = [r for r in releases(k) if int(str(r["release"])) not in before]
    if len(new) != 1 or not isinstance(new[0].get("build"), dict):
        raise CannotMeasure(f"expected one new built release, got {new}")
    build = new[0]["build"]
    assert isinstance(build, dict)
    log = k.home / "apps" / APP / "releases" / "logs" / f"v{new[0]['release']}.build.log"
    UV_SAID["corral"] = uv_times(log.read_text()) if log.exists() else "-"
    UV_SAID["phases"] = ", ".join(f"{k} {v}" for k, v in dict(build.get("phases") or {}).items())
    return float(build["seconds"]), serving


def measure(work: Path) -> dict[str, list[float]]:
    app = copy_app(work / "src" / APP)
    port = free_port()
    ref_warm_cache = work / "ref-cache-warm"
    figures: dict[str, list[float]] = {k: [] for k in (
        "ref_cold", "corral_cold", "up_cold", "ref_warm", "corral_warm", "up_warm")}
    uv_version = subprocess.run([uv_binary(), "--version"], capture_output=True, text=True,
                                check=False).stdout.strip()
    print(f"uv: {uv_binary()} ({uv_version}); Python {PYTHON}; {ROUNDS} rounds",
          file=sys.stderr)
    with kernel(scoped_host_toml(DRIVERS), drivers=DRIVERS) as k:
        app_cache = k.home / "cache" / APP

        def ref_cold(i: int) -> None:
            cache = work / f"ref-cache-cold-{i}"
            figures["ref_cold"].append(reference(work, cache, f"cold-{i}"))
            # the last cold cache is the one the warm reference runs start from
            set_aside(ref_warm_cache, work)
            cache.rename(ref_warm_cache)

        def corral_cold(i: int) -> None:
            build, up = corral_up(k, app, port, f"cold-{i}")
            figures["corral_cold"].append(build)
            figures["up_cold"].append(up)

        def ref_warm(i: int) -> None:
            figures["ref_warm"].append(reference(work, ref_warm_cache, f"warm-{i}"))

        def corral_warm(i: int) -> None:
            build, up = corral_up(k, app, port, f"warm-{i}")
            figures["corral_warm"].append(build)
            figures["up_warm"].append(up)

        # not measured: the first deploy (it makes the app's directories and claims) and one
        # reference run, so neither side pays for a first start of uv or the interpreters
        reference(work, work / "ref-cache-warmup", "warmup")
        set_aside(work / "ref-cache-warmup", work)
        corral_up(k, app, port, "warmup", ("--set", f"ports.http={port}"))

        for phase, ref, ours in (("cold", ref_cold, corral_cold),
                                 ("warm", ref_warm, corral_warm)):
            for i in range(ROUNDS):
                order: list[Callable[[int], None]] = [ref, ours] if i % 2 == 0 else [ours, ref]
                for run in order:
                    if run is corral_cold:
                        # an empty per-app cache (the old one moved aside, not deleted)
                        set_aside(app_cache, work)
                    # neither side pays for writing back what the run before it wrote
                    os.sync()
                    run(i)
                print(f"round {phase} {i + 1}: reference {figures['ref_' + phase][-1]:.3f} s, "
                      f"corral build {figures['corral_' + phase][-1]:.3f} s, `corral up` until "
                      f"serving {figures['up_' + phase][-1]:.3f} s; uv said: reference "
                      f"{UV_SAID['ref']}, corral {UV_SAID['corral']}; corral's phases: "
                      f"{UV_SAID['phases']}", file=sys.stderr)
    return figures


def report(f: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in f.items()}
    print(f"build_cold_reference_uv_sync_median: {med['ref_cold']:.3f} s (reference)")
    print(f"build_cold_corral_median: {med['corral_cold']:.3f} s (goal <= "
          f"{1.3 * med['ref_cold']:.3f}, 1.3 x reference)")
    print(f"build_cold_ratio: {med['corral_cold'] / med['ref_cold']:.2f} x reference "
          "(goal <= 1.3)")
    print(f"build_warm_reference_uv_sync_median: {med['ref_warm']:.3f} s (reference)")
    print(f"build_warm_corral_median: {med['corral_warm']:.3f} s (goal <= "
          f"{med['ref_warm'] + 1:.3f}, reference + 1 s)")
    print(f"build_warm_over_reference: {med['corral_warm'] - med['ref_warm']:+.3f} s "
          "(goal <= +1.0)")
    print(f"up_cold_until_serving_median: {med['up_cold']:.3f} s (informative, no goal)")
    print(f"up_warm_until_serving_median: {med['up_warm']:.3f} s (informative, no goal)")


if __name__ == "__main__":
    raise SystemExit(main())
