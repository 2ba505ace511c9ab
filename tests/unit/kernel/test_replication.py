"""``corral.replication``: the sealed channel between hosts and the copies of releases.

Real sockets on loopback, real AES-GCM, a real SQLite ledger standing for the shared etcd one
(the records are what a ``HostView`` writes: owners ``releases:<app>@<host>``); the etcd
harness runs the same code between network namespaces (tests/e2e/test_failover.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.ledger import SqliteLedger, Txn
from corral.replication import (
    Channel,
    ChannelError,
    ReleaseSource,
    ReplicaServer,
    Replicator,
    fetch_release,
    load_cluster_key,
    new_cluster_key,
    read_frame,
)

KEY = bytes(range(32))
REF = "0123456789abcdef0123456789abcdef"


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "cluster.key"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_cluster_key_file_is_checked(tmp_path: Path) -> None:
    text = new_cluster_key()
    assert len(base64.b64decode(text)) == 32 and text.endswith("\n")
    assert load_cluster_key(key_file(tmp_path, text)) == base64.b64decode(text)
    with pytest.raises(CorralError, match=r"cluster\.key: the cluster key must be owned .* "
                                          r"mode 0644\); chmod 600 it"):
        load_cluster_key(key_file(tmp_path, text, 0o644))
    with pytest.raises(CorralError, match=r"cluster\.key: not a cluster key"):
        load_cluster_key(key_file(tmp_path, base64.b64encode(b"short").decode()))
    with pytest.raises(CorralError, match=r"cluster\.key: not a cluster key"):
        load_cluster_key(key_file(tmp_path, "not base64 at all!"))
    with pytest.raises(CorralError, match=r"nope: the cluster key cannot be read"):
        load_cluster_key(tmp_path / "nope")


def test_requests_open_only_under_the_same_key_and_unaltered() -> None:
    ours, theirs = Channel(KEY), Channel(bytes(32))
    frame = ours.seal_request({"op": "release", "n": 1})
    sealed = frame[4:]
    assert ours.open_request(sealed) == {"op": "release", "n": 1}
    assert b"release" not in sealed  # nothing in clear
    with pytest.raises(ChannelError, match="not sealed with this cluster's key"):
        theirs.open_request(sealed)
    for i in (0, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(ChannelError):
            ours.open_request(bytes(bad))
    # an answer frame is not a request, nor the reverse (keys per direction)
    with pytest.raises(ChannelError):
        ours.open_request(ours.seal_answer("a" * 32, 0, b"{}", last=True)[4:])


def test_sealed_records_open_only_under_the_key_as_the_same_record() -> None:
    """A ``certificate`` record's value (a private key) is kept in the shared ledger sealed:
    no byte of the secret in what is stored, opened only under the same cluster key and as
    the same kind and key (a sealed value copied to another record does not open)."""
    channel = Channel(KEY)
    value = {"domains": ["shop.test"], "key": "-----BEGIN PRIVATE KEY-----\nsecret\n"}
    stored = channel.seal_record("certificate", "shop", value)
    assert set(stored) == {"sealed"} and "PRIVATE" not in json.dumps(stored)
    assert "secret" not in base64.b64decode(stored["sealed"]).decode("latin-1")
    assert channel.open_record("certificate", "shop", stored) == value
    assert channel.seal_record("certificate", "shop", value) != stored  # a fresh nonce
    with pytest.raises(ChannelError, match="certificate/blog is not sealed with this "):
        channel.open_record("certificate", "blog", stored)  # moved to another key
    with pytest.raises(ChannelError):
        channel.open_record("backend", "shop", stored)  # ... or kind
    with pytest.raises(ChannelError):
        Channel(bytes(32)).open_record("certificate", "shop", stored)  # another cluster
    raw = bytearray(base64.b64decode(stored["sealed"]))
    raw[-1] ^= 1
    with pytest.raises(ChannelError):
        channel.open_record("certificate", "shop", {"sealed": base64.b64encode(raw).decode()})
    for bad in ({}, {"sealed": "not base64!"}, value):
        with pytest.raises(ChannelError):
            channel.open_record("certificate", "shop", bad)


def test_answer_frames_are_bound_to_request_index_and_end() -> None:
    ch = Channel(KEY)
    ident = "ab" * 16
    frame = ch.seal_answer(ident, 3, b"data", last=False)[4:]
    assert ch.open_answer(ident, 3, frame) == (b"data", False)
    last = ch.seal_answer(ident, 4, b"", last=True)[4:]
    assert ch.open_answer(ident, 4, last) == (b"", True)
    with pytest.raises(ChannelError, match="frame 4 does not open"):
        ch.open_answer(ident, 4, frame)  # reordered
    with pytest.raises(ChannelError):
        ch.open_answer("cd" * 16, 3, frame)  # another request's answer


# -- a host serving its releases -----------------------------------------------------------------

@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def release_on(ledger: SqliteLedger, home: Path, host: str, app: str = "shop",
               number: int = 1, *, secret: str | None = "s3cret-value") -> Path:
    """A built release of ``app`` held by ``host`` (its files and a secret under ``home``)."""
    files = home / "apps" / app / "releases" / f"v{number}"
    (files / "bin").mkdir(parents=True)
    (files / "app.py").write_text("print('hello')\n")
    (files / "bin" / "run").write_text("#!/bin/sh\nexec python3 app.py\n")
    (files / "bin" / "run").chmod(0o755)
    os.symlink("/usr/bin/python3", files / "bin" / "python")
    config: dict[str, dict[str, str]] = {"vars": {"A": "1"}, "secrets": {}}
    if secret is not None:
        store = home / "secrets" / app
        store.mkdir(parents=True, mode=0o700)
        (store / REF).write_text(secret)
        config["secrets"] = {"TOKEN": REF}
    ledger.put(f"releases:{app}@{host}", "release", f"{app}/v{number}",
               {"number": number, "status": "built", "files": f"v{number}",
                "config": config})
    return files


def alive(ledger: SqliteLedger, host: str, address: str = "127.0.0.1") -> None:
    txn = Txn().claim(f"host:{host}", "host", host, {"address": address})
    txn.claim(f"host:{host}", "host-alive", host, {"pid": 1})
    ledger.commit(txn)


@pytest.fixture
def server(tmp_path: Path, shared: SqliteLedger) -> Iterator[ReplicaServer]:
    home = tmp_path / "h1"
    srv = ReplicaServer(("127.0.0.1", 0), Channel(KEY), ReleaseSource(shared, home, "h1"))
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_release_is_copied_whole_sealed_and_with_its_secrets(
        tmp_path: Path, shared: SqliteLedger, server: ReplicaServer) -> None:
    release_on(shared, tmp_path / "h1", "h1")
    into = tmp_path / "h2" / "replicas" / "shop"
    into.mkdir(parents=True)
    got = fetch_release(Channel(KEY), server.server_address[:2], this="h2", to="h1",
                        app="shop", number=1, with_files=True, into=into)
    assert got.files == "v1" and got.secrets == {REF: "s3cret-value"}
    assert got.directory is not None
    assert (got.directory / "app.py").read_text() == "print('hello')\n"
    assert os.readlink(got.directory / "bin" / "python") == "/usr/bin/python3"
    for p in [got.directory, *got.directory.rglob("*")]:
        st = os.lstat(p)
        assert st.st_uid == 0, p  # sealed: root's, nothing writable by others
        assert stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o022, p
    assert stat.S_IMODE(os.stat(got.directory / "bin" / "run").st_mode) == 0o755
    # secrets only
    got = fetch_release(Channel(KEY), server.server_address[:2], this="h2", to="h1",
                        app="shop", number=1, with_files=False, into=into)
    assert got.directory is None and got.secrets == {REF: "s3cret-value"}


def test_requests_from_outside_the_cluster_or_misaddressed_get_nothing(
        tmp_path: Path, shared: SqliteLedger, server: ReplicaServer) -> None:
    release_on(shared, tmp_path / "h1", "h1")
    into = tmp_path / "in"
    into.mkdir()
    address = server.server_address[:2]
    with pytest.raises(ChannelError, match="connection ended"):  # another cluster's key
        fetch_release(Channel(bytes(32)), address, this="h2", to="h1", app="shop",
                      number=1, with_files=True, into=into)
    with pytest.raises(ChannelError, match="connection ended"):  # addressed to h3
        fetch_release(Channel(KEY), address, this="h2", to="h3", app="shop", number=1,
                      with_files=True, into=into)
    with pytest.raises(CorralError, match="holds no release v2 of 'shop'"):
        fetch_release(Channel(KEY), address, this="h2", to="h1", app="shop", number=2,
                      with_files=True, into=into)
    # garbage and an oversized frame are dropped before anything is decoded
    for junk in (b"\x00\x00\x00\x40" + os.urandom(64), b"\x7f\xff\xff\xff"):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(junk)
            assert sock.recv(10) == b""
    assert list(into.iterdir()) == []


def test_a_replayed_or_stale_request_is_refused(server: ReplicaServer) -> None:
    base = {"v": 1, "op": "release", "from": "h2", "to": "h1", "app": "shop", "number": 1}
    ident = "ef" * 16
    assert server.admit({**base, "at": time.time(), "id": ident}) == ident
    with pytest.raises(ChannelError, match="replayed"):
        server.admit({**base, "at": time.time(), "id": ident})
    with pytest.raises(ChannelError, match="too old"):
        server.admit({**base, "at": time.time() - 3600, "id": "01" * 16})
    for bad in ({"app": "../etc"}, {"app": ".x"}, {"number": 0}, {"number": "1"},
                {"op": "shell"}, {"v": 2}):
        with pytest.raises(ChannelError):
            server.admit({**base, "at": time.time(), "id": os.urandom(16).hex(), **bad})


class _Rogue(threading.Thread):
    """A sender holding the key that answers with ``frames(ident)``: a host gone wrong."""

    def __init__(self, frames: object) -> None:
        super().__init__(daemon=True)
        self.frames = frames
        self.sock = socket.create_server(("127.0.0.1", 0))

    def run(self) -> None:
        ch = Channel(KEY)
        conn, _ = self.sock.accept()
        with conn:
            request = ch.open_request(read_frame(conn, 4096))
            for frame in self.frames(ch, request["id"]):  # type: ignore[operator]
                conn.sendall(frame)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


@pytest.mark.parametrize("case", ["escape", "absolute", "device", "truncated", "link-out"])
def test_a_bad_stream_leaves_nothing(tmp_path: Path, case: str) -> None:
    header = json.dumps({"ok": True, "files": "v1", "secrets": {}}).encode()
    if case == "escape":
        info = tarfile.TarInfo("../../escaped")
        info.size = 2
        body = _tar([(info, b"hi")])
    elif case == "absolute":
        info = tarfile.TarInfo("/tmp/corral-abs-test")
        info.size = 2
        body = _tar([(info, b"hi")])
    elif case == "device":
        info = tarfile.TarInfo("dev")
        info.type = tarfile.CHRTYPE
        body = _tar([(info, b"")])
    elif case == "link-out":
        link = tarfile.TarInfo("etc")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        info = tarfile.TarInfo("etc/corral-written")
        info.size = 2
        body = _tar([(link, b""), (info, b"hi")])
    else:
        info = tarfile.TarInfo("big")
        info.size = 4096
        body = _tar([(info, b"x" * 4096)])[:2048]

    def frames(ch: Channel, ident: str) -> list[bytes]:
        out = [ch.seal_answer(ident, 0, header, last=False),
               ch.seal_answer(ident, 1, body, last=False)]
        if case != "truncated":
            out.append(ch.seal_answer(ident, 2, b"", last=True))
        return out

    rogue = _Rogue(frames)
    rogue.start()
    into = tmp_path / "in"
    into.mkdir()
    with pytest.raises((ChannelError, tarfile.TarError, OSError)):
        fetch_release(Channel(KEY), rogue.sock.getsockname()[:2], this="h2", to="h1",
                      app="shop", number=1, with_files=True, into=into)
    rogue.join(5)
    assert list(into.iterdir()) == []  # the staging directory went too
    assert not Path("/etc/corral-written").exists()
    assert not Path("/tmp/corral-abs-test").exists()


def test_replicator_copies_what_other_live_hosts_hold_and_drops_what_is_gone(
        tmp_path: Path, shared: SqliteLedger, server: ReplicaServer) -> None:
    port = server.server_address[1]
    release_on(shared, tmp_path / "h1", "h1")
    release_on(shared, tmp_path / "h1", "h1", "blog", secret=None)
    home2 = tmp_path / "h2"
    rep = Replicator(shared, home2, "h2", Channel(KEY), port)
    assert rep.sync() == 0  # h1 is not alive: nothing to copy from
    alive(shared, "h1")
    alive(shared, "h2")
    release_on(shared, home2, "h2", "own")  # this host's own: never copied
    assert rep.sync() == 2
    assert (home2 / "replicas" / "shop" / "v1" / "app.py").is_file()
    assert (home2 / "replicas" / "blog" / "v1" / "app.py").is_file()
    secret = home2 / "secrets" / "shop" / REF
    assert secret.read_text() == "s3cret-value"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((home2 / "secrets" / "shop").stat().st_mode) == 0o700
    assert stat.S_IMODE((home2 / "replicas").stat().st_mode) == 0o700
    assert not (home2 / "replicas" / "own").exists()
    assert rep.sync() == 0  # nothing new
    # a config release: same files, a new secret; only the secret travels
    ref2 = "f" * 32
    (tmp_path / "h1" / "secrets" / "shop" / ref2).write_text("rotated")
    shared.put("releases:shop@h1", "release", "shop/v2",
               {"number": 2, "status": "deployed", "files": "v1",
                "config": {"vars": {}, "secrets": {"TOKEN": ref2}}})
    assert rep.sync() == 1
    assert (home2 / "secrets" / "shop" / ref2).read_text() == "rotated"
    # blog's release removed on h1: its copy goes
    shared.release("releases:blog@h1", [("release", "blog/v1")])
    rep.sync()
    assert not (home2 / "replicas" / "blog").exists()
    assert (home2 / "replicas" / "shop" / "v1").is_dir()


def test_replicator_backs_off_from_a_host_that_does_not_answer(
        tmp_path: Path, shared: SqliteLedger) -> None:
    release_on(shared, tmp_path / "h1", "h1")
    alive(shared, "h1")
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    rep = Replicator(shared, tmp_path / "h2", "h2", Channel(KEY), port)
    assert rep.sync() == 0
    tries, after = rep._failures["shop/v1"]
    assert tries == 1 and after > time.monotonic()
    assert rep.sync() == 0 and rep._failures["shop/v1"][0] == 1  # not retried at once


def test_connections_beyond_the_cap_are_closed_at_once(
        tmp_path: Path, shared: SqliteLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral import replication

    monkeypatch.setattr(replication, "MAX_CONNECTIONS", 2)
    release_on(shared, tmp_path / "h1", "h1")
    srv = ReplicaServer(("127.0.0.1", 0), Channel(KEY), ReleaseSource(shared, tmp_path / "h1",
                                                                     "h1"))
    srv.start()
    try:
        address = srv.server_address[:2]
        idle = [socket.create_connection(address, timeout=5) for _ in range(2)]
        time.sleep(0.2)  # both taken by their threads, waiting for a request
        with socket.create_connection(address, timeout=5) as third:
            started = time.monotonic()
            assert third.recv(10) == b""  # closed at once, not after the first-frame wait
            assert time.monotonic() - started < 2
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        into = tmp_path / "in"
        into.mkdir()
        got = fetch_release(Channel(KEY), address, this="h2", to="h1", app="shop", number=1,
                            with_files=False, into=into)
        assert got.secrets == {REF: "s3cret-value"}
    finally:
        srv.shutdown()
        srv.server_close()


def copied_to_h2(tmp_path: Path, shared: SqliteLedger, server: ReplicaServer
                 ) -> tuple[Path, Replicator]:
    """shop's release on live h1, copied once to h2: h2's home and replicator."""
    release_on(shared, tmp_path / "h1", "h1")
    alive(shared, "h1")
    home2 = tmp_path / "h2"
    rep = Replicator(shared, home2, "h2", Channel(KEY), server.server_address[1])
    assert rep.sync() == 1 and (home2 / "secrets" / "shop" / REF).is_file()
    return home2, rep


def test_copies_of_a_lost_hosts_releases_are_kept_for_its_apps_adoption(
        tmp_path: Path, shared: SqliteLedger, server: ReplicaServer) -> None:
    home2, rep = copied_to_h2(tmp_path, shared, server)
    shared.release("host:h1", [("host-alive", "h1")])  # h1 is lost
    server.shutdown()
    assert rep.sync() == 0  # nothing to copy from a lost host, and nothing tried
    assert "shop/v1" not in rep._failures
    assert (home2 / "replicas" / "shop" / "v1" / "app.py").is_file()
    assert (home2 / "secrets" / "shop" / REF).is_file()


def test_a_rotated_secrets_old_value_is_not_kept_on_other_hosts(
        tmp_path: Path, shared: SqliteLedger, server: ReplicaServer) -> None:
    home2, rep = copied_to_h2(tmp_path, shared, server)
    ref2 = "e" * 32  # the secret set again: v2 references the new value only, v1 is gone
    (tmp_path / "h1" / "secrets" / "shop" / ref2).write_text("new value")
    shared.put("releases:shop@h1", "release", "shop/v2",
               {"number": 2, "status": "deployed", "files": "v1",
                "config": {"vars": {}, "secrets": {"TOKEN": ref2}}})
    shared.release("releases:shop@h1", [("release", "shop/v1")])
    rep.sync()
    assert sorted(p.name for p in (home2 / "secrets" / "shop").iterdir()) == [ref2]
    # an app this host runs itself keeps its own store as it is
    (home2 / "apps" / "mine" / "releases").mkdir(parents=True)
    (home2 / "replicas" / "mine" / "v9").mkdir(parents=True)
    (home2 / "secrets" / "mine").mkdir(parents=True)
    (home2 / "secrets" / "mine" / REF).write_text("desired, not released yet")
    rep.sync()
    assert (home2 / "secrets" / "mine" / REF).is_file()
