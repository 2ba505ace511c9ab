"""Sources that arrive over SSH: the upload a key's gateway left, unpacked by the kernel (root)
into a staging directory it removes afterwards, and each app's deploy branch.

The account is this process's own user (``ids`` returns our uid), so no system user is made;
the tests that change an upload's owner need root."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.errors import CorralError, ErrorCode
from corral.remote import Account, Branches, _uploads, unpacked

TOKEN = "0123456789abcdef0123456789abcdef"
MiB = 1 << 20


@dataclass(frozen=True)
class _Me(Account):
    """The SSH account, played by the user running the tests."""

    def ids(self) -> tuple[int, int] | None:
        return os.getuid(), os.getgid()


@dataclass(frozen=True)
class _Nobody(Account):
    """An SSH account that does not exist (yet)."""

    def ids(self) -> tuple[int, int] | None:
        return None


@pytest.fixture
def account(tmp_path: Path) -> Account:
    acct = _Me("corral", tmp_path / "home", Path("/opt/corral-ssh"), "ipc:///b", "ipc:///e")
    acct.uploads.mkdir(parents=True, mode=0o700)
    return acct


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "state" / "uploads"


# ---- tars ------------------------------------------------------------------------------------


def _file(name: str, data: bytes = b"", mode: int = 0o644, **attrs: object) -> tuple[
        tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE,
          mode: int = 0o777) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, mode
    return info, None


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], compression: str = "") -> bytes:
    out = io.BytesIO()
    mode = f"w:{compression}"
    with tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _upload(account: Account, data: bytes, token: str = TOKEN) -> Path:
    path = account.uploads / f"{token}.tar"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _tree(root: Path) -> dict[str, str]:
    """Each path under ``root``: a file's content, a link's target, or "/" for a directory."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "/"
        else:
            out[rel] = p.read_text()
    return out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


GOOD = (
    _dir("src"),
    _file("src/app.py", b"print('hi')\n"),
    _file("run.sh", b"#!/bin/sh\nexec python src/app.py\n", mode=0o755),
    _file("corral.toml", b"[app]\nname = 'shop'\n"),
    _link("app.py", "src/app.py"),
    _link("same.py", "src/app.py", kind=tarfile.LNKTYPE, mode=0o644),
    _file("./dot/slash.txt", b"d"),
)


# ---- a good upload ---------------------------------------------------------------------------


def test_a_good_upload_is_unpacked_into_staging_then_removed(
        account: Account, staging: Path) -> None:
    """Files, directories, a relative symlink and a hard link inside arrive as sent (the
    executable bit kept) in ``staging/<token>/<name>``; after the block the staging
    directory and the upload are gone."""
    upload = _upload(account, _tar(*GOOD))
    with unpacked(account, TOKEN, "shop", staging, 10 * MiB) as dest:
        assert dest == staging / TOKEN / "shop"
        assert _tree(dest) == {
            "src": "/", "src/app.py": "print('hi')\n", "run.sh": "#!/bin/sh\nexec python "
            "src/app.py\n", "corral.toml": "[app]\nname = 'shop'\n", "app.py": "-> src/app.py",
            "same.py": "print('hi')\n", "dot": "/", "dot/slash.txt": "d"}
        assert _mode(dest / "run.sh") == 0o755
        assert _mode(dest / "corral.toml") == 0o644
        assert (dest / "same.py").stat().st_ino == (dest / "src/app.py").stat().st_ino
        assert _mode(staging / TOKEN) == 0o700
        assert all(p.lstat().st_uid == os.getuid() for p in dest.rglob("*"))
    assert not (staging / TOKEN).exists()
    assert not upload.exists()
    assert list(staging.iterdir()) == []


def test_staging_and_upload_go_even_when_the_deploy_fails(account: Account,
                                                          staging: Path) -> None:
    """An exception inside the block still removes staging and the upload."""
    upload = _upload(account, _tar(*GOOD))
    with pytest.raises(RuntimeError, match="deploy failed"), \
            unpacked(account, TOKEN, "shop", staging, 10 * MiB):
        raise RuntimeError("deploy failed")
    assert not (staging / TOKEN).exists() and not upload.exists()


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compressed_upload_is_unpacked_too(account: Account, staging: Path,
                                             compression: str) -> None:
    """``git archive`` sends a plain tar, a remote ``corral up`` may compress: both read."""
    _upload(account, _tar(_file("a.txt", b"compressed"), compression=compression))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        assert _tree(dest) == {"a.txt": "compressed"}


def test_what_a_release_never_ships_is_left_out(account: Account, staging: Path) -> None:
    """``.git`` (anywhere), ``.venv``, ``node_modules``, ``__pycache__`` are silently left
    out: the kernel never runs git in a directory a remote peer wrote."""
    _upload(account, _tar(
        _dir(".git"), _file(".git/config", b"[core]\n\tfsmonitor = touch /tmp/pwned\n"),
        _file(".git/hooks/post-checkout", b"#!/bin/sh\nid\n", mode=0o755),
        _file("./.git/HEAD", b"ref: refs/heads/main\n"),
        _file("sub/.git/config", b"x"), _link(".git", "elsewhere"),
        _file(".venv/bin/python", b"x"), _file("node_modules/x/index.js", b"x"),
        _file("src/__pycache__/a.pyc", b"x"),
        _file(".gitignore", b"*.log\n"), _file("app.py", b"ok"), _file("sub/keep.txt", b"k")))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        assert _tree(dest) == {".gitignore": "*.log\n", "app.py": "ok", "sub": "/",
                               "sub/keep.txt": "k"}
        assert not (dest / ".git" / "config").exists()


def test_set_id_bits_and_group_write_are_dropped(account: Account, staging: Path) -> None:
    """setuid/setgid/sticky and group/other write never reach the disk."""
    _upload(account, _tar(_file("suid", b"x", mode=0o4755), _file("sgid", b"x", mode=0o2755),
                          _file("open", b"x", mode=0o777), _file("sticky", b"x", mode=0o1644),
                          _file("private", b"x", mode=0o400), _dir("d", mode=0o7777)))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        assert {p: _mode(dest / p) for p in ("suid", "sgid", "open", "sticky", "private")} == {
            "suid": 0o755, "sgid": 0o755, "open": 0o755, "sticky": 0o644, "private": 0o600}
        assert _mode(dest / "d") & 0o7022 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_owners_recorded_in_the_tar_are_ignored(account: Account, staging: Path) -> None:
    """Members owned by uid/gid 12345 (or user names) in the tar are the kernel's on disk."""
    _upload(account, _tar(_file("theirs", b"x", uid=12345, gid=12345, uname="daemon",
                                gname="daemon"), _dir("d")))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        st = (dest / "theirs").lstat()
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_an_absolute_member_lands_inside_the_destination(account: Account, staging: Path,
                                                        tmp_path: Path) -> None:
    """A member named ``/…`` is written under the destination (its leading slash dropped),
    never at that absolute path."""
    outside = tmp_path / "abs-target.txt"
    _upload(account, _tar(_file(str(outside), b"absolute")))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        assert _tree(dest)[str(outside).lstrip("/")] == "absolute"
    assert not outside.exists()


# ---- malicious uploads -----------------------------------------------------------------------


def _refused(account: Account, staging: Path, data: bytes, code: ErrorCode = ErrorCode.INVALID,
             max_bytes: int = MiB) -> CorralError:
    upload = _upload(account, data)
    with pytest.raises(CorralError) as exc, unpacked(account, TOKEN, "shop", staging, max_bytes):
        raise AssertionError("the upload was accepted")
    assert exc.value.code == code, exc.value.reason
    assert not (staging / TOKEN).exists()
    assert not upload.exists()
    return exc.value


EVIL = [
    pytest.param((_file("../escape", b"x"),), id="dotdot"),
    pytest.param((_file("../../../escape", b"x"),), id="dotdot-deep"),
    pytest.param((_file("ok/../../escape", b"x"),), id="dotdot-inside"),
    pytest.param((_link("l", "/etc/passwd"),), id="symlink-absolute"),
    pytest.param((_link("l", "../../../../../etc/passwd"),), id="symlink-dotdot"),
    pytest.param((_link("l", ".."),), id="symlink-parent"),
    pytest.param((_dir("d"), _link("d/l", "../../x")), id="symlink-nested-out"),
    pytest.param((_link("h", "/etc/passwd", kind=tarfile.LNKTYPE),), id="hardlink-absolute"),
    pytest.param((_link("h", "../../../../../etc/passwd", kind=tarfile.LNKTYPE),),
                 id="hardlink-dotdot"),
    pytest.param((_link("out", ".."), _file("out/escape", b"x")), id="through-symlink"),
    pytest.param((_file("dev", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3),),
                 id="char-device"),
    pytest.param((_file("disk", b"", type=tarfile.BLKTYPE, devmajor=8, devminor=0),),
                 id="block-device"),
    pytest.param((_file("fifo", b"", type=tarfile.FIFOTYPE),), id="fifo"),
]


@pytest.mark.parametrize("members", EVIL)
def test_malicious_members_refuse_the_upload(account: Account, staging: Path, tmp_path: Path,
                                             members: tuple[tuple[tarfile.TarInfo, bytes | None],
                                                            ...]) -> None:
    """Paths out of the destination, links out of it, devices and FIFOs: INVALID, and
    nothing is written outside staging (nor left in it)."""
    passwd = os.stat("/etc/passwd")
    before = _everything(tmp_path)
    err = _refused(account, staging, _tar(_file("first.txt", b"1"), *members))
    assert "refused" in err.reason
    assert _everything(tmp_path) == before | {"state", "state/uploads"}
    after = os.stat("/etc/passwd")
    assert (after.st_nlink, after.st_mtime_ns, after.st_size) == (
        passwd.st_nlink, passwd.st_mtime_ns, passwd.st_size)


def _realpath_escape(dest: Path, up: int, leaf: str, data: bytes) -> bytes:
    """A tar whose symlinks resolve further than PATH_MAX: os.path.realpath (and so
    tarfile's data filter) stops resolving there and reads the rest as plain names, the
    kernel does not (CVE-2025-4517)."""
    steps = "abcdefghijklmnop"
    comp = "d" * min(247, (3900 - len(str(dest))) // len(steps) - 1)
    members = []
    path = ""
    for s in steps:
        members.append(_dir(os.path.join(path, comp)))
        members.append(_link(os.path.join(path, s), comp))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(_link(linkpath, os.path.join(*[".."] * len(steps))))
    members.append(_link("escape", linkpath + "/.." * up))
    members.append(_file(f"escape/{leaf}", data))
    return _tar(*members)


def test_a_symlink_chain_longer_than_path_max_does_not_escape(
        account: Account, staging: Path, tmp_path: Path) -> None:
    """Symlinks that resolve past PATH_MAX must not let a member out of staging."""
    dest = staging / TOKEN / "shop"
    target = tmp_path / "written-outside.txt"
    up = len(dest.relative_to(tmp_path).parts)  # from dest back up to tmp_path
    upload = _upload(account, _realpath_escape(dest, up, target.name, b"pwned\n"))
    try:
        with unpacked(account, TOKEN, "shop", staging, 64 * MiB):
            pass
    except CorralError as exc:
        assert exc.code == ErrorCode.INVALID
    assert not target.exists(), "a file was written outside staging"
    assert not upload.exists()


def test_a_file_larger_than_the_limit_is_too_large(account: Account, staging: Path) -> None:
    """An upload over max_bytes: TOO_LARGE before anything is unpacked."""
    err = _refused(account, staging, _tar(_file("big", b"x" * 200_000)), ErrorCode.TOO_LARGE,
                   max_bytes=100_000)
    assert "max_upload_mb" in err.reason
    assert not staging.exists()  # refused before the staging directory is made


def test_a_small_archive_unpacking_too_large_is_too_large(account: Account,
                                                          staging: Path) -> None:
    """A compressed upload under the limit whose content is over it: TOO_LARGE, counted
    as members come (before they are written)."""
    data = _tar(_file("a", b"\0" * (2 * MiB)), _file("b", b"\0" * (2 * MiB)),
                compression="gz")
    assert len(data) < 64 * 1024
    _refused(account, staging, data, ErrorCode.TOO_LARGE, max_bytes=3 * MiB)


def test_too_many_members_is_too_large(account: Account, staging: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """More members than MAX_MEMBERS: TOO_LARGE (left-out members do not count)."""
    monkeypatch.setattr(_uploads, "MAX_MEMBERS", 3)
    ok = [_file(f"{i}.txt", b"x") for i in range(3)]
    _upload(account, _tar(*ok, _file(".git/a", b"x"), _file(".git/b", b"x")))
    with unpacked(account, TOKEN, "shop", staging, MiB) as dest:
        assert sorted(_everything(dest)) == ["0.txt", "1.txt", "2.txt"]
    _refused(account, staging, _tar(*ok, _file("3.txt", b"x")), ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("data", [b"", b"not a tar at all\n" * 64, b"\0" * 100],
                         ids=["empty", "text", "short-zeros"])
def test_what_is_not_a_tar_is_invalid(account: Account, staging: Path, data: bytes) -> None:
    """Not a tar: INVALID."""
    assert "not a readable tar" in _refused(account, staging, data).reason


def _two_files() -> bytes:
    data = _tar(_file("a.txt", b"a" * 600), _file("b.txt", b"b" * 6000))
    assert data[1536:1536 + 5] == b"b.txt"  # a.txt: header and 2 data blocks; then b.txt
    return data


def test_a_tar_cut_inside_a_file_is_invalid(account: Account, staging: Path) -> None:
    """A tar cut short inside a member's data: INVALID, and what was unpacked of it is
    removed."""
    _refused(account, staging, _two_files()[:3000])


def test_a_tar_cut_inside_a_header_is_invalid(account: Account, staging: Path) -> None:
    """A tar cut short inside the second member's header is refused too (not deployed
    with its first member only)."""
    _refused(account, staging, _two_files()[:2000])


# ---- the upload file itself ------------------------------------------------------------------


def test_an_upload_that_is_a_symlink_is_not_followed(account: Account, staging: Path,
                                                     tmp_path: Path) -> None:
    """The upload is opened with O_NOFOLLOW: a symlink (to a root file, or to a good tar)
    is refused, and only the link goes, not what it points to."""
    victim = tmp_path / "root-only.tar"
    victim.write_bytes(_tar(*GOOD))
    link = account.uploads / f"{TOKEN}.tar"
    link.symlink_to(victim)
    with pytest.raises(CorralError, match="cannot be opened") as exc, \
            unpacked(account, TOKEN, "shop", staging, MiB):
        raise AssertionError("followed the link")
    assert exc.value.code == ErrorCode.INVALID
    assert victim.exists() and not link.is_symlink()
    assert not (staging / TOKEN).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_an_upload_of_another_owner_is_forbidden(account: Account, staging: Path) -> None:
    """A file the SSH account did not write (another uid): FORBIDDEN."""
    upload = _upload(account, _tar(*GOOD))
    os.chown(upload, 12345, 12345)
    with pytest.raises(CorralError) as exc, unpacked(account, TOKEN, "shop", staging, MiB):
        raise AssertionError("accepted another uid's file")
    assert exc.value.code == ErrorCode.FORBIDDEN
    assert "not a file the SSH account wrote" in exc.value.reason
    assert not (staging / TOKEN).exists() and not upload.exists()


def test_an_upload_with_two_links_is_forbidden(account: Account, staging: Path,
                                               tmp_path: Path) -> None:
    """A hard link to a file elsewhere (two links): FORBIDDEN, and the other name stays."""
    other = tmp_path / "elsewhere.tar"
    other.write_bytes(_tar(*GOOD))
    os.link(other, account.uploads / f"{TOKEN}.tar")
    with pytest.raises(CorralError, match="not a file the SSH account wrote") as exc, \
            unpacked(account, TOKEN, "shop", staging, MiB):
        raise AssertionError("accepted a file with two links")
    assert exc.value.code == ErrorCode.FORBIDDEN
    assert other.read_bytes() == _tar(*GOOD)
    assert not (account.uploads / f"{TOKEN}.tar").exists()


@pytest.mark.parametrize("kind", [
    "directory", "fifo"])
def test_an_upload_that_is_not_a_regular_file_is_forbidden(account: Account, staging: Path,
                                                           kind: str) -> None:
    """A directory or a FIFO under the upload's name: FORBIDDEN (a FIFO does not block)."""
    path = account.uploads / f"{TOKEN}.tar"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(CorralError) as exc, unpacked(account, TOKEN, "shop", staging, MiB):
        raise AssertionError("accepted")
    assert exc.value.code == ErrorCode.FORBIDDEN
    assert not (staging / TOKEN).exists()


def test_a_missing_upload_is_invalid(account: Account, staging: Path) -> None:
    """No such upload: INVALID."""
    with pytest.raises(CorralError, match="cannot be opened") as exc, \
            unpacked(account, TOKEN, "shop", staging, MiB):
        raise AssertionError("accepted")
    assert exc.value.code == ErrorCode.INVALID


def test_no_account_no_upload(tmp_path: Path, staging: Path) -> None:
    """Without the SSH account there are no uploads: INVALID, and nothing is touched."""
    acct = _Nobody("corral", tmp_path / "home", Path("/x"), "ipc:///b", "ipc:///e")
    acct.uploads.mkdir(parents=True)
    upload = _upload(acct, _tar(*GOOD))
    with pytest.raises(CorralError, match="no SSH account") as exc, \
            unpacked(acct, TOKEN, "shop", staging, MiB):
        raise AssertionError("accepted")
    assert exc.value.code == ErrorCode.INVALID
    assert upload.exists() and not staging.exists()


# ---- deploy branches -------------------------------------------------------------------------


def test_the_deploy_branch_is_main_until_set(tmp_path: Path) -> None:
    """No file yet: every app deploys ``main``."""
    branches = Branches(tmp_path / "git-branches.json")
    assert branches.get("shop") == "main" == Branches.DEFAULT
    assert not branches.path.exists()


def test_a_deploy_branch_is_set_per_app_and_kept(tmp_path: Path) -> None:
    """Setting one app's branch leaves the others on main, and survives a restart."""
    path = tmp_path / "git-branches.json"
    Branches(path).set("shop", "release/v2")
    again = Branches(path)
    assert (again.get("shop"), again.get("blog")) == ("release/v2", "main")
    again.set("blog", "prod")
    assert (Branches(path).get("shop"), Branches(path).get("blog")) == ("release/v2", "prod")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["git-branches.json"]


@pytest.mark.parametrize("forget", [None, "main"])
def test_forgetting_a_branch_goes_back_to_main(tmp_path: Path, forget: str | None) -> None:
    """``set(app, None)`` (or back to main) forgets the app's entry; others stay."""
    branches = Branches(tmp_path / "git-branches.json")
    branches.set("shop", "prod")
    branches.set("blog", "prod")
    branches.set("shop", forget)
    assert branches.get("shop") == "main" and branches.get("blog") == "prod"
    assert branches.path.read_text() == '{\n "blog": "prod"\n}'
    branches.set("gone", None)  # forgetting what was never set is fine
    assert branches.get("gone") == "main"
