"""git push and the remote CLI over a real OpenSSH server (Debian's sshd, real ssh and git).

One kernel (net, fs, lb, log) with an SSH account of its own, and sshd on a loopback port
letting that account in by key. Keys are added on the host with `corral keys add`; a
"laptop" is a git clone in a directory of the test's, using `GIT_SSH_COMMAND` and
`CORRAL_SSH_COMMAND` to reach the port.
"""

from __future__ import annotations

import json
import os
import shlex
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

from corral.testing import KernelProcess, free_port, running_kernel, wait_for
from e2e.sshd import SshServer, new_user, ssh_server
from e2e.test_lb_deployed import new_net_host, require_net
from e2e.test_releases import VERSIONED_WEB, app_dir, get, interactive_shell

pytestmark = pytest.mark.root
DRIVERS = ("net", "fs", "lb", "log", "cron")


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


def test_remote_cli_runs_every_everyday_command_over_ssh(remote: Remote) -> None:
    """`corral --remote TARGET ...` from the laptop: up of a local directory (uploaded, built
    there), ps, releases, config set/unset, restart, scale, logs, run with pipes (stdin in,
    stdout and stderr apart, the exit status back), rollback and down; a saved remote and
    CORRAL_REMOTE name the same host."""
    r = remote
    d, front, lb_name = laptop_app(r, "shop")
    try:
        out = r.corral("alice", "up", str(d))
        assert out.returncode == 0, out.stderr
        assert "generation" in out.stdout and "v1 live" in out.stdout, out.stdout
        assert answer(front, lb_name) == "1 -"
        rel = releases(r, "shop")[-1]
        assert (rel["by"], rel["origin"], rel["commit"]) == ("key:alice", "upload", None), rel

        ps = json.loads(r.corral("alice", "ps", "--json").stdout)
        assert "shop" in {a["app"] for a in ps}
        out = r.corral("alice", "config", "set", "shop", "GREETING=hi")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: answer(front, lb_name) == "1 hi", 20, what="config live")
        assert "GREETING" in r.corral("alice", "config", "shop").stdout
        # a secret: its value read on the laptop (stdin here), never on a command line
        out = r.corral("alice", "config", "set", "shop", "TOKEN", "--secret", input="s3cret\n")
        assert out.returncode == 0, out.stderr
        shown = r.corral("alice", "config", "shop").stdout
        assert "TOKEN" in shown and "s3cret" not in shown, shown

        # a saved remote, then CORRAL_REMOTE
        saved = subprocess.run([sys.executable, "-m", "corral.cli", "remote", "add", "prod",
                                r.srv.target], env=r.env("alice"), capture_output=True, text=True)
        assert saved.returncode == 0, saved.stderr
        env = {**r.env("alice"), "CORRAL_REMOTE": "prod"}
        listed = subprocess.run([sys.executable, "-m", "corral.cli", "releases", "shop",
                                 "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert [x["release"] for x in json.loads(listed.stdout)["releases"]] == [1, 2, 3]

        # run: stdin reaches the command, stdout and stderr come back apart, and the status
        out = r.corral("alice", "run", "shop", "--", "sh", "-c",
                       "read x; echo out:$x:$TOKEN; echo err:$GREETING >&2; exit 7",
                       input="ping\n")
        assert out.returncode == 7, out.stderr
        assert out.stdout.strip() == "out:ping:s3cret" and "err:hi" in out.stderr, (
            out.stdout, out.stderr)

        out = r.corral("alice", "logs", "shop", "-n", "5")
        assert out.returncode == 0, out.stderr
        out = r.corral("alice", "scale", "shop", "web=1")
        assert out.returncode == 0, out.stderr
        out = r.corral("alice", "rollback", "shop", "v1")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: answer(front, lb_name) == "1 -", 20, what="rolled back")
        out = r.corral("alice", "restart", "shop")
        assert out.returncode == 0, out.stderr
    finally:
        out = r.corral("alice", "down", "shop")
        assert out.returncode == 0, out.stderr
    assert "shop" not in {a["app"] for a in r.k.call("app.ps")["apps"]}


def test_a_key_scoped_to_one_app_touches_only_that_app(remote: Remote) -> None:
    """ci is scoped to shop: it may push to and run commands on shop; pushing to another
    app, any command on another app, and admin commands (keys, ledger, drivers) are refused
    with a clear message, and nothing changes."""
    r = remote
    d, _, _ = laptop_app(r, "shop", key="ci")
    other, _, _ = laptop_app(r, "other", key="alice")
    try:
        out = r.git("ci", d, "push", "prod", "main")
        assert out.returncode == 0, out.stderr
        assert releases(r, "shop")[-1]["by"] == "key:ci"
        out = r.git("alice", other, "push", "prod", "main")
        assert out.returncode == 0, out.stderr

        # ci pushing to other: refused by the gateway before anything is received
        r.git("ci", other, "remote", "set-url", "prod", f"{r.srv.target}:other")
        out = r.git("ci", other, "push", "prod", "main")
        assert out.returncode != 0 and "may not act on app 'other'" in out.stderr, out.stderr

        ps = json.loads(r.corral("ci", "ps", "--json").stdout)
        assert {a["app"] for a in ps} == {"shop"}, "ps shows the key's apps only"
        for argv in (("releases", "other"), ("config", "set", "other", "X=1"),
                     ("run", "other", "--", "true"), ("down", "other"), ("logs", "other"),
                     ("restart", "other"), ("keys", "ls"), ("ledger",), ("drivers",),
                     ("keys", "add", "evil", "-", "--admin")):
            out = r.corral("ci", *argv, input="")
            assert out.returncode != 0, argv
            assert "may not" in out.stderr or "admin key" in out.stderr, (argv, out.stderr)
        assert [x["release"] for x in releases(r, "other")] == [1]
        assert r.k.call("app.config", {"name": "other"})["config"] == {}
        assert {k["name"] for k in r.k.call("keys.list")["keys"]} == {"alice", "ci"}
        out = r.corral("ci", "releases", "shop")
        assert out.returncode == 0, out.stderr
    finally:
        r.k.cli("down", "shop")
        r.k.cli("down", "other")


def test_ssh_gives_no_shell_no_forwarding_and_parses_commands_strictly(remote: Remote
                                                                       ) -> None:
    """Over SSH: an unknown key is refused by sshd itself; no shell (an interactive login, a
    command outside the verb table), no terminal except for run, no port forwarding; hostile
    git paths and arguments are refused and write nothing anywhere."""
    r = remote
    srv = r.srv
    marker = Path("/tmp") / f"corral-pwned-{os.getpid()}"
    # an unknown key: sshd's own refusal
    out = srv.ssh(r.keys["stranger"], "corral", "ps")
    assert out.returncode == 255 and b"Permission denied" in out.stderr, out.stderr
    # no shell
    for cmd in ("", "sh", "bash -c id", f"touch {marker}", "scp -t /tmp",
                f"corral ps; touch {marker}", f"corral ps && touch {marker}",
                f"corral ps $(touch {marker})", f"corral ps `touch {marker}`"):
        out = srv.ssh(r.keys["alice"], *([cmd] if cmd else []))
        assert out.returncode != 0, cmd
        assert b"refused" in out.stderr or b"usage" in out.stderr, (cmd, out.stderr)
    # hostile git paths
    for cmd in ("git-receive-pack '../etc'", "git-receive-pack 'shop.git; id'",
                f"git-upload-pack --upload-pack='touch {marker}'",
                f"git-upload-pack '--upload-pack=touch {marker}' shop",
                "git-receive-pack '/etc/passwd'", "git-receive-pack 'a\nb'",
                "git-receive-pack '" + "a" * 5000 + "'", "git-receive-pack shop other",
                "git-receive-pack \"unbalanced"):
        out = srv.ssh(r.keys["alice"], cmd)
        assert out.returncode != 0 and b"refused" in out.stderr, (cmd[:80], out.stderr)
    assert not marker.exists()
    repos = r.k.home / "ssh" / "repos"
    assert {p.name for p in repos.iterdir() if p.suffix == ".git"} <= {
        "pushy.git", "shop.git", "other.git"}
    # no terminal for anything but run; no port forwarding
    out = srv.ssh(r.keys["alice"], "corral", "ps", tty=True)
    assert out.returncode != 0 and b"no terminal" in out.stdout + out.stderr, out  # one pty
    out = subprocess.run([*shlex.split(srv.ssh_command(r.keys["alice"])), "-T", "-o",
                          "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9", srv.target,
                          "corral", "ps"], capture_output=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 255 and b"forwarding failed" in out.stderr, out.stderr
    # the account's authorized_keys: root's, every line forced and restricted
    ak = r.k.home / "ssh" / ".ssh" / "authorized_keys"
    st = ak.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    for line in ak.read_text().splitlines():
        assert line.startswith('command="') and '",restrict,pty ssh-' in line, line


def test_two_pushes_to_one_app_never_interleave(remote: Remote) -> None:
    """Two clones push different commits to one app at once: the second waits for the first
    (and says so), then is refused because the branch moved; what serves is the commit of
    the push that succeeded, recorded as the one release made."""
    r = remote
    a, front, lb_name = laptop_app(r, "twice")
    try:
        assert r.git("alice", a, "push", "prod", "main").returncode == 0
        b = r.base / "laptop-twice-b"
        assert r.git("alice", r.base, "clone", "-q", f"{r.srv.target}:twice",
                     str(b)).returncode == 0
        (a / "VERSION").write_text("A\n")
        r.git("alice", a, "commit", "-qam", "A")
        (b / "VERSION").write_text("B\n")
        for argv in (("config", "user.email", "t@example.com"), ("commit", "-qam", "B")):
            r.git("alice", b, *argv)
        env = r.env("alice")
        procs = [subprocess.Popen(["git", "push", "prod", "main"], cwd=a, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 subprocess.Popen(["git", "push", "origin", "main"], cwd=b, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        results = [(p.wait(300), p.communicate()[1]) for p in procs]
        ok = [i for i, (code, _) in enumerate(results) if code == 0]
        assert len(ok) == 1, results
        winner = "A" if ok == [0] else "B"
        assert answer(front, lb_name) == f"{winner} -"
        loser_err = results[1 - ok[0]][1]
        assert "moved" in loser_err or "rejected" in loser_err or "fetch first" in loser_err, \
            loser_err
        rels = releases(r, "twice")
        assert len(rels) == 2 and rels[-1]["live"], rels
        winner_dir = a if winner == "A" else b
        assert rels[-1]["commit"] == head(r, winner_dir)
    finally:
        r.k.cli("down", "twice")


def test_remote_run_with_a_terminal_is_interactive(remote: Remote) -> None:
    """`corral --remote HOST run APP -- sh -i` from a terminal: ssh asks for one (the only
    command allowed one), the shell has it, answers what is typed, ^C reaches its foreground
    job, and `exit 5` ends it with status 5 on the laptop."""
    r = remote
    d, _front, _lb = laptop_app(r, "termy")
    try:
        assert r.corral("alice", "up", str(d)).returncode == 0
        interactive_shell(["--remote", r.srv.target, "run", "termy", "--", "sh", "-i"],
                          r.env("alice"), timeout=30)
    finally:
        r.k.cli("down", "termy")


def test_remote_logs_follow_streams_and_ssh_urls_work(remote: Remote) -> None:
    """`corral --remote ssh://USER@HOST:PORT logs -f APP` streams the app's new lines as
    they are written (the URL form of a target, the port in it); errors, top and cron answer
    remotely too, cron scoped to the key's apps."""
    r = remote
    d = r.base / "laptop-ticker"
    d.mkdir()
    (d / "corral.toml").write_text(textwrap.dedent('''
        [app]
        name = "ticker"
        [processes]
        tick = { command = "sh -c 'while true; do echo tick-$(date +%s%N); sleep 0.2; done'" }
        [cron.beat]
        schedule = "@hourly"
        command = "echo beat"
    '''))
    for path in (d, *d.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    url = f"ssh://{r.srv.user}@127.0.0.1:{r.srv.port}"
    env = {**r.env("alice"), "CORRAL_SSH_COMMAND": r.srv.ssh_command(r.keys["alice"]).replace(
        f"-p {r.srv.port} ", "")}
    try:
        out = subprocess.run([sys.executable, "-m", "corral.cli", "--remote", url, "up", str(d)],
                             env=env, capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        follow = subprocess.Popen([sys.executable, "-m", "corral.cli", "--remote", url, "logs",
                                   "-f", "ticker", "-n", "1"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 30
            assert follow.stdout is not None
            while len(seen) < 4 and time.monotonic() < deadline:
                line = follow.stdout.readline()
                if "tick-" in line:
                    seen.append(line.split("tick-", 1)[1].strip())
            assert len(seen) >= 4 and len(set(seen)) == len(seen), seen
        finally:
            follow.kill()
            follow.wait()
        for argv in (("errors", "ticker"), ("top", "ticker", "--once", "--json")):
            out = subprocess.run([sys.executable, "-m", "corral.cli", "--remote", url, *argv],
                                 env=env, capture_output=True, text=True, timeout=120,
                                 stdin=subprocess.DEVNULL)
            assert out.returncode == 0, (argv, out.stderr)
        # cron: the admin key sees the job and runs it; ci (scoped to shop) sees no job of
        # ticker's and may not run one
        jobs = json.loads(r.corral("alice", "cron", "ls", "--json").stdout)["jobs"]
        assert "ticker.beat" in {j["job"] for j in jobs}, jobs
        out = r.corral("alice", "cron", "run", "ticker.beat", "--json")
        assert out.returncode == 0, out.stderr
        jobs = json.loads(r.corral("ci", "cron", "ls", "--json").stdout)["jobs"]
        assert "ticker.beat" not in {j["job"] for j in jobs}, jobs
        out = r.corral("ci", "cron", "run", "ticker.beat")
        assert out.returncode != 0 and "may not act on cron job" in out.stderr, out.stderr
    finally:
        r.k.cli("down", "ticker")


def test_an_admin_key_manages_keys_remotely_and_a_removed_key_is_refused(remote: Remote
                                                                         ) -> None:
    """alice (admin) adds a key over SSH (the public key sent on stdin), the new key may act
    on its app at once; `keys rm` over SSH removes it, and sshd refuses it from the next
    connection on."""
    r = remote
    private, public = r.srv.client_key("bob")
    r.keys["bob"] = private
    out = r.corral("alice", "keys", "add", "bob", str(private.with_suffix(".pub")), "--app",
                   "shop", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["key"]["apps"] == ["shop"]
    me = r.corral("bob", "keys", "whoami")
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout) == {"key": "bob", "apps": ["shop"], "admin": False}
    listed = json.loads(r.corral("alice", "keys", "ls", "--json").stdout)
    assert {k["name"] for k in listed} == {"alice", "ci", "bob"}
    assert public.split()[1] not in r.corral("alice", "keys", "ls", "--json").stdout
    out = r.corral("alice", "keys", "rm", "bob")
    assert out.returncode == 0, out.stderr
    out = r.srv.ssh(private, "corral", "keys", "whoami")
    assert out.returncode == 255 and b"Permission denied" in out.stderr, out.stderr
