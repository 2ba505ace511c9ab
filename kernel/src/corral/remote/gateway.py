"""``corral-ssh``: the forced command of every key in the SSH account's authorized_keys.

sshd runs ``corral-ssh --bus EP --events EP --home DIR KEYNAME`` whatever the client asked
for, with the client's request in ``SSH_ORIGINAL_COMMAND``. That text is parsed here, never
given to a shell:

- it must be one line of printable characters, 8 KiB at most, split with POSIX shell
  quoting rules (``shlex``: quotes, no expansion, nothing executed);
- its first word must be a verb of ``VERBS`` (an allow-list): ``git-receive-pack`` and
  ``git-upload-pack`` with one argument, an app's repository (``shop``, ``shop.git``,
  ``/shop.git``; nothing else: no ``..``, no option), or ``corral`` with the arguments of
  one of the commands of ``REMOTE_COMMANDS``, parsed by the CLI's own parser;
- a terminal (``ssh -t``) is accepted for ``corral run`` only.

Everything then goes to the kernel as the key (``CORRAL_SSH_KEY``): the kernel decides what
the key may do (``corral.remote._access``) and records it as ``key:NAME``. A push is received
by ``git receive-pack`` into ``<home>/repos/APP.git``; its ``pre-receive`` hook (this module
again, ``--pre-receive``) deploys the pushed commit and refuses the push when the deploy
fails, so the branch moves only when the new release is live.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from corral.cli._remote import REMOTE_COMMANDS
from corral.client import KEY_ENV, KernelClient
from corral.errors import CorralError, ErrorCode

MAX_COMMAND = 8192
ZERO = "0" * 40
_REPO = re.compile(r"^/?(?:~/)?([a-z](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.git)?/?$")

VERBS = ("git-receive-pack", "git-upload-pack", "corral")


class Refused(Exception):
    """The request is refused before anything is done; the text says why."""


def parse_command(text: str | None) -> tuple[str, list[str]]:
    """``SSH_ORIGINAL_COMMAND`` as (verb, arguments), or Refused."""
    if text is None or not text.strip():
        raise Refused("this account has no shell. Push with git (git push corral@HOST:APP "
                      "main) or run corral commands with `corral --remote corral@HOST ...`")
    if len(text) > MAX_COMMAND:
        raise Refused(f"the command is longer than {MAX_COMMAND} characters")
    if any(not ch.isprintable() for ch in text):
        raise Refused("the command holds control characters (newlines, NUL...)")
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError as exc:
        raise Refused(f"the command cannot be read: {exc}") from None
    if not words or words[0] not in VERBS:
        verb = words[0] if words else ""
        raise Refused(f"{verb[:64]!r} is not something this account does (it does "
                      f"{', '.join(VERBS)})")
    return words[0], words[1:]


def repository(args: list[str]) -> str:
    """The app named by a git verb's one argument (``shop``, ``shop.git``, ``/shop.git``)."""
    if len(args) != 1:
        raise Refused("git asks for exactly one repository")
    m = _REPO.fullmatch(args[0])
    if m is None:
        raise Refused(f"{args[0][:80]!r} is not an app repository: use the app's name "
                      "(corral@HOST:APP)")
    return m.group(1)


# ---- the forced command ---------------------------------------------------------------------


def _options(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="corral-ssh", description=__doc__)
    p.add_argument("--bus", help="the kernel's bus endpoint for this account")
    p.add_argument("--events", help="the kernel's events endpoint for this account")
    p.add_argument("--home", type=Path, help="the account's home (repos/, uploads/)")
    p.add_argument("--pre-receive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true",
                   help="only check that this account can run corral-ssh (keys add does)")
    p.add_argument("key", nargs="?", help="the key's name (baked into authorized_keys)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one SSH connection (or, with ``--pre-receive``, one push's hook)."""
    ns = _options(argv)
    if ns.check:
        from corral.cli import _main  # everything a command needs can be loaded

        print(f"corral-ssh ok ({_main.__name__})")
        return 0
    if ns.pre_receive:
        return pre_receive(sys.stdin.buffer, Path(os.environ["CORRAL_SSH_HOME"]),
                           os.environ["CORRAL_SSH_APP"])
    if not ns.key or not ns.home:
        print("corral-ssh: run by sshd as the forced command of a key", file=sys.stderr)
        return 2
    os.environ[KEY_ENV] = ns.key
    if ns.bus:
        os.environ["CORRAL_BUS"] = ns.bus
    if ns.events:
        os.environ["CORRAL_EVENTS"] = ns.events
    os.environ["CORRAL_SSH_HOME"] = str(ns.home)
    try:
        verb, args = parse_command(os.environ.get("SSH_ORIGINAL_COMMAND"))
        terminal = os.isatty(0) or os.isatty(1)
        if terminal and not (verb == "corral" and args[:1] == ["run"]):
            raise Refused("no terminal here except for `corral run` (ssh -T, or leave -t out)")
        if verb == "corral":
            return remote_cli(args, ns.home)
        app = repository(args)
        _may(app)
        if verb == "git-receive-pack":
            return receive_pack(ns.home, app)
        return upload_pack(ns.home, app)
    except Refused as exc:
        print(f"corral: refused: {exc}", file=sys.stderr)
        return 2
    except CorralError as exc:
        print(f"corral: {exc.reason}", file=sys.stderr)
        return 1


def _whoami() -> dict[str, Any]:
    return KernelClient().call("keys.whoami", timeout=30)


def _may(app: str) -> None:
    """Refuse early (the kernel checks again) what the key may not touch."""
    me = _whoami()
    if not me.get("admin") and app not in me.get("apps", []):
        raise Refused(f"key {me.get('key')!r} may not act on app {app!r} (it may on "
                      f"{', '.join(me.get('apps', [])) or 'no app'})")


# ---- git ------------------------------------------------------------------------------------


def _repo(home: Path, app: str) -> Path:
    return home / "repos" / f"{app}.git"


def receive_pack(home: Path, app: str) -> int:
    """Receive a push into the app's bare repository (made on the first push); the
    ``pre-receive`` hook deploys it."""
    repo = _repo(home, app)
    hooks = _hooks(home)
    _hold_push_lock(repo, app)  # held by receive-pack (and its hook) until it exits
    if not repo.exists():
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(repo)],
                       check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "CORRAL_SSH_APP": app}
    argv = ["git", "-c", f"core.hooksPath={hooks}", "-c", "receive.denyDeletes=true",
            "receive-pack", str(repo)]
    os.execvpe("git", argv, env)  # noqa: S606 - a fixed argv, no shell


def upload_pack(home: Path, app: str) -> int:
    """Serve a fetch or clone of what was pushed to the app."""
    repo = _repo(home, app)
    if not repo.exists():
        raise Refused(f"nothing was pushed to {app!r} yet")
    os.execvp("git", ["git", "upload-pack", "--strict", str(repo)])  # noqa: S606


def _hooks(home: Path) -> Path:
    """The hooks directory the kernel wrote (root-owned: the account cannot change it)."""
    hooks = home / "hooks"
    if not (hooks / "pre-receive").exists():
        raise Refused("this host's corral has no git hook installed (run `corral keys ls` on "
                      "the host as root to write it)")
    return hooks


def _hold_push_lock(repo: Path, app: str) -> None:
    """One push of an app at a time, from the ref advertisement to the ref update: the
    lock's descriptor is inherited by ``git receive-pack`` (and its hook) and released when
    it exits. A second push says it waits, then waits; git then sees the branch the first
    push moved (a push from an older base is rejected by git as not a fast-forward)."""
    fd = os.open(repo.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"corral: another push to {app} is deploying; waiting for it to finish",
              file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.set_inheritable(fd, True)


def pre_receive(updates: BinaryIO, home: Path, app: str) -> int:
    """git's ``pre-receive`` hook: deploy the pushed commit of the app's deploy branch; a
    non-zero exit refuses the whole push (the branch does not move)."""
    from corral.cli import _rollout

    lines = [x.split() for x in updates.read().decode("ascii", "replace").splitlines()]
    try:
        branch = str(KernelClient().call("app.branch", {"name": app})["branch"])
        wanted = f"refs/heads/{branch}"
        if len(lines) != 1 or len(lines[0]) != 3 or lines[0][2] != wanted:
            pushed = ", ".join(x[2] for x in lines if len(x) == 3) or "nothing"
            print(f"corral: refused: {app} deploys the branch {branch!r}; this push updates "
                  f"{pushed}. Push that branch alone: git push REMOTE HEAD:{branch} (or make "
                  f"another the deploy branch: corral branch {app} NAME)", flush=True)
            return 1
        old, new, ref = lines[0]
        if new == ZERO:
            print(f"corral: refused: {branch} cannot be deleted here", flush=True)
            return 1
        # the gateway's lock keeps other pushes out; the branch is still where it was
        now = subprocess.run(["git", "rev-parse", "--verify", "-q", ref],
                             capture_output=True, text=True).stdout.strip() or ZERO
        if now != old:
            print(f"corral: refused: {branch} moved to {now[:12]}; fetch, rebase or merge, "
                  "and push again", flush=True)
            return 1
        token = secrets.token_hex(16)
        upload = home / "uploads" / f"{token}.tar"
        try:
            with open(os.open(upload, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                              0o600), "wb") as out:
                subprocess.run(["git", "archive", "--format=tar", new], check=True, stdout=out)
            print(f"corral: deploying {new[:12]} to {app}", flush=True)
            ns = argparse.Namespace(command="push", quiet=False, json=False)
            res = _rollout.run(ns, app, "app.deploy", {
                "upload": token, "name": app, "git": {"commit": new, "ref": ref}},
                out=sys.stdout)  # git shows a hook's stdout as "remote:" lines
        finally:
            with contextlib.suppress(FileNotFoundError):
                upload.unlink()
    except CorralError as exc:
        print(f"corral: push refused, {app} unchanged: {exc.reason}", flush=True)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"corral: push refused: {' '.join(map(str, exc.cmd))} failed", flush=True)
        return 1
    release = f"v{res['release']} " if res.get("release") else ""
    state = "unchanged, " if res.get("unchanged") else ""
    print(f"corral: {app}: {state}{release}live ({new[:12]}, {res.get('seconds', 0):.1f}s)",
          flush=True)
    return 0


# ---- corral commands ------------------------------------------------------------------------


def remote_cli(args: list[str], home: Path) -> int:
    """A ``corral`` command of ``REMOTE_COMMANDS``, parsed by the CLI's parser and run as the
    key (``up -`` reads the source's tar from stdin)."""
    from corral.cli import _main

    ns = _main.parser().parse_args(args)  # a usage error exits 2 with argparse's message
    if ns.command not in REMOTE_COMMANDS:
        raise Refused(f"`corral {ns.command}` runs on the host only (over SSH: "
                      f"{', '.join(sorted(REMOTE_COMMANDS))})")
    app = getattr(ns, "app", None)
    if isinstance(app, str) and app:
        _may(app)
    elif ns.command == "events" and not _whoami().get("admin"):
        raise Refused("name one of your apps: corral events APP")
    runner: Callable[[argparse.Namespace], int] = _main.COMMANDS[ns.command]
    if ns.command == "up":
        runner = _up_from_stdin(home)
    if ns.command == "keys" and getattr(ns, "file", None) not in (None, "-"):
        raise Refused("over SSH a key comes on stdin: corral keys add NAME - < KEY.pub")
    return _main.run_command(ns, runner)


def _up_from_stdin(home: Path) -> Callable[[argparse.Namespace], int]:
    def up(ns: argparse.Namespace) -> int:
        """``corral up - --name APP``: the source's tar on stdin, then the deploy."""
        from corral.cli import _main, _rollout

        if ns.directory != "-" or not ns.name:
            raise Refused("over SSH `up` takes its source on stdin: corral up - --name APP "
                          "(the remote CLI sends it: corral --remote HOST up DIR)")
        _may(ns.name)
        token = secrets.token_hex(16)
        upload = home / "uploads" / f"{token}.tar"
        try:
            _spool(sys.stdin.buffer, upload)
            res = _rollout.run(ns, ns.name, "app.deploy", {
                "upload": token, "name": ns.name, "set": ns.set_, "offset": ns.offset,
                "env": ns.env, "wait_s": ns.wait, "reset_overrides": ns.reset_overrides})
        finally:
            with contextlib.suppress(FileNotFoundError):
                upload.unlink()
        return _main.deployed(ns, res, "up")

    return up


def _spool(source: BinaryIO, dest: Path, limit: int = 64 << 30) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    total = 0
    with open(fd, "wb") as out:
        while chunk := source.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise CorralError("the source sent is too large", code=ErrorCode.TOO_LARGE)
            out.write(chunk)
