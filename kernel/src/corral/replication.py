"""Releases copied between the hosts of a cluster, so a release built on one host runs on any.

On an etcd ledger every kernel keeps a copy of every other host's kept releases: the files
of each release (its source snapshot and build output) and the values of the secrets its
config references. A host that dies leaves its apps' releases on the others, where the
leader re-places them (``corral.failover``); a host that joins later copies what is kept.

**The channel.** Each kernel serves its own releases on ``[host] address`` and
``files_port`` (TCP, default 7480) to the other hosts, which are told apart from anyone else
by the cluster key: 32 random bytes in the root-only file ``[host] cluster_key``, the same on
every host (``corral hosts key`` makes one). Every byte on the channel is sealed with
AES-256-GCM (``cryptography``) under keys derived from it (HKDF-SHA256, one per direction):

- a request is one frame (``u32 length, 12-byte nonce, ciphertext``, at most ``MAX_REQUEST``
  bytes) holding ``{"v", "op", "from", "to", "at", "id", "app", "number", "files"}``. The
  server opens it before it parses anything (a frame that does not open under the key is
  dropped, the connection closed, nothing decoded), then refuses one addressed to another
  host, one whose ``at`` is more than ``CLOCK_SKEW_S`` away, or an ``id`` it saw already;
- the answer is a run of frames, each sealed with the request's id, its index and whether it
  is the last in the associated data, so frames cannot be reordered, dropped, replayed into
  another answer or cut short unnoticed: a header (``{"ok": true, "files", "secrets"}`` or
  ``{"ok": false, "error"}``), then the release directory as a tar stream, then an empty
  last frame.

**Copies.** ``<home>/replicas/<app>/<files>`` (root-only ``0700`` above them; the files made
root's and read-only as a built release is, ``seal``), extracted from the stream with
tarfile's ``tar`` filter (nothing outside the directory, no device or fifo) into a staging
directory and renamed into place whole; secrets go to the app's root-only secret store
(``<home>/secrets/<app>/<ref>``, 0600). A copy is never trusted further than its sender:
being able to send it means holding the cluster key, which is what writing the ledger
already means for a host. The ``Replicator`` of each kernel watches the release records
(an etcd watch), copies what it lacks from the host that holds the release, retries
failures with back-off, and removes copies of releases that are gone.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets as random
import socket
import socketserver
import stat
import struct
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import structlog

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.ledger import Ledger
from corral.release import AppConfig, ConfigStore, remove_tree

log = structlog.get_logger("corral.replication")

PROTOCOL = b"corral-files/1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_REQUEST = 4096
MAX_CONNECTIONS = 32
FIRST_FRAME_S = 5.0  # a connection that sends no request within this is dropped
CHUNK = 256 * 1024
MAX_FRAME = CHUNK + NONCE_BYTES + TAG_BYTES + 1024
CLOCK_SKEW_S = 60.0
IO_TIMEOUT_S = 15.0
SEEN_IDS = 4096
RETRY_MAX_S = 30.0
WAIT_S = 5.0
RELEASE = "release"
ALIVE = "host-alive"
HOST = "host"
STATUSES = frozenset({"built", "deployed"})
"""Release records whose files are kept (and so copied)."""
_LEN = struct.Struct(">I")
_INDEX = struct.Struct(">Q")


def load_cluster_key(path: str | Path) -> bytes:
    """The cluster key in ``path``: one line of base64 of ``KEY_BYTES`` bytes, in a file
    owned by this process's user (root) that nobody else may read or write. Any other
    file is refused with an error naming it and what is wrong."""
    p = Path(path)
    try:
        st = os.stat(p)
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorralError(f"{p}: the cluster key cannot be read ({exc}); make one with "
                          "`corral hosts key > FILE` and copy it to every host",
                          code=ErrorCode.INVALID) from None
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise CorralError(f"{p}: the cluster key must be owned by uid {os.geteuid()} and "
                          f"readable by it alone (it is uid {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it",
                          code=ErrorCode.INVALID)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise CorralError(f"{p}: not a cluster key (expected base64 of {KEY_BYTES} random "
                          "bytes on one line; `corral hosts key` prints one)",
                          code=ErrorCode.INVALID)
    return key


def new_cluster_key() -> str:
    """A new cluster key, as its file holds it (one line of base64)."""
    return base64.b64encode(random.token_bytes(KEY_BYTES)).decode() + "\n"


class ChannelError(CorralError):
    """The other end is not a host of this cluster, or broke the channel's rules."""

    code = ErrorCode.UNAVAILABLE


class Channel:
    """Sealing and opening of the channel's frames under one cluster key."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(key) != KEY_BYTES:
            raise ValueError("a cluster key is 32 bytes")

        def derive(purpose: bytes) -> AESGCM:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=PROTOCOL,
                        info=PROTOCOL + b" " + purpose)
            return AESGCM(hkdf.derive(key))

        self._request = derive(b"request")
        self._answer = derive(b"answer")
        self._record = derive(b"record")

    def seal_request(self, body: dict[str, Any]) -> bytes:
        """One request frame (length prefix included)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._request.encrypt(nonce, json.dumps(body).encode(),
                                               PROTOCOL + b" request")
        if len(sealed) > MAX_REQUEST:
            raise ValueError("request too large")
        return _LEN.pack(len(sealed)) + sealed

    def open_request(self, sealed: bytes) -> dict[str, Any]:
        """The request in ``sealed`` (a frame without its length); ``ChannelError`` when it
        does not open under the key (nothing of it is decoded then) or is not an object."""
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._request.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                          PROTOCOL + b" request")
        except (InvalidTag, ValueError):
            raise ChannelError("a request that is not sealed with this cluster's key") \
                from None
        try:
            body = json.loads(plain)
        except ValueError:
            raise ChannelError("a sealed request that is not JSON") from None
        if not isinstance(body, dict):
            raise ChannelError("a sealed request that is not a JSON object")
        return body

    def _answer_ad(self, ident: str, index: int, last: bool) -> bytes:
        return (PROTOCOL + b" answer " + ident.encode() + _INDEX.pack(index)
                + (b"\x01" if last else b"\x00"))

    def seal_answer(self, ident: str, index: int, data: bytes, *, last: bool) -> bytes:
        """Frame ``index`` of the answer to request ``ident`` (length prefix included)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._answer.encrypt(nonce, data, self._answer_ad(ident, index, last))
        return _LEN.pack(len(sealed)) + sealed

    def open_answer(self, ident: str, index: int, sealed: bytes) -> tuple[bytes, bool]:
        """The data of frame ``index`` of the answer to ``ident`` and whether it is the last;
        ``ChannelError`` for a frame that was not sealed as exactly that."""
        from cryptography.exceptions import InvalidTag

        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        for last in (False, True):
            try:
                return self._answer.decrypt(nonce, body,
                                            self._answer_ad(ident, index, last)), last
            except (InvalidTag, ValueError):
                continue
        raise ChannelError(f"answer frame {index} does not open under this cluster's key "
                           "(tampered with, out of order, or from another cluster)")


    @staticmethod
    def _record_ad(kind: str, key: str) -> bytes:
        return PROTOCOL + b" record " + kind.encode() + b"\0" + key.encode()

    def seal_record(self, kind: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """A ledger record's value as the shared ledger keeps it (``SEALED_KINDS``):
        ``{"sealed": base64(nonce + ciphertext)}``, bound to its kind and key so that it
        cannot be moved to another record."""
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(value, sort_keys=True).encode()
        sealed = nonce + self._record.encrypt(nonce, plain, self._record_ad(kind, key))
        return {"sealed": base64.b64encode(sealed).decode("ascii")}

    def open_record(self, kind: str, key: str, stored: dict[str, Any]) -> dict[str, Any]:
        """The value ``seal_record`` sealed; ``ChannelError`` for one that does not open
        under this cluster's key as record ``kind``/``key`` (or is not sealed at all)."""
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.b64decode(str(stored.get("sealed") or ""), validate=True)
            plain = self._record.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:],
                                         self._record_ad(kind, key))
            value = json.loads(plain)
        except (binascii.Error, InvalidTag, ValueError):
            raise ChannelError(f"ledger record {kind}/{key} is not sealed with this "
                               "cluster's key") from None
        if not isinstance(value, dict):
            raise ChannelError(f"ledger record {kind}/{key}: a sealed value that is not "
                               "a JSON object")
        return value


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        data = sock.recv(min(left, 1 << 20))
        if not data:
            raise ChannelError("the connection ended in the middle of a frame")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def read_frame(sock: socket.socket, limit: int) -> bytes:
    """One frame's sealed bytes; ``ChannelError`` for one longer than ``limit``."""
    (size,) = _LEN.unpack(_read_exact(sock, _LEN.size))
    if size > limit or size < NONCE_BYTES + TAG_BYTES:
        raise ChannelError(f"a frame of {size} bytes (at most {limit})")
    return _read_exact(sock, size)


class _AnswerWriter:
    """A write-only file that seals what is written into answer frames of ``CHUNK`` bytes."""

    def __init__(self, sock: socket.socket, channel: Channel, ident: str, index: int) -> None:
        self.sock, self.channel, self.ident, self.index = sock, channel, ident, index
        self.buffer = bytearray()

    def write(self, data: Any) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self._send(bytes(self.buffer[:CHUNK]), last=False)
            del self.buffer[:CHUNK]
        return len(data)

    def _send(self, data: bytes, *, last: bool) -> None:
        self.sock.sendall(self.channel.seal_answer(self.ident, self.index, data, last=last))
        self.index += 1

    def finish(self) -> None:
        """Send what is buffered, then the last (empty) frame."""
        if self.buffer:
            self._send(bytes(self.buffer), last=False)
            self.buffer.clear()
        self._send(b"", last=True)


class _AnswerReader:
    """A read-only stream of the answer frames after the header, opened and checked in
    order; reading past the last frame gives b"", a connection cut before it an error."""

    def __init__(self, sock: socket.socket, channel: Channel, ident: str, index: int) -> None:
        self.sock, self.channel, self.ident, self.index = sock, channel, ident, index
        self.buffer = b""
        self.ended = False

    def next_frame(self) -> tuple[bytes, bool]:
        data, last = self.channel.open_answer(self.ident, self.index,
                                              read_frame(self.sock, MAX_FRAME))
        self.index += 1
        return data, last

    def read(self, size: int = -1) -> bytes:
        while not self.ended and (size < 0 or len(self.buffer) < size):
            data, last = self.next_frame()
            self.buffer += data
            self.ended = last
        if size < 0:
            out, self.buffer = self.buffer, b""
        else:
            out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out


def _only_files(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``tar`` filter (nothing outside ``dest``, no set-ID or group/other-write
    bits), and nothing but directories, regular files and links under relative names."""
    if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
        raise tarfile.FilterError(f"{member.name}: not a file, directory or link")
    if member.name.startswith("/"):  # the sender writes "./..." names only
        raise tarfile.FilterError(f"{member.name}: an absolute name")
    return tarfile.tar_filter(member, dest)


# -- serving -------------------------------------------------------------------------------------

@dataclass
class ReleaseSource:
    """What the server sends: this host's releases (``ledger``: the shared ledger)."""

    ledger: Ledger
    home: Path
    this: str

    def header_and_files(self, app: str, number: int, with_files: bool
                         ) -> tuple[dict[str, Any], Path | None]:
        """The answer's header for release ``number`` of ``app`` and the directory to send
        (None: secrets only); ``CorralError`` when this host does not hold it."""
        rec = self.ledger.get(RELEASE, f"{app}/v{number}")
        if rec is None or rec.owner != f"releases:{app}@{self.this}":
            raise NotFoundError(f"host {self.this} holds no release v{number} of {app!r}")
        files = str(rec.value.get("files") or f"v{number}")
        directory = self.home / "apps" / app / "releases" / files
        if with_files and not directory.is_dir():
            raise NotFoundError(f"host {self.this} has no files for v{number} of {app!r}")
        config = AppConfig.from_json(rec.value.get("config"))
        by_name = ConfigStore(self.home).secret_values(app, config)  # all, or an error
        values = {config.secrets[name]: value for name, value in by_name.items()}
        return {"ok": True, "files": files, "secrets": values}, (
            directory if with_files else None)


class _Handler(socketserver.BaseRequestHandler):
    server: ReplicaServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(FIRST_FRAME_S)
        peer = self.client_address[0] if self.client_address else "?"
        try:
            request = self.server.channel.open_request(read_frame(sock, MAX_REQUEST))
            ident = self.server.admit(request)
        except (ChannelError, OSError) as exc:
            log.warning("replica request refused", peer=peer, error=str(exc))
            return
        sock.settimeout(IO_TIMEOUT_S)
        writer = _AnswerWriter(sock, self.server.channel, ident, 0)
        try:
            header, directory = self.server.source.header_and_files(
                str(request["app"]), int(request["number"]), bool(request.get("files")))
        except CorralError as exc:
            with contextlib.suppress(OSError):
                sock.sendall(self.server.channel.seal_answer(
                    ident, 0, json.dumps({"ok": False, "error": exc.reason}).encode(),
                    last=True))
            return
        try:
            sock.sendall(self.server.channel.seal_answer(ident, 0, json.dumps(header).encode(),
                                                         last=False))
            writer.index = 1
            if directory is not None:
                with tarfile.open(fileobj=cast(IO[bytes], writer), mode="w|",
                                  format=tarfile.PAX_FORMAT) as tar:
                    tar.add(str(directory), arcname=".", recursive=True)
            writer.finish()
            log.info("release sent", app=request["app"], release=request["number"],
                     to=request.get("from"))
        except OSError as exc:
            log.warning("release not sent", peer=peer, error=str(exc))


class ReplicaServer(socketserver.ThreadingTCPServer):
    """This host's end of the channel: answers other hosts' requests for its releases, each
    connection in a daemon thread of its own."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], channel: Channel, source: ReleaseSource
                 ) -> None:
        self.channel = channel
        self.source = source
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, if fewer than ``MAX_CONNECTIONS`` are served: beyond
        that (a flood from anyone who can reach the port) it is closed at once."""
        if not self._slots.acquire(blocking=False):
            log.warning("replica connection refused: too many at once", peer=client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def admit(self, request: dict[str, Any]) -> str:
        """The id of an opened request this host answers; ``ChannelError`` otherwise."""
        ident, app, number = request.get("id"), request.get("app"), request.get("number")
        if request.get("v") != 1 or request.get("op") != "release":
            raise ChannelError(f"an unknown request {request.get('op')!r}")
        if request.get("to") != self.source.this:
            raise ChannelError(f"a request for host {request.get('to')!r}")
        at = request.get("at")
        if not isinstance(at, int | float) or abs(time.time() - float(at)) > CLOCK_SKEW_S:
            raise ChannelError("a request too old or from a clock far off")
        if not (isinstance(ident, str) and len(ident) == 32 and _is_ref(ident)):
            raise ChannelError("a request without a valid id")
        if not (isinstance(app, str) and app and "/" not in app and "@" not in app
                and not app.startswith(".") and isinstance(number, int) and number > 0):
            raise ChannelError("a request without a valid app and release")
        with self._lock:
            if ident in self._seen:
                raise ChannelError("a request replayed")
            self._seen[ident] = time.time()
            while len(self._seen) > SEEN_IDS:
                self._seen.popitem(last=False)
        return ident

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; ``shutdown()`` ends it."""
        thread = threading.Thread(target=self.serve_forever, name="corral-replicas",
                                  daemon=True)
        thread.start()
        return thread


# -- copying -------------------------------------------------------------------------------------

@dataclass
class Fetched:
    """What one fetch brought: the directory made (None: secrets only) and the secrets."""

    files: str
    directory: Path | None
    secrets: dict[str, str]


def fetch_release(channel: Channel, address: tuple[str, int], *, this: str, to: str,
                  app: str, number: int, with_files: bool, into: Path) -> Fetched:
    """Ask host ``to`` at ``address`` for release ``number`` of ``app``; its files (when
    ``with_files``) are extracted into a new directory under ``into`` (a staging directory
    the caller renames into place). ``ChannelError``/``CorralError`` say why not."""
    ident = random.token_hex(16)
    request = {"v": 1, "op": "release", "from": this, "to": to, "at": time.time(),
               "id": ident, "app": app, "number": number, "files": with_files}
    with socket.create_connection(address, timeout=IO_TIMEOUT_S) as sock:
        sock.sendall(channel.seal_request(request))
        reader = _AnswerReader(sock, channel, ident, 0)
        raw, last = reader.next_frame()
        try:
            header = json.loads(raw)
        except ValueError:
            raise ChannelError("the answer's header is not JSON") from None
        if not isinstance(header, dict) or not header.get("ok"):
            why = header.get("error") if isinstance(header, dict) else "a bad header"
            raise NotFoundError(f"host {to}: {why}")
        files = str(header.get("files") or "")
        if not files or "/" in files or files.startswith("."):
            raise ChannelError(f"host {to} named its release files {files!r}")
        values = {str(k): str(v) for k, v in dict(header.get("secrets") or {}).items()
                  if _is_ref(str(k))}
        reader.ended = last
        directory: Path | None = None
        if with_files:
            directory = into / f".incoming-{ident}"
            directory.mkdir(mode=0o700)
            try:
                with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|") as tar:
                    # the filter refuses what would land outside ``directory``
                    tar.extractall(directory, numeric_owner=True,  # noqa: S202
                                   filter=_only_files)
                if reader.read().strip(b"\0") or not reader.ended:
                    raise ChannelError(f"host {to} sent more than one tar stream")
                from corral.deploy._release import seal

                seal(directory)
            except BaseException:
                remove_tree(directory)
                raise
        elif not reader.ended and (reader.read() or not reader.ended):
            raise ChannelError(f"host {to} sent files that were not asked for")
        return Fetched(files, directory, values)


def _is_ref(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


@dataclass
class Replicator:
    """Keeps this host's copies of the other hosts' kept releases (see the module)."""

    ledger: Ledger  # the shared ledger itself
    home: Path
    this: str
    channel: Channel
    port: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while copies change (a sync, an adoption taking copies as its own)."""
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def root(self, app: str) -> Path:
        """``<home>/replicas/<app>``."""
        return self.home / "replicas" / app

    def _private(self, path: Path) -> Path:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def wanted(self) -> Iterator[tuple[str, int, str, str, list[str]]]:
        """(app, number, files, host, secret refs) of every kept release another host holds,
        live or lost: a lost host's are what its apps are adopted from."""
        for rec in self.ledger.list(kind=RELEASE):
            base, at, host = rec.owner.rpartition("@")
            if not at or host == self.this or rec.value.get("status") not in STATUSES:
                continue
            app = base.removeprefix("releases:")
            number = int(rec.value.get("number") or rec.key.rpartition("/v")[2])
            files = str(rec.value.get("files") or f"v{number}")
            refs = [str(r) for r in ((rec.value.get("config") or {}).get("secrets") or {})
                    .values() if _is_ref(str(r))]
            yield app, number, files, host, refs

    def has(self, app: str, files: str, refs: list[str]) -> bool:
        """Whether this host has the release's files (a copy, or its own) and secrets."""
        present = (self.root(app) / files).is_dir() or \
            (self.home / "apps" / app / "releases" / files).is_dir()
        return present and ConfigStore(self.home).has_secrets(app, refs)

    def sync(self) -> int:
        """Copy what is missing (each release at most once per back-off period) and remove
        copies no kept release uses; return how many releases were copied."""
        done = 0
        wanted = list(self.wanted())
        alive = {r.key for r in self.ledger.list(kind=ALIVE)}
        addresses = {r.key: r.value.get("address") for r in self.ledger.list(kind=HOST)}
        for app, number, files, host, refs in wanted:
            if host not in alive or self.has(app, files, refs):
                continue  # a lost host's copies are kept, and none can be made
            tag = f"{app}/v{number}"
            tries, after = self._failures.get(tag, (0, 0.0))
            if time.monotonic() < after:
                continue
            address = addresses.get(host)
            try:
                if not address:
                    raise NotFoundError(f"host {host} has no address")
                self.copy(app, number, files, host, str(address), refs)
                self._failures.pop(tag, None)
                done += 1
            except (CorralError, OSError, tarfile.TarError) as exc:
                delay = min(RETRY_MAX_S, 0.5 * 2 ** tries)
                self._failures[tag] = (tries + 1, time.monotonic() + delay)
                log.warning("release not copied", app=app, release=number, host=host,
                            error=str(exc), retry_in_s=delay)
        referenced: dict[str, set[str]] = {}
        for a, _n, _f, _h, r in wanted:
            referenced.setdefault(a, set()).update(r)
        self.prune({(a, f) for a, _n, f, _h, _r in wanted}, referenced)
        return done

    def copy(self, app: str, number: int, files: str, host: str, address: str,
             refs: list[str]) -> None:
        """Copy release ``number`` of ``app`` from ``host`` (files unless present)."""
        self._private(self.home / "replicas")
        root = self._private(self.root(app))
        need_files = not ((root / files).is_dir()
                          or (self.home / "apps" / app / "releases" / files).is_dir())
        got = fetch_release(self.channel, (address, self.port), this=self.this, to=host,
                            app=app, number=number, with_files=need_files, into=root)
        missing = [r for r in refs if r not in got.secrets]
        if missing:
            if got.directory is not None:
                remove_tree(got.directory)
            raise NotFoundError(f"host {host} lacks {len(missing)} secret value(s) of "
                              f"{app}/v{number}")
        store = ConfigStore(self.home)
        for ref in refs:
            store.keep_secret(app, ref, got.secrets[ref])
        if got.directory is not None:
            if got.files != files:
                remove_tree(got.directory)
                raise ChannelError(f"host {host} sent files {got.files!r} for {files!r}")
            os.replace(got.directory, root / files)
        log.info("release copied", app=app, release=number, host=host,
                 files=need_files, secrets=len(refs))

    def prune(self, keep: set[tuple[str, str]], refs: dict[str, set[str]] | None = None
              ) -> None:
        """Remove copies that no kept release of another host (live or lost) uses, and, of
        an app this host does not run, the secret values none of them references (a rotated
        secret's old value is not kept on every host)."""
        top = self.home / "replicas"
        if not top.is_dir():
            return
        for app_dir in top.iterdir():
            for copy in app_dir.iterdir():
                if copy.name.startswith(".incoming-") or (app_dir.name, copy.name) not in keep:
                    with contextlib.suppress(OSError):
                        remove_tree(copy)
            if refs is not None and \
                    not (self.home / "apps" / app_dir.name / "releases").is_dir():
                ConfigStore(self.home).prune(app_dir.name, refs.get(app_dir.name, set()))
            with contextlib.suppress(OSError):
                app_dir.rmdir()

    def run(self) -> None:
        """Sync, then again whenever a release record changes (or ``WAIT_S`` passes), until
        ``stop``. Runs in a thread of its own."""
        while not self._stop.is_set():
            try:
                revision = self.ledger.revision()
                with self.lock:
                    self.sync()
                self.ledger.wait_for_change(RELEASE, "", revision, WAIT_S)
            except CorralError as exc:
                log.warning("replicas not synced", error=str(exc))
                self._stop.wait(1.0)

    def stop(self) -> None:
        """End ``run`` at its next wake-up."""
        self._stop.set()
