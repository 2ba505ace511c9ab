"""TLS certificates of the shared frontends: kept on disk, issued and renewed by ACME, or
read from files made elsewhere and reloaded when they change.

``CertStore`` keeps one directory per certificate name under its root (0700)::

    <root>/<name>/key.pem         0600  the certificate's private key (ECDSA P-256)
    <root>/<name>/fullchain.pem   0600  the leaf, then its intermediates
    <root>/<name>/meta.json       0600  domains, issuer, validity, state, last error, next try

A new key and chain are committed so that a kill -9 at any point leaves either the old pair
or the new one: both are written as ``*.new`` (each through a temporary file, fsync and
rename), then renamed over the old pair, chain first. ``load`` finishes a commit that had
both ``.new`` files written and throws away one that had not; meta.json is rewritten last
and the certificate's own facts (validity, issuer) are always read from the chain itself.

``CertManager`` (asyncio) keeps the wanted certificates current and says so through two
callbacks: ``on_change(name, cert_pem, key_pem)`` when a certificate is ready to serve
(loaded, issued, renewed, or its files changed) and ``on_state(name, state)`` when its state
changes (``valid``, ``pending``: none yet, ``failing``: the last attempt failed, with
``last_error``; a still-valid certificate stays in service meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from corral.errors import CorralError, ErrorCode
from corral_lb.acme import AcmeIssuer, ChallengeResponder, IssuedCert

log = structlog.get_logger("corral_lb")

State = Literal["valid", "pending", "failing"]
FilesMode = tuple[Literal["files"], str | Path, str | Path]
Mode = Literal["auto"] | FilesMode

RENEW_BEFORE = timedelta(days=30)  # or a third of the lifetime, whichever is shorter
BACKOFF_MIN_S = 60.0
BACKOFF_MAX_S = 6 * 3600.0
FILE_POLL_S = 3.0
_FILE_SETTLE_S = 0.2  # a change seen: look again this much later, for writers of two files
_MAX_SLEEP_S = 3600.0  # long waits are cut into slices, re-reading the wall clock
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")


class CertError(CorralError):
    """A certificate or key that cannot be used; the message says which file and why."""

    code = ErrorCode.INVALID

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry=False)


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --- keys and pairs -------------------------------------------------------------------------

def generate_key() -> bytes:
    """A new ECDSA P-256 private key, PKCS#8 PEM without encryption."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def check_pair(cert_pem: bytes, key_pem: bytes, *, domains: list[str] | None = None,
               now: datetime | None = None, allow_expired: bool = False) -> x509.Certificate:
    """The leaf (first) certificate of ``cert_pem`` if ``key_pem`` is its key, it is in its
    validity period and it names each of ``domains``; otherwise ``CertError``: "not a PEM
    certificate", "not a PEM private key", "the private key is encrypted...", "key does not
    match the certificate", "the certificate expired on ...", "the certificate is not valid
    before ...", "the certificate does not cover x.example (it names ...)". Error messages
    never contain key material."""
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise CertError("not a PEM certificate")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertError("not a PEM certificate (the PEM block does not parse)") from None
    leaf = chain[0]
    key = _load_key(key_pem)
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise CertError("key does not match the certificate")
    if not allow_expired:
        now = now or _utcnow()
        if now >= leaf.not_valid_after_utc:
            raise CertError(f"the certificate expired on {_day(leaf.not_valid_after_utc)}")
        if now < leaf.not_valid_before_utc:
            raise CertError(
                f"the certificate is not valid before {_day(leaf.not_valid_before_utc)}")
    if domains:
        names = cert_domains(leaf)
        missing = [d for d in domains if not covers(names, d)]
        if missing:
            raise CertError(f"the certificate does not cover {', '.join(missing)} "
                            f"(it names {', '.join(names) or 'no DNS name'})")
    return leaf


def check_files(cert_path: str | Path, key_path: str | Path, *,
                domains: list[str] | None = None,
                now: datetime | None = None) -> x509.Certificate:
    """``check_pair`` on two files, errors naming them: "cannot read key /p/key.pem:
    Permission denied", "/p/cert.pem: not a PEM certificate", "/p/key.pem: key does not match
    the certificate /p/cert.pem"."""
    cert_pem, key_pem = _read_pair(Path(cert_path), Path(key_path))
    return _check_read_pair(cert_pem, key_pem, Path(cert_path), Path(key_path),
                            domains=domains, now=now)


def _read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    return _read(cert_path, "certificate"), _read(key_path, "key")


def _check_read_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path, *,
                     domains: list[str] | None = None,
                     now: datetime | None = None) -> x509.Certificate:
    try:
        return check_pair(cert_pem, key_pem, domains=domains, now=now)
    except CertError as e:
        text = str(e)
        if text.startswith("key does not match"):
            raise CertError(f"{key_path}: {text} {cert_path}") from None
        where = key_path if "private key" in text else cert_path
        raise CertError(f"{where}: {text}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _load_key(key_pem: bytes) -> Any:
    if b"-----BEGIN" not in key_pem or b"PRIVATE KEY-----" not in key_pem:
        raise CertError("not a PEM private key")
    if b"ENCRYPTED" in key_pem.split(b"-----", 2)[1]:
        raise CertError("the private key is encrypted; give it without a passphrase")
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError("the private key is encrypted; give it without a passphrase") from None
    except ValueError:
        raise CertError("not a PEM private key (the PEM block does not parse)") from None


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def cert_domains(cert: x509.Certificate) -> list[str]:
    """The DNS names of ``cert``'s subjectAltName (none: an empty list)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [d.lower() for d in san.value.get_values_for_type(x509.DNSName)]


def covers(names: list[str], domain: str) -> bool:
    """Whether a certificate naming ``names`` is valid for ``domain`` (RFC 6125: a wildcard
    stands for exactly one leftmost label)."""
    domain = domain.lower().rstrip(".")
    if domain in names:
        return True
    head, _, rest = domain.partition(".")
    return bool(head and rest) and f"*.{rest}" in names


# --- the store ------------------------------------------------------------------------------

@dataclass
class CertMeta:
    """What meta.json records of a certificate (times aware, UTC)."""

    domains: list[str]
    state: State = "pending"
    issuer: str | None = None
    serial: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    last_error: str | None = None
    next_attempt: datetime | None = None  # failing: when the next order goes out
    failures: int = 0  # orders failed in a row

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.isoformat() if isinstance(v, datetime) else v
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CertMeta:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in ("not_before", "not_after", "next_attempt") and v is not None:
                v = datetime.fromisoformat(v)
            kw[f.name] = v
        kw.setdefault("domains", [])
        if kw.get("state") not in ("valid", "pending", "failing"):
            kw["state"] = "pending"
        return cls(**kw)

    def take(self, cert: IssuedCert) -> None:
        """Record the facts of ``cert``."""
        self.issuer, self.serial = cert.issuer, cert.serial
        self.not_before, self.not_after = cert.not_before, cert.not_after


@dataclass
class StoredCert:
    """A certificate as ``CertStore.load`` found it; key and chain both or neither."""

    name: str
    meta: CertMeta
    key_pem: bytes | None = None
    fullchain_pem: bytes | None = None


class CertStore:
    """Certificates on disk, one directory per name (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        """The directory of ``name``; ``CertError`` for a name that is not a plain file name
        (letters, digits, ``_ . -``, not starting with a dot)."""
        if not _NAME.fullmatch(name) or ".." in name:
            raise CertError(f"not a usable certificate name: {name!r}")
        return self.root / name

    def names(self) -> list[str]:
        """The names stored, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME.fullmatch(p.name))

    def load(self, name: str) -> StoredCert | None:
        """What is stored for ``name`` (None: nothing). Finishes or discards a commit that a
        crash interrupted. A key and chain that do not belong together or do not parse are
        left out (logged); an expired pair is returned as it is."""
        d = self.path(name)
        if not d.is_dir():
            return None
        _roll_forward(d)
        meta = _read_meta(d / "meta.json")
        key_pem = _read_optional(d / "key.pem")
        chain_pem = _read_optional(d / "fullchain.pem")
        if key_pem is None or chain_pem is None:
            return StoredCert(name, meta or CertMeta(domains=[]))
        try:
            leaf = check_pair(chain_pem, key_pem, allow_expired=True)
        except CertError as e:
            log.warning("stored certificate unusable; ordering anew", name=name, error=str(e))
            return StoredCert(name, meta or CertMeta(domains=[]))
        if meta is None:
            meta = CertMeta(domains=cert_domains(leaf), state="valid")
        meta.take(IssuedCert.from_pem(chain_pem))  # the chain is the truth, meta a cache
        return StoredCert(name, meta, key_pem, chain_pem)

    def save(self, name: str, meta: CertMeta, *, key_pem: bytes | None = None,
             fullchain_pem: bytes | None = None) -> None:
        """Write ``meta``, and with ``key_pem`` and ``fullchain_pem`` (both or neither)
        replace the pair, atomically across a crash."""
        if (key_pem is None) != (fullchain_pem is None):
            raise ValueError("key_pem and fullchain_pem go together")
        d = self.path(name)
        _make_private_dir(self.root)
        _make_private_dir(d)
        if key_pem is not None and fullchain_pem is not None:
            _write_atomic(d / "key.pem.new", key_pem)
            _write_atomic(d / "fullchain.pem.new", fullchain_pem)
            _fsync_dir(d)
            _roll_forward(d)
        _write_atomic(d / "meta.json", json.dumps(meta.to_json(), indent=2).encode() + b"\n")
        _fsync_dir(d)

    def remove(self, name: str) -> None:
        """Forget ``name``: its key, chain and meta (no error if absent)."""
        d = self.path(name)
        if d.is_dir():
            # renamed away first, so that a crash midway leaves no half-deleted name
            gone = d.with_name(f".{name}.removed.{os.getpid()}")
            os.replace(d, gone)
            _fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)


def _make_private_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``path`` holds ``data`` or what it held before, never a part: a temporary file in the
    same directory, created with ``mode``, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_meta(path: Path) -> CertMeta | None:
    data = _read_optional(path)
    if data is None:
        return None
    try:
        return CertMeta.from_json(json.loads(data))
    except (ValueError, TypeError) as e:
        log.warning("certificate meta.json unreadable; rebuilt from the certificate",
                    path=str(path), error=f"{type(e).__name__}")
        return None


def _roll_forward(d: Path) -> None:
    """Finish or undo an interrupted commit in ``d``.

    A commit writes key.pem.new, then fullchain.pem.new, then renames fullchain.pem.new and
    key.pem.new into place. Seen afterwards: key.pem.new with a chain it matches (the .new
    one, or one already renamed) is finished; anything else with .new is undone."""
    for tmp in d.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    key_new, chain_new = d / "key.pem.new", d / "fullchain.pem.new"
    key_pem = _read_optional(key_new)
    if key_pem is None:
        chain_new.unlink(missing_ok=True)  # a chain without its key: never committed
        return
    chain_pem = _read_optional(chain_new)
    if chain_pem is None:
        chain_pem = _read_optional(d / "fullchain.pem")
    try:
        if chain_pem is None:
            raise CertError("no chain")
        check_pair(chain_pem, key_pem, allow_expired=True)
    except CertError:
        key_new.unlink(missing_ok=True)  # the chain never landed: the old pair stays
        chain_new.unlink(missing_ok=True)
        _fsync_dir(d)
        return
    if chain_new.exists():
        os.replace(chain_new, d / "fullchain.pem")
    os.replace(key_new, d / "key.pem")
    _fsync_dir(d)


# --- the manager ----------------------------------------------------------------------------

OnChange = Callable[[str, bytes, bytes], "Awaitable[None] | None"]
OnState = Callable[[str, dict[str, Any]], "Awaitable[None] | None"]


@dataclass(eq=False)
class _Cert:
    name: str
    domains: list[str]
    mode: Mode
    meta: CertMeta
    cert_pem: bytes | None = None  # in service
    key_pem: bytes | None = None
    jitter: timedelta = timedelta(0)
    renewing: bool = False
    force: bool = False
    files_sig: object = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    attempted: list[asyncio.Future[None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def is_files(self) -> bool:
        return self.mode != "auto"


class CertManager:
    """Keeps wanted certificates current; asyncio, one task per certificate.

    ``mode`` is ``"auto"`` (ordered from ``issuer`` with HTTP-01 answers put into
    ``challenges``, stored in ``store``, renewed when less than ``renew_before`` or a third of
    the lifetime is left, minus up to a day of random jitter; a failure is retried after
    ``backoff_min_s`` doubling to ``backoff_max_s``) or ``("files", cert_path, key_path)``
    (read and checked, then polled every ``file_poll_s`` and reloaded when they change; never
    copied into the store). Orders run in threads, at most ``max_orders`` at once."""

    def __init__(self, store: CertStore, *, issuer: AcmeIssuer | None,
                 challenges: ChallengeResponder, on_change: OnChange | None = None,
                 on_state: OnState | None = None, renew_before: timedelta = RENEW_BEFORE,
                 backoff_min_s: float = BACKOFF_MIN_S, backoff_max_s: float = BACKOFF_MAX_S,
                 file_poll_s: float = FILE_POLL_S, max_orders: int = 2,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.store, self.issuer, self.challenges = store, issuer, challenges
        self.on_change, self.on_state = on_change, on_state
        self.renew_before = renew_before
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.file_poll_s = file_poll_s
        self.clock = clock
        self._orders = asyncio.Semaphore(max_orders)
        self._certs: dict[str, _Cert] = {}

    # -- the contract

    async def want(self, name: str, domains: list[str], mode: Mode) -> None:
        """Serve a certificate named ``name`` for ``domains`` from now on.

        ``auto``: a stored certificate is loaded and handed to ``on_change`` before this
        returns (an order for a missing, expired or too narrow one starts in the background).
        ``files``: the pair is read and checked in the background. Wanting again with other
        domains re-orders; with another mode starts over."""
        domains = [d.lower() for d in domains]
        if not domains:
            raise CertError(f"certificate {name!r}: no domains")
        mode = _normal_mode(mode)
        self.store.path(name)  # the name is checked even for files, which stores nothing
        c = self._certs.get(name)
        if c is not None and c.mode == mode and c.task is not None and not c.task.done():
            if c.domains != domains:
                _new_domains(c.meta, domains)
                c.domains = domains
                c.wake.set()
            return
        if c is not None:
            await self._stop(c)
        if mode == "auto":
            c = await self._load_auto(name, domains)
        else:
            c = _Cert(name, domains, mode, CertMeta(domains=domains))
        self._certs[name] = c
        c.task = asyncio.create_task(self._run(c), name=f"cert {name}")

    async def drop(self, name: str, *, purge: bool = False) -> None:
        """Stop managing ``name``; with ``purge`` also delete what is stored for it (kept
        otherwise, so that a redeploy serves it again without an order)."""
        c = self._certs.pop(name, None)
        if c is not None:
            await self._stop(c)
        if purge:
            await asyncio.to_thread(self.store.remove, name)

    async def renew(self, name: str) -> dict[str, Any]:
        """Order (auto) or re-read (files) ``name`` now, whatever its expiry or back-off;
        returns its state once that attempt has ended. KeyError if ``name`` is not wanted."""
        c = self._certs[name]
        if c.task is None or c.task.done():  # it died of a bug (logged): start it again
            c.task = asyncio.create_task(self._run(c), name=f"cert {name}")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        c.attempted.append(done)
        c.force = True
        c.files_sig = None
        c.wake.set()
        await done
        return self._state(c)

    def status(self) -> list[dict[str, Any]]:
        """Each certificate's domains, issuer, validity, state and last error (for
        ``corral certs`` and ``query.lb.status``), sorted by name."""
        return [self._state(self._certs[n]) for n in sorted(self._certs)]

    def state(self, name: str) -> dict[str, Any] | None:
        """The state of ``name`` as ``status`` shows it; None if not wanted."""
        c = self._certs.get(name)
        return None if c is None else self._state(c)

    def current(self, name: str) -> tuple[bytes, bytes] | None:
        """The (fullchain PEM, key PEM) of ``name`` in service, or None."""
        c = self._certs.get(name)
        if c is None or c.cert_pem is None or c.key_pem is None:
            return None
        return c.cert_pem, c.key_pem

    async def close(self) -> None:
        """Stop every task (an order in flight finishes in its thread and is discarded)."""
        certs, self._certs = list(self._certs.values()), {}
        for c in certs:
            await self._stop(c)

    # -- internals

    def _state(self, c: _Cert) -> dict[str, Any]:
        m = c.meta
        out: dict[str, Any] = {
            "name": c.name, "domains": list(c.domains),
            "mode": "auto" if c.mode == "auto" else "files",
            "state": m.state, "serving": self._serving(c), "renewing": c.renewing,
            "issuer": m.issuer, "serial": m.serial,
            "not_before": _iso(m.not_before), "not_after": _iso(m.not_after),
            "last_error": m.last_error, "next_attempt": _iso(m.next_attempt),
            "failures": m.failures,
        }
        if isinstance(c.mode, tuple):
            out["cert_file"], out["key_file"] = str(c.mode[1]), str(c.mode[2])
        return out

    def _serving(self, c: _Cert) -> bool:
        na = c.meta.not_after
        return c.cert_pem is not None and na is not None and self.clock() < na

    async def _stop(self, c: _Cert) -> None:
        if c.task is not None:
            c.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await c.task
        for f in c.attempted:
            if not f.done():
                f.cancel()

    async def _load_auto(self, name: str, domains: list[str]) -> _Cert:
        stored = await asyncio.to_thread(self.store.load, name)
        meta = stored.meta if stored is not None else CertMeta(domains=domains)
        if meta.domains != domains:
            _new_domains(meta, domains)
        c = _Cert(name, domains, "auto", meta)
        if stored is not None and stored.key_pem is not None and stored.fullchain_pem:
            c.cert_pem, c.key_pem = stored.fullchain_pem, stored.key_pem
            c.jitter = self._jitter(meta)
            if self._serving(c):
                if meta.state == "pending":
                    meta.state = "valid"
                await self._call(self.on_change, name, c.cert_pem, c.key_pem)
            else:
                meta.state = "failing" if meta.failures else "pending"
        elif meta.state == "valid":
            meta.state = "pending"
        await self._publish(c)
        return c

    async def _run(self, c: _Cert) -> None:
        try:
            if c.is_files:
                await self._run_files(c)
            else:
                await self._run_auto(c)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: say so, and let the next want() start over
            log.exception("certificate task failed", name=c.name)

    # auto

    def _due(self, c: _Cert) -> datetime:
        """When the next order of ``c`` goes out."""
        now, m = self.clock(), c.meta
        if m.state == "failing" and m.next_attempt is not None:
            return m.next_attempt
        names = self._cert_domains(c)
        if not self._serving(c) or not all(covers(names, d) for d in c.domains):
            return now
        assert m.not_after is not None and m.not_before is not None
        lifetime = m.not_after - m.not_before
        return m.not_after - min(self.renew_before, lifetime / 3) - c.jitter

    @staticmethod
    def _cert_domains(c: _Cert) -> list[str]:
        if c.cert_pem is None:
            return []
        return cert_domains(x509.load_pem_x509_certificate(c.cert_pem))

    def _jitter(self, m: CertMeta) -> timedelta:
        if m.not_after is None or m.not_before is None:
            return timedelta(0)
        spread = min(timedelta(days=1), (m.not_after - m.not_before) / 30)
        return spread * random.random()  # noqa: S311 (spreading load, not a secret)

    async def _run_auto(self, c: _Cert) -> None:
        while True:
            c.wake.clear()
            if not c.force:
                delay = (self._due(c) - self.clock()).total_seconds()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(c.wake.wait(), min(delay, _MAX_SLEEP_S))
                    continue  # woken (renew, new domains) or a slice passed: look again
            c.force = False
            waiters, c.attempted = c.attempted, []
            try:
                await self._order(c)
            finally:
                for f in waiters:
                    if not f.done():
                        f.set_result(None)

    async def _order(self, c: _Cert) -> None:
        domains = list(c.domains)
        c.renewing = True
        if not self._serving(c) and c.meta.state != "failing":
            c.meta.state = "pending"
        await self._publish(c)
        try:
            if self.issuer is None:
                raise CertError("no ACME CA is configured on this host")
            issuer = self.issuer
            key_pem = generate_key()
            async with self._orders:
                log.info("certificate order", name=c.name, domains=domains)
                issued = await asyncio.to_thread(issuer.issue, domains, key_pem,
                                                 self.challenges)
            meta = CertMeta(domains=domains, state="valid")
            meta.take(issued)
            await asyncio.to_thread(self.store.save, c.name, meta, key_pem=key_pem,
                                    fullchain_pem=issued.fullchain_pem)
        except Exception as e:
            c.renewing = False
            await self._failed(c, e)
            return
        c.renewing = False
        c.meta = meta
        c.meta.domains = c.domains
        c.cert_pem, c.key_pem = issued.fullchain_pem, key_pem
        c.jitter = self._jitter(meta)
        log.info("certificate ready", name=c.name, domains=domains, issuer=meta.issuer,
                 not_after=_iso(meta.not_after))
        await self._call(self.on_change, c.name, issued.fullchain_pem, key_pem)
        await self._publish(c)

    async def _failed(self, c: _Cert, e: Exception) -> None:
        m = c.meta
        m.failures += 1
        backoff = min(self.backoff_min_s * 2 ** (m.failures - 1), self.backoff_max_s)
        backoff *= random.uniform(0.9, 1.0)  # noqa: S311
        m.state = "failing"
        m.last_error = str(e) if isinstance(e, CorralError) else f"{type(e).__name__}: {e}"
        m.next_attempt = self.clock() + timedelta(seconds=backoff)
        log.warning("certificate order failed", name=c.name, error=m.last_error,
                    failures=m.failures, retry_in_s=round(backoff),
                    serving=self._serving(c))
        try:
            await asyncio.to_thread(self.store.save, c.name, m)
        except OSError as oe:
            log.warning("cannot record the certificate state", name=c.name,
                        error=f"{oe.strerror}")
        await self._publish(c)

    # files

    async def _run_files(self, c: _Cert) -> None:
        assert isinstance(c.mode, tuple)
        cert_path, key_path = Path(c.mode[1]), Path(c.mode[2])
        while True:
            c.wake.clear()
            sig = _files_sig(cert_path, key_path)
            if sig != c.files_sig:
                if c.files_sig is not None and not c.force:
                    await asyncio.sleep(_FILE_SETTLE_S)  # the writer may be midway
                    if _files_sig(cert_path, key_path) != sig:
                        continue
                c.files_sig = sig
                await self._reload_files(c, cert_path, key_path)
            elif (expired := self._expired_now(c)) is not None:
                c.meta.state = "failing"
                c.meta.last_error = f"{cert_path}: the certificate expired on {_day(expired)}"
                await self._publish(c)
            c.force = False
            waiters, c.attempted = c.attempted, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.wake.wait(), self.file_poll_s)

    def _expired_now(self, c: _Cert) -> datetime | None:
        """The expiry of ``c``'s valid certificate if it has passed."""
        na = c.meta.not_after
        if c.meta.state == "valid" and na is not None and self.clock() >= na:
            return na
        return None

    async def _reload_files(self, c: _Cert, cert_path: Path, key_path: Path) -> None:
        def read() -> tuple[bytes, bytes, IssuedCert]:
            cert_pem, key_pem = _read_pair(cert_path, key_path)
            _check_read_pair(cert_pem, key_pem, cert_path, key_path, now=self.clock())
            return cert_pem, key_pem, IssuedCert.from_pem(cert_pem)

        try:
            cert_pem, key_pem, info = await asyncio.to_thread(read)
        except CertError as e:
            if c.meta.state != "failing" or c.meta.last_error != str(e):
                c.meta.state, c.meta.last_error = "failing", str(e)
                c.meta.failures += 1
                log.warning("certificate files unusable", name=c.name, error=str(e),
                            serving=self._serving(c))
                await self._publish(c)
            return
        if (cert_pem, key_pem) == (c.cert_pem, c.key_pem) and c.meta.state == "valid":
            return  # touched, not changed
        c.cert_pem, c.key_pem = cert_pem, key_pem
        c.meta.take(info)
        c.meta.state, c.meta.last_error, c.meta.failures = "valid", None, 0
        log.info("certificate files loaded", name=c.name, cert=str(cert_path),
                 not_after=_iso(info.not_after))
        await self._call(self.on_change, c.name, cert_pem, key_pem)
        await self._publish(c)

    # callbacks

    async def _publish(self, c: _Cert) -> None:
        await self._call(self.on_state, c.name, self._state(c))

    async def _call(self, cb: Callable[..., Any] | None, *args: Any) -> None:
        if cb is None:
            return
        try:
            result = cb(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("certificate callback failed", name=args[0],
                          callback=getattr(cb, "__name__", repr(cb)))


def _new_domains(meta: CertMeta, domains: list[str]) -> None:
    """Other domains: a back-off earned by the old ones does not delay their first order."""
    meta.domains = domains
    meta.failures, meta.next_attempt = 0, None
    if meta.state == "failing":
        meta.state = "pending"


def _normal_mode(mode: Mode) -> Mode:
    if mode == "auto":
        return "auto"
    if isinstance(mode, tuple) and len(mode) == 3 and mode[0] == "files":
        return ("files", str(mode[1]), str(mode[2]))
    raise CertError(f"not a certificate mode: {mode!r} (\"auto\" or (\"files\", cert, key))")


def _files_sig(cert_path: Path, key_path: Path) -> object:
    """What tells a change of either file: inode, size, mtime and ctime, or the error."""
    out: list[object] = []
    for p in (cert_path, key_path):
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError as e:
            out.append(e.errno)
    return tuple(out)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()
