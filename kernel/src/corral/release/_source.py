"""The source of a release: which files of an app directory go in, copied and fingerprinted.

A release holds a snapshot of the source, never the live directory, so editing the source
after a deploy changes nothing that runs. Which files go in:

- in a git work tree, what git would commit (``git ls-files --cached --others
  --exclude-standard``: tracked and untracked files, ``.gitignore`` honoured), as Heroku's and
  Dokku's ``git push`` do, but with uncommitted changes included, since ``corral up DIR``
  deploys the directory as it is;
- elsewhere, every file below the directory minus the patterns of its ``.gitignore``;
- in both cases minus the patterns of ``.corralignore`` (gitignore syntax), minus ``.git``,
  and minus build outputs the build makes again (``.venv``, ``node_modules``,
  ``__pycache__``): a virtualenv made by hand on a laptop must never be shipped.

The fingerprint (sha256 over each file's relative path, kind, executable bit and content, in
path order) is what tells an unchanged source from a changed one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from corral.errors import CorralError, ErrorCode

IGNORE_FILE = ".corralignore"
NEVER_SHIPPED = (".git", ".venv", "node_modules", "__pycache__")
"""Directory names left out wherever they are: version control and build outputs."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot of an app directory holds."""

    digest: str
    files: int
    size: int
    commit: str | None = None
    dirty: bool = False
    excluded: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """The source as ``corral releases`` shows it: a commit (+ changes) or the file count."""
        if self.commit:
            return f"git {self.commit[:12]}{' (+ uncommitted changes)' if self.dirty else ''}"
        return f"{self.files} files"


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                             check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "surrogateescape")


def _spec(directory: Path, name: str) -> pathspec.GitIgnoreSpec | None:
    path = directory / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorralError(f"{path}: cannot be read: {exc}", code=ErrorCode.INVALID) from exc
    return pathspec.GitIgnoreSpec.from_lines(text.splitlines())


def _never_shipped(rel: str) -> bool:
    return any(part in NEVER_SHIPPED for part in rel.split("/"))


def _inside(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in prefixes)


def listing(directory: Path, exclude: Iterable[Path] = (), *, vcs: bool = True) -> list[str]:
    """The relative paths (files and symlinks) a release of ``directory`` takes, sorted.

    ``exclude``: absolute paths below ``directory`` left out with all they hold (the app's
    writable [paths] inside its own directory: data, never code). ``vcs=False``: git is not
    run in ``directory`` (a source that arrived over SSH: every file it holds goes in, less
    ``.corralignore``'s)."""
    directory = directory.resolve()
    prefixes = tuple(
        str(p.resolve().relative_to(directory)) for p in exclude
        if p.resolve().is_relative_to(directory) and p.resolve() != directory)
    ignore = _spec(directory, IGNORE_FILE)
    inside_git = _git(directory, "rev-parse", "--is-inside-work-tree") if vcs else None
    names: list[str]
    if inside_git is not None and inside_git.strip() == "true":
        out = _git(directory, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                   "--", ".")
        if out is None:
            raise CorralError(f"{directory}: `git ls-files` failed", code=ErrorCode.INVALID)
        names = [n for n in out.split("\0") if n]
    else:
        gitignore = _spec(directory, ".gitignore") if vcs else None
        names = []
        for root, dirs, files in os.walk(directory):
            rel_root = os.path.relpath(root, directory)
            rel_root = "" if rel_root == "." else rel_root + "/"
            dirs[:] = sorted(d for d in dirs if d not in NEVER_SHIPPED and not (
                gitignore is not None and gitignore.match_file(rel_root + d + "/")))
            # a symlink to a directory is shipped as a link, not walked
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in dirs if d not in links]
            for name in [*files, *links]:
                rel = rel_root + name
                if gitignore is None or not gitignore.match_file(rel):
                    names.append(rel)
    kept = []
    for rel in names:
        if _never_shipped(rel) or _inside(rel, prefixes):
            continue
        if ignore is not None and ignore.match_file(rel):
            continue
        kept.append(rel)
    return sorted(set(kept))


def _chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def snapshot(directory: Path, dest: Path | None = None, *,
             exclude: Iterable[Path] = (), vcs: bool = True,
             commit: str | None = None) -> Snapshot:
    """Fingerprint the release files of ``directory`` and, when ``dest`` is given (a new,
    empty or absent directory), copy them there (regular files, their executable bit, and
    symlinks as links; other kinds are skipped). Raises CorralError naming a file that
    cannot be read. ``vcs=False``: git is not run in ``directory`` (see ``listing``);
    ``commit`` is then the commit its files came from, if any (a push)."""
    directory = directory.resolve()
    names = listing(directory, exclude, vcs=vcs)
    digest = hashlib.sha256()
    size = 0
    count = 0
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
    for rel in names:
        src = os.path.join(directory, rel)
        try:
            st = os.lstat(src)
        except FileNotFoundError:  # tracked by git but deleted: not part of the source
            continue
        target = os.path.join(dest, rel) if dest is not None else None
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(src)
            digest.update(f"L\0{rel}\0{link}\0".encode("utf-8", "surrogateescape"))
            if target is not None:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(link, target)
        elif stat.S_ISREG(st.st_mode):
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            digest.update(f"F\0{rel}\0{mode:o}\0{st.st_size}\0".encode("utf-8",
                                                                          "surrogateescape"))
            try:
                if target is None:
                    for chunk in _chunks(src):
                        digest.update(chunk)
                else:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as out:
                        for chunk in _chunks(src):
                            digest.update(chunk)
                            out.write(chunk)
                    os.chmod(target, mode)
            except OSError as exc:
                raise CorralError(f"{src}: cannot be read for the release: {exc.strerror}",
                                  code=ErrorCode.INVALID) from exc
            size += st.st_size
        else:
            continue
        count += 1
    dirty = False
    head = _git(directory, "rev-parse", "--verify", "-q", "HEAD") if vcs else None
    if head:
        commit = head.strip()
        status = _git(directory, "status", "--porcelain", "--untracked-files=no", "--", ".")
        dirty = bool(status and status.strip())
    return Snapshot(digest.hexdigest(), count, size, commit, dirty)


def remove_tree(path: Path) -> None:
    """Remove a release directory (never following links out of it)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
