"""The laptop's side of the remote CLI: ``corral --remote TARGET COMMAND ...`` over SSH.

A target is ``corral@HOST``, ``ssh://corral@HOST:PORT`` or the name of a remote saved with
``corral remote add NAME TARGET`` (``$XDG_CONFIG_HOME/corral/remotes.json``); ``CORRAL_REMOTE``
gives a default. The command is checked by the local parser first (a typo fails here), then
sent as one quoted line to the host's SSH account, whose forced command (``corral-ssh``)
parses it again and runs it as the key. The system ``ssh`` client is used, so ~/.ssh/config
applies; ``CORRAL_SSH_COMMAND`` replaces it (as ``GIT_SSH_COMMAND`` does for git).

``up DIR`` sends DIR's release files (what ``corral up`` would take on the host: git's files
in a work tree, .gitignore and .corralignore honoured) as a tar on stdin; ``keys add NAME
FILE`` sends the key file on stdin; ``run`` asks for a terminal when it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import IO, Any

from corral.cli._output import table

EXIT_INPUT = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TARGET = re.compile(r"^(ssh://)?[A-Za-z0-9_.-]+@[A-Za-z0-9_.:\[\]-]+$")
REMOTE_COMMANDS = frozenset({
    "ps", "logs", "errors", "top", "config", "releases", "rollback", "restart", "scale",
    "run", "cron", "up", "down", "events", "certs", "keys", "branch", "drivers", "ledger",
    "hosts",
})
"""The commands that work over SSH (the host's gateway accepts these only; the kernel then
checks the key's scope). The others (daemon, dev, init, check, host...) are local."""


def remotes_file() -> Path:
    """Where named remotes are kept."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "remotes.json"


def _remotes() -> dict[str, str]:
    try:
        data = json.loads(remotes_file().read_text())
    except FileNotFoundError:
        return {}
    return {str(k): str(v) for k, v in data.items()}


def resolve(name: str) -> str:
    """The SSH target of ``name`` (a saved remote, or a target itself)."""
    saved = _remotes().get(name)
    if saved:
        return saved
    if _TARGET.match(name):
        return name
    raise SystemExit(f"corral: --remote {name!r}: not a saved remote (corral remote ls) nor "
                     "a target such as corral@HOST or ssh://corral@HOST:PORT")


def split_remote(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--remote X`` (or ``--remote=X``) from the front of ``argv``; else
    ``CORRAL_REMOTE``. Returns (target or None, the rest)."""
    if argv and argv[0] == "--remote" and len(argv) > 1:
        return resolve(argv[1]), argv[2:]
    if argv and argv[0].startswith("--remote="):
        return resolve(argv[0].partition("=")[2]), argv[1:]
    env = os.environ.get("CORRAL_REMOTE")
    if env and argv and argv[0] not in ("remote", "daemon", "dev", "init", "host", "check",
                                        "schema", "completion", "--help", "-h", "--version"):
        return resolve(env), argv
    return None, argv


def ssh_command() -> list[str]:
    """The ssh client: ``CORRAL_SSH_COMMAND`` (split as a shell would) or ``ssh``."""
    custom = os.environ.get("CORRAL_SSH_COMMAND")
    return shlex.split(custom) if custom else ["ssh"]


def forward(target: str, argv: list[str], ns: argparse.Namespace) -> int:
    """Run the parsed command ``ns`` (from ``argv``) on ``target``; its exit status."""
    if ns.command not in REMOTE_COMMANDS:
        print(f"corral {ns.command}: runs on the host only, not with --remote",
              file=sys.stderr)
        return EXIT_INPUT
    stdin: IO[bytes] | int | None = subprocess.DEVNULL
    feed: Any = None
    tty = False
    if ns.command == "up":
        argv, feed = _up(ns)
        stdin = subprocess.PIPE
    elif ns.command == "keys" and getattr(ns, "keys_command", None) == "add":
        key = sys.stdin.read() if ns.file == "-" else Path(ns.file).expanduser().read_text()
        argv = ["keys", "add", ns.name, "-", *(f"--app={a}" for a in ns.apps or []),
                *(["--admin"] if ns.admin else []), *(["--json"] if ns.json else [])]
        feed = key.encode()
        stdin = subprocess.PIPE
    elif ns.command == "config" and getattr(ns, "secret", False):
        feed = _secret_values(list(ns.words))
        stdin = subprocess.PIPE
    elif ns.command == "run":
        stdin = None  # the command's input is ours
        tty = os.isatty(0) and os.isatty(1)
    remote = shlex.join(["corral", *argv])
    cmd = [*ssh_command(), "-t" if tty else "-T", "-o", "BatchMode=yes", "--", target, remote]
    proc = subprocess.Popen(cmd, stdin=stdin)
    if feed is not None:
        assert proc.stdin is not None
        writer = threading.Thread(target=_feed, args=(feed, proc.stdin), daemon=True)
        writer.start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return 130


def _feed(feed: Any, pipe: IO[bytes]) -> None:
    try:
        if isinstance(feed, bytes):
            pipe.write(feed)
        else:
            feed(pipe)
    except BrokenPipeError:
        pass
    finally:
        try:
            pipe.close()
        except BrokenPipeError:
            pass


def _secret_values(words: list[str]) -> bytes:
    """``config set APP KEY --secret``: each value read here (from the terminal, not echoed,
    or a line of stdin), sent as a line on the connection, in order: never on a command line."""
    import getpass

    items = words[2:] if words[:1] == ["set"] else []
    lines = []
    for item in items:
        if "=" not in item:
            lines.append(getpass.getpass(f"{item}: ") if sys.stdin.isatty()
                         else sys.stdin.readline().rstrip("\n"))
    return "".join(f"{line}\n" for line in lines).encode()


def _up(ns: argparse.Namespace) -> tuple[list[str], Any]:
    """``up DIR``: the remote argv (``up - --name APP`` and the flags) and the tar writer."""
    from corral import manifest
    from corral.release import listing

    directory = Path(ns.directory).resolve()
    draft = manifest.read(directory, set_=ns.set_, offset=ns.offset, env=ns.env)
    draft.problems.raise_if_any()
    exclude = [Path(str(p.get("path"))) for p in
               ((draft.document.get("paths") or {}).values()) if isinstance(p, dict)
               and p.get("mode") == "rw" and p.get("path")]
    exclude = [p if p.is_absolute() else directory / p for p in exclude]
    names = listing(directory, exclude)
    argv = ["up", "-", "--name", str(draft.app)]
    for item in ns.set_:
        argv += ["--set", item]
    for item in ns.env:
        argv += ["--env", item]
    if ns.offset:
        argv += ["--offset", str(ns.offset)]
    if ns.wait is not None:
        argv += ["--wait", str(ns.wait)]
    argv += [flag for flag, on in (("--json", ns.json), ("--quiet", ns.quiet),
                                   ("--reset-overrides", ns.reset_overrides)) if on]

    def write(pipe: IO[bytes]) -> None:
        with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                path = directory / rel
                if path.is_symlink() or path.is_file():
                    tar.add(str(path), arcname=rel, recursive=False)

    return argv, write


def cmd_remote(ns: argparse.Namespace) -> int:
    """Saved remotes: add NAME TARGET, ls, rm NAME (then: corral --remote NAME ps)."""
    remotes = _remotes()
    if ns.remote_command in ("add", "rm"):
        if not _NAME.match(ns.name):
            print(f"corral remote: {ns.name!r}: a name is letters, digits, '_', '.', '-'",
                  file=sys.stderr)
            return EXIT_INPUT
        if ns.remote_command == "add":
            if not _TARGET.match(ns.target):
                print(f"corral remote add: {ns.target!r}: expected USER@HOST or "
                      "ssh://USER@HOST:PORT", file=sys.stderr)
                return EXIT_INPUT
            remotes[ns.name] = ns.target
        elif remotes.pop(ns.name, None) is None:
            print(f"corral remote rm: no remote named {ns.name!r}", file=sys.stderr)
            return 1
        path = remotes_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(remotes, indent=1, sort_keys=True) + "\n")
        return 0
    if getattr(ns, "json", False):
        print(json.dumps(remotes, indent=2, sort_keys=True))
    else:
        table([[k, v] for k, v in sorted(remotes.items())], ["NAME", "TARGET"])
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``remote``."""
    s = sub.add_parser("remote", help=cmd_remote.__doc__)
    r = s.add_subparsers(dest="remote_command", metavar="ACTION")
    a = r.add_parser("add", help="save a target under a name")
    a.add_argument("name")
    a.add_argument("target", help="corral@HOST or ssh://corral@HOST:PORT")
    x = r.add_parser("rm", help="forget a saved remote")
    x.add_argument("name")
    r.add_parser("ls", help="the saved remotes").add_argument("--json", action="store_true")
