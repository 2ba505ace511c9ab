"""Secrets through the real kernel and drivers: masked in every listing, and written nowhere
but the root-only store.

A secret and a plain config var reach the app (it answers the secret's sha256, never the
value); `corral config` masks it; then a rollback and back, a release phase that fails, a
one-off command, and commands that are refused, while every event is recorded. Afterwards
the secret's value (or a piece of it) is in no file of the kernel's directory but the store
(0600 root files in a 0700 directory), in no listing, log, event or message, and in no
process's command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import CorralError
from corral.testing import KernelProcess, free_port
from e2e.test_lb_deployed import (
    WEB,
    driver_logs,
    http_get,
    web_app,
)

pytestmark = pytest.mark.root

# WEB whose /env answers what it got from its config: the sha256 of API_TOKEN (never the
# value), PLAIN and its release; it says at start whether it has a token (for the logs).
_BODY = 'body = (f"{iid} {version}\\n" if self.path != "/healthz" else "ok\\n").encode()'
assert _BODY in WEB and "\nsrv = S((" in WEB
SECRET_WEB = WEB.replace(_BODY, '''if self.path == "/env":
            token = os.environ.get("API_TOKEN")
            body = json.dumps({
                "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
                "plain": os.environ.get("PLAIN"),
                "release": os.environ.get("CORRAL_RELEASE")}).encode()
        else:
            ''' + _BODY)
SECRET_WEB = SECRET_WEB.replace("import http.server,", "import hashlib, json, http.server,")
SECRET_WEB = SECRET_WEB.replace("\nsrv = S((", '\nprint("starting; token set:", '
                                '"API_TOKEN" in os.environ, flush=True)\nsrv = S((')

RELEASE_PHASE = ('echo "release phase of $CORRAL_RELEASE; token set: ${API_TOKEN:+yes}"; '
                 'if [ "${RELEASE_FAIL:-}" = 1 ]; then echo "refusing: RELEASE_FAIL=1" >&2; '
                 'exit 1; fi')


class Recorder:
    """`corral events --raw` in a subprocess, everything it prints kept in a file."""

    def __init__(self, k: KernelProcess, path: Path) -> None:
        self.path = path
        self.out = open(path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "events", "--raw"],
                                     env=k.env, stdout=self.out, stderr=subprocess.STDOUT)

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()
        return self.path.read_bytes()


class Commands:
    """The CLI against ``k``, keeping everything every command printed."""

    def __init__(self, k: KernelProcess) -> None:
        self.k = k
        self.printed: list[tuple[str, bytes]] = []

    def __call__(self, *argv: str, code: int | None = 0, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        r = self.k.cli(*argv, timeout=timeout)
        shown = " ".join(a if len(a) < 40 else a[:12] + "..." for a in argv)
        self.printed.append((shown, (r.stdout + r.stderr).encode()))
        if code is not None:
            assert r.returncode == code, (
                f"corral {shown}: exit {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.k.log()}"
                f"\n{driver_logs(self.k)}")
        return r


def app_env(front: int, lb_name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(http_get("127.0.0.1", front, lb_name, "/env", timeout=10))
    return out


def files_below(root: Path, skip: Path) -> Iterator[Path]:
    """Regular files under ``root``, not under ``skip``, never through a mount point (the
    sandboxes' roots hold bind mounts of the host and the apps' own /tmp)."""
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if here / d != skip and not os.path.ismount(here / d)]
        for name in files:
            path = here / name
            if path.is_file() and not path.is_symlink():
                yield path


def sandbox_files(runtime: Path) -> Iterator[Path]:
    """Regular files corral wrote into the sandboxes' roots: each root's own file system,
    not what is mounted in it (the host's /usr, the release, the app's /tmp)."""
    roots = runtime / "roots"
    for root in sorted(roots.iterdir()) if roots.is_dir() else []:
        device = root.stat().st_dev
        for dirpath, dirs, files in os.walk(root):
            here = Path(dirpath)
            dirs[:] = [d for d in dirs if (here / d).lstat().st_dev == device]
            for name in files:
                path = here / name
                if path.is_file() and not path.is_symlink() and path.stat().st_dev == device:
                    yield path


def test_a_secret_is_masked_everywhere_and_stored_only_root_only(
        kernel: KernelProcess, public_dir: Path) -> None:
    """A secret set with `config set --secret` reaches the app, its release phase and its
    one-off commands, is masked by `corral config`, survives a rollback and back, and after a
    failed release phase, a one-off command and refused commands, its value is nowhere but
    in its 0600 file of the 0700 root-only store: not in any other file of the kernel's
    directory (ledger included), nor the kernel's or drivers' logs, the app's logs, the
    events, `ps`, `releases`, `ledger`, any command's output or error, or a command line."""
    k = kernel
    value = f"s3cr3t-{secrets.token_urlsafe(36)}"
    sha = hashlib.sha256(value.encode()).hexdigest()
    needles = [value.encode(), value[7:31].encode(), value[-24:].encode()]
    front = free_port()
    lb_name = "vault.test"
    d = web_app(public_dir / "vault", "vault", free_port(), f'''
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    ''', instances=1, script=SECRET_WEB,
        extra=f"[release]\ncommand = {json.dumps(RELEASE_PHASE)}\n")
    events = Recorder(k, public_dir / "events.txt")
    cli = Commands(k)
    refused: list[str] = []
    try:
        time.sleep(1.0)  # the subscription is in place before the first event
        cli("up", str(d))
        cli("config", "set", "vault", "PLAIN=plain-value")
        cli("config", "set", "vault", f"API_TOKEN={value}", "--secret")
        assert app_env(front, lb_name) == {"token_sha256": sha, "plain": "plain-value",
                                           "release": "v3"}

        listed = cli("config", "vault").stdout
        assert "API_TOKEN" in listed and "********" in listed and "plain-value" in listed
        shown = json.loads(cli("config", "vault", "--json").stdout)
        assert shown["config"] == {"API_TOKEN": "********", "PLAIN": "plain-value"}, shown
        assert shown["secrets"] == ["API_TOKEN"], shown

        # one-off commands get the secret too; their exit status is the command's
        cli("run", "vault", "--", "sh", "-c",
            f'test "$(printf %s "$API_TOKEN" | sha256sum | cut -c1-64)" = {sha}')
        cli("run", "vault", "--", "sh", "-c", "exit 3", code=3)
        cli("run", "vault", "--", "/no/such/program", code=None)

        # a rollback to v2 (no secret) and forward to v3 again (the secret comes back)
        cli("rollback", "vault")
        assert app_env(front, lb_name) == {"token_sha256": None, "plain": "plain-value",
                                           "release": "v2"}
        cli("rollback", "vault", "v3")
        assert app_env(front, lb_name)["token_sha256"] == sha

        # a release phase that fails: the deploy is refused, v3 and its secret serve on
        r = cli("config", "set", "vault", "RELEASE_FAIL=1", code=None)
        assert r.returncode != 0 and "release phase" in r.stderr, r.stderr
        assert "RELEASE_FAIL=1" in r.stderr, r.stderr  # its output is quoted, not the secret
        assert app_env(front, lb_name) == {"token_sha256": sha, "plain": "plain-value",
                                           "release": "v3"}

        # refused commands carrying the secret: their messages never quote it
        r = cli("config", "set", "vault", f"PORT={value}", "--secret", code=None)
        assert r.returncode != 0 and "PORT" in r.stderr, r.stderr
        r = cli("config", "set", "vault", f"BIG={value * 700}", "--secret", code=None)
        assert r.returncode != 0 and "BIG" in r.stderr, r.stderr
        for args in ({"vars": {"API_TOKEN": value + "\0"}}, {"vars": {"CORRAL_X": value}},
                     {"vars": {"9X": value}}, {"vars": {f"K{i}": value for i in range(300)}},
                     {"vars": {"API_TOKEN": value}, "wait_s": 0},
                     {"vars": {"API_TOKEN": value, "OTHER": 5}}):
            with pytest.raises(CorralError) as caught:
                k.call("app.config.set", {"name": "vault", "secret": True, **args})
            refused.append(str(caught.value))
        cli("rollback", "vault", "v99", code=None)

        # what every listing shows
        releases = cli("releases", "vault", "--json").stdout
        rels = json.loads(releases)["releases"]
        assert [r["release"] for r in rels] == [1, 2, 3, 4], rels
        assert [r["live"] for r in rels] == [False, False, True, False], rels
        assert rels[2]["config"] == {"API_TOKEN": "********", "PLAIN": "plain-value"}
        assert rels[3]["status"] == "failed", rels[3]
        cli("releases", "vault")
        cli("ps", "--json")
        cli("ps")
        cli("ledger", "--json")
        cli("ledger")
        cli("errors", "vault", code=None)
        cli("drivers", "--json")
        for op in ("app.get", "app.releases", "app.config"):
            cli.printed.append((op, json.dumps(k.call(op, {"name": "vault"})).encode()))
        logs = cli("logs", "vault", "-n", "1000").stdout
        phase_log = k.home / "apps" / "vault" / "releases" / "logs" / "v3.release.log"
        assert "release phase of v3; token set: yes" in phase_log.read_text()
        assert "starting; token set: True" in logs, logs
        cli("logs", "vault", "-n", "1000", "--json")
    finally:
        recorded = events.stop()

    # the recorder saw the story (the release phase's failure, the one-off commands)
    for topic in (b"app.vault.deploy.failed", b"app.vault.run.exited",
                  b"app.vault.rollback.started", b"app.vault.release.created"):
        assert topic in recorded, (topic, recorded[-2000:])

    # the store: exactly one 0600 root file holds the value, in 0700 root directories
    store = k.home / "secrets"
    for directory in (store, store / "vault"):
        st = directory.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), (directory, oct(st.st_mode))
    holding = []
    for path in files_below(store, store / "-"):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), (path, oct(st.st_mode))
        if path.read_bytes() == value.encode():
            holding.append(path)
    assert len(holding) == 1, holding
    config_file = k.home / "config" / "vault.json"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600

    # nowhere else: the kernel's whole directory (home with the ledger, the drivers' logs
    # and homes; the runtime directory; corrald.log), every output, every event
    places: list[tuple[str, bytes]] = []
    scanned = 0
    for path in [*files_below(k.base, store), *sandbox_files(k.runtime)]:
        places.append((str(path), path.read_bytes()))
        scanned += 1
    assert scanned > 10 and any(p.endswith("corrald.log") for p, _ in places)
    assert any(".sqlite" in p or p.endswith(".db") for p, _ in places), [p for p, _ in places]
    places += cli.printed
    places += [("events", recorded)] + [(f"refusal {i}", m.encode())
                                         for i, m in enumerate(refused)]
    # command lines of every process, environments of the kernel and its drivers
    drivers = [dr["pid"] for dr in k.call("drivers.list")["drivers"] if dr.get("pid")]
    assert k.proc is not None
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline",) + (("environ",) if int(pid) in (k.proc.pid, *drivers)
                                        else ()):
                try:
                    places.append((f"/proc/{pid}/{what}",
                                   Path(f"/proc/{pid}/{what}").read_bytes()))
                except OSError:
                    continue
    # (the reading works: the app's own environment holds the value, as it must)
    [app] = [a for a in json.loads(cli("ps", "--json").stdout) if a["app"] == "vault"]
    instance_env = Path(f"/proc/{app['instances'][0]['pid']}/environ").read_bytes()
    assert f"API_TOKEN={value}".encode() in instance_env.split(b"\0")
    print(f"\nscanned {scanned} files, {len(cli.printed)} command outputs, "
          f"{len(recorded)} bytes of events, {len(places)} places in all; refusals: "
          + " | ".join(m[:90] for m in refused))
    leaks = [(where, needle.decode()[:6] + "...") for where, data in places
             for needle in needles if needle in data]
    assert leaks == [], leaks
