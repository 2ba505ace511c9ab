"""Sources that arrive over SSH: a tar the gateway left, unpacked by the kernel for a deploy.

The gateway (the unprivileged SSH account) writes what a push or a remote ``corral up`` sent
to ``<account home>/uploads/<token>.tar`` and names the token in ``app.deploy``. The kernel,
as root, never trusts that file's name or content:

- it is opened without following a link (``O_NOFOLLOW``) from a directory only root and the
  account can write in, and must be a regular file of the account's with one link (so no
  file of anyone else's can be passed off as an upload), no larger than ``[ssh]
  max_upload_mb``;
- it is unpacked with tarfile's ``data`` filter (no absolute paths, no ``..``, no links out,
  no devices, no set-id bits, owned by root) into a root-only staging directory, leaving out
  ``.git`` (the kernel never runs git in a directory a remote peer wrote) and what a release
  never ships;
- the staging directory and the upload are removed whatever the deploy's outcome.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.errors import CorralError, ErrorCode
from corral.release import NEVER_SHIPPED
from corral.remote._keys import Account

MAX_MEMBERS = 200_000


@contextmanager
def unpacked(account: Account, token: str, name: str, staging_root: Path,
             max_bytes: int) -> Iterator[Path]:
    """The upload ``token`` unpacked into ``staging_root/<token>/<name>`` (removed after)."""
    ids = account.ids()
    if ids is None:
        raise CorralError("no SSH account exists on this host", code=ErrorCode.INVALID)
    path = account.uploads / f"{token}.tar"
    staging = staging_root / token
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise CorralError(f"upload {token}: cannot be opened: {exc.strerror}",
                              code=ErrorCode.INVALID) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != ids[0] or st.st_nlink != 1:
            os.close(fd)
            raise CorralError(f"upload {token}: not a file the SSH account wrote",
                              code=ErrorCode.FORBIDDEN)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > max_bytes:
                raise CorralError(f"the source sent is {st.st_size >> 20} MiB; the host takes "
                                  f"{max_bytes >> 20} MiB at most ([ssh] max_upload_mb)",
                                  code=ErrorCode.TOO_LARGE)
            staging_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging.mkdir(mode=0o700)
            dest = staging / name
            dest.mkdir(mode=0o755)
            _extract(f, dest, max_bytes)
        yield dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.unlink(path)
        except OSError:
            pass


def _extract(f: object, dest: Path, max_bytes: int) -> None:
    """Unpack the tar ``f`` into ``dest``: tarfile's ``data`` filter, and before it our own
    rules, which hold whatever the Python's filter gets wrong (the PATH_MAX symlink-chain
    escape of CVE-2025-4517 and its kin, in CPython before 3.11.13): a symlink must point
    inside the tree by plain path arithmetic (relative, never above the top), no member may
    lie below a symlink of the archive, and a hard link may only name a file sent before it.
    So no path written ever goes through a link, and no link leads out. A tar that does not
    end (cut short) is refused."""
    total = 0
    count = 0
    links: set[str] = set()
    files: set[str] = set()

    def refuse(member: tarfile.TarInfo, why: str) -> CorralError:
        return CorralError(f"the source sent was refused: {member.name[:200]!r} {why}",
                           code=ErrorCode.INVALID)

    def keep(member: tarfile.TarInfo, where: str) -> tarfile.TarInfo | None:
        nonlocal total, count
        name = posixpath.normpath(member.name.lstrip("/"))
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if any(p in NEVER_SHIPPED for p in parts):
            return None
        if not parts or parts[0] == "..":
            raise refuse(member, "is outside the tree")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise refuse(member, "lies below a symbolic link")
        if member.islnk():  # a second name of a file already unpacked, and nothing else
            target = posixpath.normpath(member.linkname)
            if target not in files:
                raise refuse(member, f"is a hard link to {member.linkname[:200]!r}, not to a "
                             "file sent before it")
        if member.isreg():
            files.add("/".join(parts))
        if member.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                       member.linkname))
            if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise refuse(member, f"links out of the tree ({member.linkname[:200]!r})")
            links.add("/".join(parts))
        count += 1
        total += max(member.size, 0)
        if count > MAX_MEMBERS or total > max_bytes:
            raise CorralError(f"the source sent holds more than {MAX_MEMBERS} files or "
                              f"{max_bytes >> 20} MiB", code=ErrorCode.TOO_LARGE)
        return tarfile.data_filter(member, where)

    try:
        # not a stream: a tar cut short in a header is an error, not an early end
        with tarfile.open(fileobj=f, mode="r:*") as tar:  # type: ignore[call-overload]
            tar.extractall(dest, filter=keep)  # noqa: S202 - the data filter, and ours
            # tarfile takes a header cut short for the end of the archive: the real end is
            # two zero blocks, which git archive and tarfile both write
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise CorralError("the source sent was cut short (its tar does not end); "
                                  "send it again", code=ErrorCode.INVALID)
    except tarfile.FilterError as exc:
        raise CorralError(f"the source sent was refused: {exc}",
                          code=ErrorCode.INVALID) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorralError(f"the source sent is not a readable tar: {exc}",
                          code=ErrorCode.INVALID) from None


class Branches:
    """Each app's deploy branch (``<home>/git-branches.json``; ``main`` unless set)."""

    DEFAULT = "main"

    def __init__(self, path: Path) -> None:
        self.path = path

    def _all(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def get(self, app: str) -> str:
        """The branch whose pushes deploy ``app``."""
        return self._all().get(app, self.DEFAULT)

    def set(self, app: str, branch: str | None) -> None:
        """Set (or, with None, forget) ``app``'s deploy branch."""
        data = self._all()
        if branch is None or branch == self.DEFAULT:
            data.pop(app, None)
        else:
            data[app] = branch
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
