"""Opening a ledger: URLs, file and directory modes, SQLite settings, schema versions."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from corral.errors import CorralError, ErrorCode
from corral.ledger import SCHEMA_VERSION, SqliteLedger, open_ledger


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_plain_sqlite_url_means_the_file_under_home(tmp_path: Path) -> None:
    """``sqlite:`` opens <home>/ledger.sqlite3, creating a missing home 0700 and the file 0600."""
    home = tmp_path / "home"
    with open_ledger("sqlite:", home) as ledger:
        assert isinstance(ledger, SqliteLedger)
        assert ledger.path == home / "ledger.sqlite3"
        ledger.put("blog", "port", "8000")  # creates the -wal and -shm files
        assert mode(home) == 0o700
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
            assert mode(home / name) == 0o600, name


def test_absolute_sqlite_url_and_synchronous_option(tmp_path: Path) -> None:
    """``sqlite:///abs/path`` names the file; ``?synchronous=full`` selects FULL."""
    path = tmp_path / "elsewhere" / "l.db"
    with open_ledger(f"sqlite://{path}", tmp_path / "unused") as ledger:
        assert isinstance(ledger, SqliteLedger)
        assert ledger.path == path and ledger.synchronous == "NORMAL"
    assert not (tmp_path / "unused").exists()
    with open_ledger(f"sqlite://{path}?synchronous=full", tmp_path) as ledger:
        assert isinstance(ledger, SqliteLedger) and ledger.synchronous == "FULL"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/x.db", "a host is not allowed"),
        ("sqlite:relative.db", "the path must be absolute"),
        ("sqlite:///x.db?sync=full", "unknown option(s) sync"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be 'normal' or 'full'"),
        ("postgres://db/corral", "unknown scheme"),
        ("", "unknown scheme"),
    ],
)
def test_bad_urls_are_refused_clearly(tmp_path: Path, url: str, message: str) -> None:
    """A URL that names no usable ledger raises INVALID, quoting the URL and the problem."""
    with pytest.raises(CorralError) as info:
        open_ledger(url, tmp_path)
    assert message in str(info.value) and repr(url) in str(info.value)
    assert info.value.code == ErrorCode.INVALID and info.value.retry is False


def test_etcd_urls_name_the_cluster_members(tmp_path: Path) -> None:
    """etcd://h1:2379,h2:2379 (etcds:// for TLS) opens the etcd backend on those members,
    connecting to none yet; writing nothing under the home."""
    from corral.ledger._etcd import EtcdLedger

    led = open_ledger("etcd://10.0.0.1:2379,h2:2380,[fd00::1]:2379,h4", tmp_path)
    assert isinstance(led, EtcdLedger)
    assert led.endpoints == [("10.0.0.1", 2379), ("h2", 2380), ("fd00::1", 2379),
                             ("h4", 2379)]
    assert led.protocol == "http"
    assert open_ledger("etcds://h1:2379", tmp_path).protocol == "https"  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["etcd://h1:notaport", "etcd://h1:2379/path",
                                 "etcd://h1:2379?x=1", "etcd://:2379", "etcd://h1:99999"])
def test_bad_etcd_urls_are_refused(tmp_path: Path, url: str) -> None:
    """A member that is not HOST:PORT, a path or options: a clear error naming the URL."""
    with pytest.raises(CorralError) as info:
        open_ledger(url, tmp_path)
    assert repr(url) in str(info.value) and info.value.code == ErrorCode.INVALID


def test_sqlite_settings(tmp_path: Path) -> None:
    """WAL, the chosen synchronous level, foreign keys and a busy timeout are on."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    conn = ledger._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    ledger.close()
    ledger = SqliteLedger(tmp_path / "l.sqlite3", synchronous="FULL")
    assert ledger._conn is not None
    assert ledger._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    ledger.close()


def test_existing_file_is_tightened_to_0600(tmp_path: Path) -> None:
    """A ledger file readable by others is chmod-ed to 0600 when opened."""
    path = tmp_path / "l.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)
    SqliteLedger(path).close()
    assert mode(path) == 0o600


def test_symlinked_ledger_file_is_refused(tmp_path: Path) -> None:
    """The ledger file itself may not be a symlink (O_NOFOLLOW)."""
    (tmp_path / "real").touch()
    (tmp_path / "l.sqlite3").symlink_to(tmp_path / "real")
    with pytest.raises(CorralError, match=r"cannot create ledger .*l.sqlite3"):
        SqliteLedger(tmp_path / "l.sqlite3")


def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    """The meta table records the schema version; a file from a newer corral is not touched."""
    path = tmp_path / "l.sqlite3"
    SqliteLedger(path).close()
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
        SCHEMA_VERSION,
    )
    raw.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(CorralError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than"):
        SqliteLedger(path)


def test_reopening_does_not_migrate_twice(tmp_path: Path) -> None:
    """Opening an up-to-date file changes nothing in it."""
    path = tmp_path / "l.sqlite3"
    with SqliteLedger(path) as ledger:
        ledger.put("blog", "app", "blog")
    with SqliteLedger(path) as ledger:
        assert ledger.revision() == 1 and ledger.get("app", "blog") is not None


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    """Garbage in place of the ledger gives an error naming the file."""
    path = tmp_path / "l.sqlite3"
    path.write_bytes(b"not a database, just some text" * 100)
    with pytest.raises(CorralError, match=r"cannot open ledger .*l.sqlite3"):
        SqliteLedger(path)
