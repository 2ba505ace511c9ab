"""``corral init [DIR]``: write the corral.toml that a directory's Procfile and the defaults mean.

A directory with a Procfile and no corral.toml deploys with defaults (``corral.manifest``);
``init`` writes those defaults down, with commented examples of the other sections, so that
loading the directory afterwards gives the same resolved manifest as before.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from corral.errors import ManifestError
from corral.manifest import ResolvedManifest, load
from corral.manifest._load import DEFAULT_WEB_PORT, MANIFEST_FILE, PROCFILE, PROCFILE_WEB_PORT
from corral.manifest._model import AppName

EXIT_INPUT = 2


def cmd_init(ns: argparse.Namespace) -> int:
    """Write DIR/corral.toml: the app's name, ports and release phase as corral assumes them
    from the Procfile, and commented examples of the other sections."""
    directory = Path(ns.directory).resolve()
    target = directory / MANIFEST_FILE
    if os.path.lexists(target):
        return _refuse(f"{target} already exists; edit it (docs/manifest.md) or remove it first")
    if not os.path.isfile(directory / PROCFILE):
        return _refuse(
            f"no {PROCFILE} in {directory}: write one first, one `name: command` per line "
            '(e.g. "web: python app.py"), or write corral.toml yourself (docs/manifest.md)'
        )
    set_: list[str] = []
    if ns.name is not None:
        try:
            TypeAdapter(AppName).validate_python(ns.name)
        except ValidationError as exc:
            return _refuse(f"--name: {exc.errors()[0]['msg']}")
        set_.append(f'app.name="{ns.name}"')  # a valid name holds no quote
    try:
        resolved = load(directory, set_=set_)
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"corral: {problem}", file=sys.stderr)
        return EXIT_INPUT
    text = manifest_text(resolved)
    try:
        _write_new(target, text)
    except FileExistsError:
        return _refuse(f"{target} appeared while init ran; left it as it is")
    print(f"corral init: wrote {target}:\n")
    print(text, end="")
    return 0


def _refuse(message: str) -> int:
    print(f"corral init: {message}", file=sys.stderr)
    return EXIT_INPUT


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string, control characters escaped (so it may also stand in
    a comment)."""
    escaped = (
        f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else "\\" + c if c in '"\\' else c
        for c in value
    )
    return '"' + "".join(escaped) + '"'


def manifest_text(resolved: ResolvedManifest) -> str:
    """The corral.toml that means ``resolved``, the manifest of a directory with only a
    Procfile: its name and ports, with the processes and release command left to the Procfile
    (a process or release command defined in both files is an error)."""
    manifest = resolved.manifest
    out = [
        "# What corral assumed while this app had only a Procfile, written by `corral init`.",
        "# Every section and key: docs/manifest.md.",
        "",
        "[app]",
        f"name = {_toml_string(manifest.app.name)}",
        "",
    ]
    if manifest.processes:
        out += [
            f"# The processes come from the {PROCFILE}; a process defined both there and here is",
            "# an error. To give one more settings (instances, ready, stop_grace), move its line",
            "# here as a table and remove it from the Procfile, e.g.",
        ]
        for name, process in manifest.processes.items():
            out += [f"#   [processes.{name}]", f"#   command = {_toml_string(process.command)}"]
            if process.port is not None:
                out.append(f"#   port = {_toml_string(process.port)}")
        out.append("")
    if manifest.ports:
        out += [
            "[ports]",
            f"# {DEFAULT_WEB_PORT} is foreman's and `heroku local`'s $PORT. Two apps on one host",
            "# cannot both have it: give this one a port of its own here (or deploy with",
            f"# --set ports.{PROCFILE_WEB_PORT}=N, or --offset N).",
        ]
        out += [f"{name} = {port}" for name, port in manifest.ports.items()]
        out.append("")
    else:
        out += [
            "# [ports]",
            f'# {PROCFILE_WEB_PORT} = {DEFAULT_WEB_PORT}    # a process gets it as $PORT with '
            f'port = "{PROCFILE_WEB_PORT}"',
            "",
        ]
    out += [
        "# Host paths the app may see besides a read-only system ($CORRAL_PATH_<NAME>):",
        "# [paths]",
        '# data = { path = "data", mode = "rw", create = true }',
        "",
        "# Resource limits (the host's defaults when unset):",
        "# [limits]",
        '# memory = "512MiB"',
        "# processes = 64",
        "",
        "# The build runs this instead of what the files call for (uv.lock or pyproject.toml,",
        "# requirements.txt, package.json):",
        "# [build]",
        '# command = "make"',
        '# timeout = "15m"',
        "",
    ]
    release = manifest.release.command
    if release is not None:
        out += [
            f"# The release command comes from the {PROCFILE}'s release: line; it runs once per",
            "# release, before new instances take traffic. Defining it here too is an error.",
            "# [release]",
            '# timeout = "10m"',
        ]
    else:
        out += [
            "# Run once per release, before new instances take traffic (database migrations):",
            "# [release]",
            '# command = "python manage.py migrate"',
            '# timeout = "10m"',
        ]
    return "\n".join(out) + "\n"


def _write_new(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically (a temporary file, then a link or rename);
    FileExistsError when ``target`` exists by then."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        try:
            os.link(temporary, target)  # unlike a rename, never replaces a file made meanwhile
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            os.replace(temporary, target)  # a file system without hard links
    finally:
        Path(temporary).unlink(missing_ok=True)


def add_parsers(sub: Any) -> None:
    """Register ``corral init``."""
    p = sub.add_parser("init", help=cmd_init.__doc__)
    p.add_argument("directory", nargs="?", default=".",
                   help="the app directory, with a Procfile and no corral.toml")
    p.add_argument("--name", default=None,
                   help="the app's name (default: the directory's name made into a DNS label)")
