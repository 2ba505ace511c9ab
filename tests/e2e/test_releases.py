"""Releases, builds, config vars, rollback and one-off commands, for real (WORKFLOW.md).

Heroku getting-started-style apps (tests/apps: Procfile, requirements.txt / uv.lock /
package-lock.json, no corral.toml) are built from the package indexes by `corral up` in the
sandbox and served; a build reaches the index and nothing else; rollback under load fails no
request and brings back code and config; the release phase runs once per release and a
failing one keeps the previous release serving; a one-off command runs in the release with
its config and returns its exit status; bad input changes nothing and exits 2.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from corral.testing import KernelProcess, free_port, running_kernel, wait_for
from e2e.test_lb_deployed import WEB, new_net_host, require_net
from e2e.test_rollout_gate import during_load

pytestmark = pytest.mark.root

APPS = Path(__file__).resolve().parents[1] / "apps"
DRIVERS = ("net", "fs", "lb", "log")

# WEB answering "<instance> <VERSION file> <$GREETING>" (code from the release, config from env)
VERSIONED_WEB = WEB.replace(
    'version = os.environ.get("VERSION", "1")',
    'version = open("VERSION").read().strip() + " " + os.environ.get("GREETING", "-")')
assert VERSIONED_WEB != WEB


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelProcess]:
    """One kernel with the net, fs, lb and log drivers for the module's tests."""
    require_net()
    require(shutil.which("npm") is not None, "npm (Debian's nodejs npm), for the Node build")
    base = Path(f"/tmp/corral-e2e-releases-{os.getpid()}")
    base.mkdir(mode=0o755, exist_ok=True)
    try:
        with running_kernel(base / "k", new_net_host().host_toml(DRIVERS),
                            drivers=DRIVERS) as k:
            yield k
    finally:
        shutil.rmtree(base, ignore_errors=True)


def copy_app(public_dir: Path, which: str) -> Path:
    d = public_dir / which
    shutil.copytree(APPS / which, d)
    for path in (d, *d.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return d


def get(port: int, path: str = "/", host: str | None = None) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Host": host} if host else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def cli_ok(k: KernelProcess, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = k.cli(*argv, timeout=timeout)
    assert r.returncode == 0, f"corral {' '.join(argv)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def releases(k: KernelProcess, app: str) -> list[dict[str, Any]]:
    return list(json.loads(cli_ok(k, "releases", app, "--json").stdout)["releases"])


def down(k: KernelProcess, app: str) -> None:
    k.cli("down", app)


# ---- builds from the package indexes -----------------------------------------------------


def test_python_requirements_app_is_built_and_served(kernel: KernelProcess,
                                                      public_dir: Path) -> None:
    """flask-pip (Procfile, requirements.txt with flask + gunicorn, .python-version 3.11,
    a release: line) and no corral.toml: `corral up` builds it from the index in the sandbox,
    streams the build, runs the release phase once (not per instance) and serves it. The
    source edited after the deploy changes nothing that runs."""
    d = copy_app(public_dir, "flask-pip")
    port = free_port()
    cli_ok(kernel, "config", "set", "flask-pip", "GREETING=hello")
    try:
        r = cli_ok(kernel, "up", str(d), "--set", f"ports.http={port}",
                   "--set", "processes.web.instances=2")
        assert "uv pip install" in r.stderr or "install requirements.txt" in r.stderr, r.stderr
        assert "Python 3.11" in r.stderr, r.stderr
        body = json.loads(get(port))
        assert body == {"app": "flask-pip", "version": "1", "greeting": "hello",
                        "secret_set": False}, body
        (rel,) = releases(kernel, "flask-pip")
        assert rel["live"] and rel["build"]["kinds"] == ["pip"], rel
        assert rel["release_phase"]["exit"] == 0, rel
        log = kernel.home / "apps" / "flask-pip" / "releases" / "logs" / "v1.release.log"
        assert log.read_text().splitlines() == ["release 1 v1"], log.read_text()
        # the release directory is root's and read-only to the app; the venv is in it
        vdir = kernel.home / "apps" / "flask-pip" / "releases" / "v1"
        assert (vdir / ".venv" / "bin" / "gunicorn").exists()
        assert vdir.stat().st_uid == 0 and not vdir.stat().st_mode & 0o022
        # sealed whole (alongside the sandbox's teardown, once the build's processes ended)
        for p in [vdir, *vdir.rglob("*")]:
            st = os.lstat(p)
            assert st.st_uid == 0, p
            assert stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o7022, p
        phases = rel["build"]["phases"]
        assert phases["seal_s"] > 0 and phases["teardown_s"] >= 0, phases
        # editing the source after the deploy changes nothing that runs
        (d / "VERSION").write_text("edited\n")
        assert json.loads(get(port))["version"] == "1"
    finally:
        down(kernel, "flask-pip")


def test_uv_lock_app_is_built_and_a_warm_rebuild_is_quick(kernel: KernelProcess,
                                                          public_dir: Path) -> None:
    """flask-uv (pyproject.toml + uv.lock): `uv sync --frozen` into the release's .venv;
    an unchanged `corral up` is a no-op that says so; a code change with the lock unchanged
    is a new release built from the warm cache."""
    d = copy_app(public_dir, "flask-uv")
    port = free_port()
    try:
        r = cli_ok(kernel, "up", str(d), "--set", f"ports.http={port}")
        assert "uv sync --frozen" in r.stderr, r.stderr
        assert json.loads(get(port))["version"] == "1"
        r = cli_ok(kernel, "up", str(d))
        assert "unchanged" in r.stdout, r.stdout
        assert len(releases(kernel, "flask-uv")) == 1
        (d / "VERSION").write_text("2\n")
        t0 = time.monotonic()
        r = cli_ok(kernel, "up", str(d))
        took = time.monotonic() - t0
        assert json.loads(get(port))["version"] == "2"
        rels = releases(kernel, "flask-uv")
        assert [x["release"] for x in rels] == [1, 2] and rels[1]["changes"] == ["code"], rels
        print(f"warm rebuild and rollout: {took:.2f}s, build {rels[1]['build']['seconds']}s")
    finally:
        down(kernel, "flask-uv")


def test_node_app_is_built_with_npm_ci(kernel: KernelProcess, public_dir: Path) -> None:
    """node-npm (package.json + package-lock.json): `npm ci` in the release, node_modules/.bin
    on PATH, the dependency usable by the app."""
    d = copy_app(public_dir, "node-npm")
    port = free_port()
    try:
        r = cli_ok(kernel, "up", str(d), "--set", f"ports.http={port}")
        assert "npm ci" in r.stderr, r.stderr
        body = json.loads(get(port))
        assert body["version"] == "1" and body["ms"] == 2000, body
        assert (kernel.home / "apps" / "node-npm" / "releases" / "v1" / "node_modules"
                / "ms").is_dir()
    finally:
        down(kernel, "node-npm")


def test_a_build_reaches_the_index_and_nothing_else(kernel: KernelProcess,
                                                    public_dir: Path) -> None:
    """A `[build] command` that connects to the package index and to a server on this
    host's own address: the first connects, the second is refused by the sandbox."""
    addr = _host_address()
    srv = socket.create_server(("0.0.0.0", 0))
    srv_port = srv.getsockname()[1]
    probe = textwrap.dedent(f'''
        import socket
        for host, port in (("pypi.org", 443), ("{addr}", {srv_port})):
            try:
                socket.create_connection((host, port), timeout=3).close()
                print("REACHED", host, port)
            except OSError as exc:
                print("BLOCKED", host, port, type(exc).__name__)
    ''')
    d = app_dir(public_dir / "probe", "probe", WEB, '[build]\ncommand = "python3 probe.py"\n',
                instances=1, files={"probe.py": probe})
    try:
        r = cli_ok(kernel, "up", str(d))
        assert "REACHED pypi.org 443" in r.stderr, r.stderr
        assert f"BLOCKED {addr} {srv_port}" in r.stderr, r.stderr
        # the build's sandbox is undone after it, off the deploy's path: its network
        # namespace, its address claim and its egress grant go
        deadline = time.monotonic() + 20
        while True:
            left = [n for n in os.listdir("/run/netns") if "probe_build" in n]
            claims = json.loads(cli_ok(kernel, "ledger", "--json").stdout)
            held = [c for c in claims.get("records", []) if "_build" in str(c.get("owner"))]
            granted = json.loads(cli_ok(kernel, "query", "net", "stats").stdout)["apps"]
            if not left and not held and not any("_build" in a for a in granted):
                break
            assert time.monotonic() < deadline, (left, held, granted)
            time.sleep(0.2)
    finally:
        srv.close()
        down(kernel, "probe")


def app_dir(d: Path, name: str, script: str, extra: str, *, instances: int = 2,
            files: dict[str, str] | None = None) -> Path:
    """An app directory: ``script`` as web.py (on a fresh port, ``instances`` of it), more
    ``files``, and ``extra`` sections in its corral.toml."""
    d.mkdir()
    (d / "web.py").write_text(script)
    for rel, text in (files or {}).items():
        (d / rel).write_text(text)
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{name}"
        [ports]
        http = {free_port()}
        [processes]
        web = {{ command = "python3 web.py", port = "http", instances = {instances} }}
    ''') + extra)
    for path in (d, *d.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return d


def _host_address() -> str:
    """An address of this host other than loopback (the one a default route leaves by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return str(s.getsockname()[0])


def test_a_python_version_the_host_lacks_fails_the_build_naming_both(
        kernel: KernelProcess, public_dir: Path) -> None:
    """.python-version asks for 3.99: the build is refused (exit 2) naming the version asked
    for and the versions this host has; nothing is released or deployed."""
    d = copy_app(public_dir, "flask-uv")
    (d / ".python-version").write_text("3.99\n")

    def kept() -> list[str]:
        return [r["key"] for r in kernel.call("ledger.list", {"kind": "release"})["records"]
                if r["key"].startswith("flask-uv/")]

    before = kept()
    r = kernel.cli("up", str(d), "--set", f"ports.http={free_port()}", timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "3.99" in r.stderr and "3.11" in r.stderr, r.stderr
    assert kernel.call("app.ps")["apps"] == [] or all(
        a["app"] != "flask-uv" for a in kernel.call("app.ps")["apps"])
    assert kept() == before


# ---- rollback, config, release phase -----------------------------------------------------


def _versioned_app(public_dir: Path, name: str, release_cmd: str | None = None
                   ) -> tuple[Path, int, str]:
    front = free_port()
    lb_name = f"{name}.test"
    release = f'[release]\ncommand = "{release_cmd}"\n' if release_cmd else ""
    d = app_dir(public_dir / name, name, VERSIONED_WEB, textwrap.dedent(f'''
        [lb]
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''') + release, files={"VERSION": "1\n"})
    return d, front, lb_name


def _answer(front: int, lb_name: str) -> str:
    return get(front, host=lb_name).strip().split(" ", 1)[1]


def test_rollback_under_load_restores_code_and_config(kernel: KernelProcess,
                                                      public_dir: Path) -> None:
    """v1 (code 1), v2 (code 2), v3 (config GREETING=hi): `corral rollback APP v1` under
    keep-alive load fails no request and the app answers code 1 without the greeting; the
    rollback is quick (no rebuild)."""
    d, front, lb_name = _versioned_app(public_dir, "rolly")
    try:
        cli_ok(kernel, "up", str(d))
        (d / "VERSION").write_text("2\n")
        cli_ok(kernel, "up", str(d))
        cli_ok(kernel, "config", "set", "rolly", "GREETING=hi")
        wait_for(lambda: _answer(front, lb_name) == "2 hi", 10, what="v3 serving")
        r, took, load = during_load(front, lb_name,
                                    lambda: kernel.cli("rollback", "rolly", "v1", timeout=120))
        assert r.returncode == 0, r.stderr
        assert load.failures == [], load.failures[:5]
        wait_for(lambda: _answer(front, lb_name) == "1 -", 10, what="v1 serving again")
        rels = {x["release"]: x for x in releases(kernel, "rolly")}
        assert rels[1]["live"] and not rels[3]["live"], rels
        cfg = json.loads(cli_ok(kernel, "config", "rolly", "--json").stdout)
        assert cfg["config"] == {}, cfg
        print(f"rollback under load: {took:.2f}s, {load.ok} requests, 0 failed")
        # and forward again to the release with the config
        cli_ok(kernel, "rollback", "rolly", "v3")
        wait_for(lambda: _answer(front, lb_name) == "2 hi", 10, what="v3 again")
    finally:
        down(kernel, "rolly")


def test_release_phase_runs_once_and_its_failure_keeps_the_previous_release(
        kernel: KernelProcess, public_dir: Path) -> None:
    """The release phase sees the new release's config; it exits non-zero when FAIL is set:
    `config set FAIL=1` is refused (exit 2, the reason shown), the previous release keeps
    serving, the config is unchanged, and the failed release is listed as failed."""
    d, front, lb_name = _versioned_app(
        public_dir, "phased", release_cmd='echo phase $CORRAL_RELEASE; test -z \\"$FAIL\\"')
    try:
        cli_ok(kernel, "up", str(d))
        log = kernel.home / "apps" / "phased" / "releases" / "logs" / "v1.release.log"
        assert log.read_text().strip() == "phase v1"
        r = kernel.cli("config", "set", "phased", "FAIL=1", timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "release phase" in r.stderr and "exited with 1" in r.stderr, r.stderr
        assert _answer(front, lb_name) == "1 -"
        cfg = json.loads(cli_ok(kernel, "config", "phased", "--json").stdout)
        assert cfg["config"] == {}, cfg
        rels = releases(kernel, "phased")
        assert [(x["release"], x["status"], x["live"]) for x in rels] == [
            (1, "deployed", True), (2, "failed", False)], rels
        r = kernel.cli("rollback", "phased", "v2")
        assert r.returncode == 1 and "failed" in r.stderr, r.stderr
    finally:
        down(kernel, "phased")


def test_overrides_and_config_survive_the_next_up(kernel: KernelProcess,
                                                  public_dir: Path) -> None:
    """`--env` given to one `corral up` and config vars are kept by the next plain
    `corral up` (of a changed source); `--reset-overrides` drops the overrides."""
    d, front, lb_name = _versioned_app(public_dir, "kept")
    try:
        cli_ok(kernel, "up", str(d), "--env", "GREETING=from-env")
        assert _answer(front, lb_name) == "1 from-env"
        (d / "VERSION").write_text("2\n")
        cli_ok(kernel, "up", str(d))
        wait_for(lambda: _answer(front, lb_name) == "2 from-env", 10, what="v2 with env")
        cli_ok(kernel, "up", str(d), "--reset-overrides")
        wait_for(lambda: _answer(front, lb_name) == "2 -", 10, what="override dropped")
    finally:
        down(kernel, "kept")


# ---- one-off commands --------------------------------------------------------------------


def test_run_a_command_in_the_release_with_pipes(kernel: KernelProcess,
                                                 public_dir: Path) -> None:
    """`corral run APP -- CMD` runs in the live release (its files, config, uid, sandbox),
    with stdin/stdout/stderr piped and its exit status returned."""
    d, _front, _lb = _versioned_app(public_dir, "oneoff")
    try:
        cli_ok(kernel, "up", str(d))
        cli_ok(kernel, "config", "set", "oneoff", "GREETING=hey")
        r = subprocess.run(
            [sys.executable, "-m", "corral.cli", "run", "oneoff", "--", "sh", "-c",
             'cat VERSION; echo "$GREETING $CORRAL_RELEASE $(id -u)"; read x; echo "got $x";'
             ' echo oops >&2; exit 7'],
            input="line\n", env=kernel.env, capture_output=True, text=True, timeout=60,
            check=False)
        assert r.returncode == 7, (r.returncode, r.stderr)
        lines = r.stdout.splitlines()
        assert lines[0] == "1" and lines[2] == "got line", r.stdout
        greeting, release, uid = lines[1].split()
        assert (greeting, release) == ("hey", "v2") and int(uid) >= 1000, lines
        assert "oops" in r.stderr
        # options between the app and `--`; corral's own variables are not for --env
        r = kernel.cli("run", "oneoff", "-e", "EXTRA=x1", "--", "sh", "-c", "echo $EXTRA")
        assert (r.returncode, r.stdout.strip()) == (0, "x1"), r.stderr
        r = kernel.cli("run", "oneoff", "-e", "PORT=1", "--", "true")
        assert r.returncode == 2 and "PORT" in r.stderr, r.stderr
        # a directory given to `run`: the dev loop moved to `corral dev`
        r = kernel.cli("run", str(d))
        assert r.returncode == 2 and "corral dev" in r.stderr, r.stderr
    finally:
        down(kernel, "oneoff")


def interactive_shell(argv: list[str], env: dict[str, str], timeout: float = 20) -> None:
    """`corral ARGV` (a `run ... -- sh -i`) on a new terminal: the shell has the terminal,
    answers what is typed, ^C reaches its foreground job, and `exit 5` ends the CLI with 5."""
    pid, master = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal
        os.execve(sys.executable, [sys.executable, "-m", "corral.cli", *argv], env)
    out = b""

    def read_until(marker: bytes) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while marker not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
        assert marker in out, out[-2000:]

    os.write(master, b"test -t 0 && test -t 1 && echo term-$((6*7))\n")
    read_until(b"term-42")
    os.write(master, b"sleep 30\n")
    time.sleep(0.5)
    os.write(master, b"\x03")  # ^C reaches the foreground job, not the shell
    os.write(master, b"echo after-$?\n")
    read_until(b"after-130")
    os.write(master, b"exit 5\n")
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 5, out[-2000:]


def test_run_with_a_terminal_is_interactive(kernel: KernelProcess, public_dir: Path) -> None:
    """`corral run APP -- sh -i` from a terminal: the shell has a terminal (job control),
    answers what is typed, and `exit 5` ends it with status 5."""
    d, _front, _lb = _versioned_app(public_dir, "tty")
    try:
        cli_ok(kernel, "up", str(d))
        interactive_shell(["run", "tty", "--", "sh", "-i"], kernel.env)
    finally:
        down(kernel, "tty")


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input_is_refused_with_exit_2_and_changes_nothing(kernel: KernelProcess,
                                                              public_dir: Path) -> None:
    """A Procfile line of no known format, a failing `[build] command`, config keys that
    are not environment names, a rollback to a release that does not exist: each exits 2
    with the reason, and the app's releases, config and instances are as before."""
    d, front, lb_name = _versioned_app(public_dir, "strict")
    try:
        cli_ok(kernel, "up", str(d))
        before = (releases(kernel, "strict"),
                  json.loads(cli_ok(kernel, "config", "strict", "--json").stdout),
                  _answer(front, lb_name))
        (d / "Procfile").write_text("worker python3 web.py\n")
        r = kernel.cli("up", str(d))
        assert r.returncode == 2 and "Procfile:1" in r.stderr, r.stderr
        (d / "Procfile").unlink()
        with (d / "corral.toml").open("a") as f:
            f.write('[build]\ncommand = "echo building; exit 4"\n')
        (d / "VERSION").write_text("2\n")
        r = kernel.cli("up", str(d), timeout=120)
        assert r.returncode == 2 and "exited with 4" in r.stderr, r.stderr
        for bad in ("1ABC=x", "A-B=x", "PORT=1", "CORRAL_X=1", "=x"):
            r = kernel.cli("config", "set", "strict", bad)
            assert r.returncode == 2, (bad, r.returncode, r.stderr)
        r = kernel.cli("rollback", "strict", "v99")
        assert r.returncode == 2 and "v99" in r.stderr, (r.returncode, r.stderr)
        after = (releases(kernel, "strict"),
                 json.loads(cli_ok(kernel, "config", "strict", "--json").stdout),
                 _answer(front, lb_name))
        assert after == before
    finally:
        down(kernel, "strict")
