"""git push and the remote CLI over a real OpenSSH server (Debian's sshd, real ssh and git).

One kernel (net, fs, lb, log) with an SSH account of its own, and sshd on a loopback port
letting that account in by key. Keys are added on the host with `corral keys add`; a
"laptop" is a git clone in a directory of the test's, using `GIT_SSH_COMMAND` and
`CORRAL_SSH_COMMAND` to reach the port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.testing import KernelProcess, free_port, running_kernel
from e2e.sshd import SshServer, new_user, ssh_server
from e2e.test_lb_deployed import new_net_host, require_net
from e2e.test_releases import VERSIONED_WEB, app_dir, get

pytestmark = pytest.mark.root
DRIVERS = ("net", "fs", "lb", "log")


@dataclass
class Remote:
    """The host (kernel + sshd) and the keys made for the module."""

    k: KernelProcess
    srv: SshServer
    base: Path
    keys: dict[str, Path]

    def env(self, key: str) -> dict[str, str]:
        """A laptop's environment speaking as ``key``."""
        command = self.srv.ssh_command(self.keys[key])
        return {**os.environ, "GIT_SSH_COMMAND": command, "CORRAL_SSH_COMMAND": command,
                "XDG_CONFIG_HOME": str(self.base / f"config-{key}"),
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}

    def corral(self, key: str, *argv: str, input: str | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
        """``corral --remote USER@127.0.0.1 ARGV`` from the laptop, as ``key``."""
        return subprocess.run([sys.executable, "-m", "corral.cli", "--remote", self.srv.target,
                               *argv], env=self.env(key), capture_output=True, text=True,
                              input=input, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def git(self, key: str, cwd: Path, *argv: str, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        """``git ARGV`` in ``cwd`` as ``key``."""
        return subprocess.run(["git", *argv], cwd=cwd, env=self.env(key), capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    """The module's host: a kernel whose SSH account is new, sshd, and three keys: alice
    (admin), ci (scoped to shop) and stranger (never added)."""
    require_net()
    user = new_user()
    base = Path(f"/tmp/corral-e2e-remote-{os.getpid()}")
    base.mkdir(mode=0o755, exist_ok=True)
    toml = new_net_host().host_toml(DRIVERS) + f'[ssh]\nuser = "{user}"\n'
    try:
        with ssh_server(user) as srv, running_kernel(base / "k", toml, drivers=DRIVERS) as k:
            keys: dict[str, Path] = {}
            for name in ("alice", "ci", "stranger"):
                keys[name], _ = srv.client_key(name)
            r = k.cli("keys", "add", "alice", str(keys["alice"].with_suffix(".pub")), "--admin")
            assert r.returncode == 0, r.stderr
            r = k.cli("keys", "add", "ci", str(keys["ci"].with_suffix(".pub")), "--app", "shop")
            assert r.returncode == 0, r.stderr
            yield Remote(k, srv, base, keys)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def laptop_app(r: Remote, name: str, key: str = "alice") -> tuple[Path, int, str]:
    """A git work tree of a versioned web app (VERSION file) served by the lb, with the
    remote ``prod`` pointing at the host; (directory, frontend port, lb name)."""
    front = free_port()
    lb_name = f"{name}.test"
    d = app_dir(r.base / f"laptop-{name}-{key}", name, VERSIONED_WEB, textwrap.dedent(f'''
        [lb]
        name = "{lb_name}"
        frontend = {front}
        health = {{ http = "/healthz", interval = "0.5s", rise = 1 }}
        plane = "proxy"
        mode = "http"
    '''), files={"VERSION": "1\n"})
    for argv in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "v1"),
                 ("remote", "add", "prod", f"{r.srv.target}:{name}")):
        out = r.git(key, d, *argv)
        assert out.returncode == 0, out.stderr
    return d, front, lb_name


def head(r: Remote, d: Path) -> str:
    return r.git("alice", d, "rev-parse", "HEAD").stdout.strip()


def answer(front: int, lb_name: str) -> str:
    return get(front, host=lb_name).strip().split(" ", 1)[1]


def releases(r: Remote, app: str) -> list[dict[str, Any]]:
    out = r.k.cli("releases", app, "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["releases"])


def test_git_push_builds_releases_and_serves_recording_commit_and_key(remote: Remote) -> None:
    """`git push prod main` deploys: the output streams into git's as "remote:" lines, the
    lb serves the commit, and the release records the commit and the key. A one-line change
    pushed again is live when the push returns. A bad manifest and a branch that is not the
    deploy branch are refused with the reason in git's output; the live release and the
    repository's branch stay as they were."""
    r = remote
    d, front, lb_name = laptop_app(r, "pushy")
    try:
        t0 = time.monotonic()
        out = r.git("alice", d, "push", "prod", "main")
        first = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        assert "remote: " in out.stderr and "live" in out.stderr, out.stderr
        assert answer(front, lb_name) == "1 -"
        rel = releases(r, "pushy")[-1]
        assert rel["commit"] == head(r, d), rel
        assert rel["by"] == "key:alice", rel
        assert rel["origin"] == "git push", rel

        (d / "VERSION").write_text("2\n")
        r.git("alice", d, "commit", "-qam", "v2")
        t0 = time.monotonic()
        out = r.git("alice", d, "push", "prod", "main")
        second = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        assert answer(front, lb_name) == "2 -", "the push returns once the release is live"
        print(f"first push {first:.2f}s, one-line change {second:.2f}s")

        # a bad manifest: refused, the manifest's error in git's output, v2 still serving
        good = head(r, d)
        toml = (d / "corral.toml").read_text()
        (d / "corral.toml").write_text(toml.replace("[lb]", "[lb]\nbogus = 1"))
        r.git("alice", d, "commit", "-qam", "bad")
        out = r.git("alice", d, "push", "prod", "main")
        assert out.returncode != 0
        assert "bogus" in out.stderr and "refused" in out.stderr, out.stderr
        assert answer(front, lb_name) == "2 -"
        remote_head = r.git("alice", d, "ls-remote", "prod", "refs/heads/main").stdout.split()
        assert remote_head[0] == good, "a refused push leaves the branch where it was"

        # another branch: refused with a hint
        r.git("alice", d, "reset", "-q", "--hard", good)
        r.git("alice", d, "checkout", "-qb", "feature")
        out = r.git("alice", d, "push", "prod", "feature")
        assert out.returncode != 0
        assert "deploys the branch 'main'" in out.stderr and "HEAD:main" in out.stderr, \
            out.stderr
        assert [x["release"] for x in releases(r, "pushy")] == [1, 2]
    finally:
        r.k.cli("down", "pushy")
