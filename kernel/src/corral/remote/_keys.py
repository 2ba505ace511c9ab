"""The SSH keys allowed in, and the unprivileged account they come in through.

The kernel keeps the keys (``<home>/keys.json``, root-only) and renders them into the
``authorized_keys`` of one unprivileged user (``[ssh] user``, default ``corral``), which the
host's stock OpenSSH server reads. Every line is ours, written whole::

    command="/…/python -I /…/corral-ssh --bus ipc://… --events ipc://… --home /… alice",\
        restrict,pty \
        ssh-ed25519 AAAA… corral:alice           (one line)

- ``command=`` forces the gateway (``corral.remote.gateway``) whatever the client asked for;
  the key's name is baked in, so the gateway knows who connected without trusting the client;
- ``restrict`` turns off port, agent and X11 forwarding, user rc and, with ``pty`` added
  back, everything but a terminal (which the gateway allows for ``corral run`` only).

The file and its directory are owned by root (sshd's StrictModes accepts that), so the
account itself cannot widen its own access. The account's password field is ``*``: no
password can match, and sshd does not treat the account as locked.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from corral.errors import CorralError, ErrorCode, NotFoundError

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "ssh-rsa")
"""Key types allowed in (an allow-list); RSA keys of 2048 bits at least."""

_SAFE = re.compile(r"^[A-Za-z0-9_./:+@-]+$")  # what may appear inside command="..."


@dataclass(frozen=True)
class PublicKey:
    """A parsed OpenSSH public key: its type, its base64 body and SHA256 fingerprint."""

    type: str
    body: str
    fingerprint: str

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse one public key line (``TYPE BASE64 [comment]``), as ``ssh-keygen`` writes it.

        Refused: several lines, options before the key, unknown types, a body that does not
        decode to a key of its type, RSA keys under 2048 bits."""
        lines = [x for x in text.strip().splitlines() if x.strip()]
        if len(lines) != 1:
            raise CorralError("give exactly one public key line (TYPE BASE64 [comment]), "
                              f"not {len(lines)}", code=ErrorCode.INVALID)
        parts = lines[0].split()
        if len(parts) < 2 or parts[0] not in KEY_TYPES:
            raise CorralError(
                f"not a public key corral accepts: the line must start with one of "
                f"{', '.join(KEY_TYPES)} (options such as command= are corral's to write)",
                code=ErrorCode.INVALID)
        kind, body = parts[0], parts[1]
        try:
            blob = base64.b64decode(body, validate=True)
            key = load_ssh_public_key(f"{kind} {body}".encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise CorralError(f"the {kind} key does not decode: {exc}",
                              code=ErrorCode.INVALID) from None
        expected = {"ssh-ed25519": ed25519.Ed25519PublicKey, "ssh-rsa": rsa.RSAPublicKey}.get(
            kind, ec.EllipticCurvePublicKey)
        if not isinstance(key, expected):
            raise CorralError(f"the key's body is not a {kind} key", code=ErrorCode.INVALID)
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
            raise CorralError(f"an RSA key of {key.key_size} bits is too weak (2048 at least)",
                              code=ErrorCode.INVALID)
        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        return cls(kind, body, f"SHA256:{digest}")


@dataclass(frozen=True)
class Key:
    """One key allowed in: its name, its public key, and what it may act on."""

    name: str
    type: str
    body: str
    fingerprint: str
    apps: tuple[str, ...] = ()
    admin: bool = False
    added: float = 0.0
    by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def may(self, app: str) -> bool:
        """Whether this key may act on ``app``."""
        return self.admin or app in self.apps

    def listing(self) -> dict[str, Any]:
        """What ``corral keys ls`` shows (the key body stays in the store)."""
        return {"name": self.name, "type": self.type, "fingerprint": self.fingerprint,
                "apps": list(self.apps), "admin": self.admin, "added": self.added,
                "by": self.by}


@dataclass(frozen=True)
class Account:
    """The unprivileged SSH account: its user name and home, and the gateway's command."""

    user: str
    home: Path
    gateway: Path
    bus: str
    events: str
    python: Path | None = None
    """The interpreter that runs ``gateway``, isolated (``-I``: no PYTHON* variable, no user
    site, no script directory), so what an SSH client may pass in its environment can never
    change the code the gateway runs; None runs the script by its own ``#!``."""

    def _runner(self) -> builtins.list[str]:
        return [str(self.gateway)] if self.python is None else [str(self.python), "-I",
                                                                str(self.gateway)]

    @property
    def authorized_keys(self) -> Path:
        """The file sshd reads (``~/.ssh/authorized_keys``)."""
        return self.home / ".ssh" / "authorized_keys"

    @property
    def repos(self) -> Path:
        """The apps' bare git repositories (owned by the account)."""
        return self.home / "repos"

    @property
    def uploads(self) -> Path:
        """Where the gateway leaves a source for the kernel (owned by the account)."""
        return self.home / "uploads"

    def ids(self) -> tuple[int, int] | None:
        """The account's uid and gid, or None while it does not exist."""
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            return None
        return pw.pw_uid, pw.pw_gid

    def command(self, key: str) -> str:
        """The forced command of ``key``'s line (every part checked to need no quoting)."""
        parts = [*self._runner(), "--bus", self.bus, "--events", self.events,
                 "--home", str(self.home), key]
        for part in parts:
            if not _SAFE.fullmatch(part):
                raise CorralError(f"{part!r} cannot be written into authorized_keys (only "
                                  "letters, digits and _./:+@- are)", code=ErrorCode.INVALID)
        return shlex.join(parts)

    def line(self, key: Key) -> str:
        """``key``'s authorized_keys line."""
        return (f'command="{self.command(key.name)}",restrict,pty '
                f"{key.type} {key.body} corral:{key.name}")

    def ensure(self) -> tuple[int, int]:
        """Make the account and its directories if missing; its (uid, gid)."""
        if self.ids() is None:
            home_parent = self.home.parent
            home_parent.mkdir(parents=True, exist_ok=True)
            try:
                subprocess.run(
                    ["useradd", "--system", "--user-group", "--home-dir", str(self.home),
                     "--no-create-home", "--shell", "/bin/sh", "--password", "*",
                     "--comment", "corral git push and remote CLI", self.user],
                    check=True, capture_output=True, timeout=60)
            except (OSError, subprocess.CalledProcessError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                raise CorralError(f"cannot create the SSH user {self.user!r}: "
                                  f"{err.decode(errors='replace').strip() or exc}",
                                  code=ErrorCode.INTERNAL, retry=False) from None
        ids = self.ids()
        assert ids is not None
        uid, gid = ids
        for path, owner, mode in ((self.home, (0, 0), 0o755),
                                  (self.home / ".ssh", (0, 0), 0o755),
                                  (self.home / "hooks", (0, 0), 0o755),
                                  (self.repos, (uid, gid), 0o700),
                                  (self.uploads, (uid, gid), 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            os.lchown(path, *owner)
            os.chmod(path, mode)
        # git runs it for every push (core.hooksPath): it deploys, or refuses the push
        _write(self.home / "hooks" / "pre-receive",
               f"#!/bin/sh\nexec {shlex.join(self._runner())} --pre-receive\n", 0o755)
        self._check_gateway(uid, gid)
        return uid, gid

    def _check_gateway(self, uid: int, gid: int) -> None:
        """Refuse keys the account could not use: it must be able to run ``corral-ssh``."""
        try:
            out = subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                 *self._runner(), "--check"], capture_output=True, timeout=60, cwd="/",
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
            ok, why = out.returncode == 0, out.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, str(exc)
        if not ok:
            raise CorralError(
                f"the SSH account {self.user!r} cannot run {self.gateway}: {why[-300:]}. "
                "Install corral where every user can execute it (e.g. a venv under /opt), "
                "not under a private home", code=ErrorCode.INVALID)

    def install(self, keys: list[Key]) -> None:
        """Write authorized_keys with ``keys`` (atomically; root-owned, 0644)."""
        text = "".join(self.line(k) + "\n" for k in keys)
        _write(self.authorized_keys, text, 0o644)


def gateway_path() -> Path:
    """``corral-ssh`` beside the kernel's Python (the console script of this package)."""
    return Path(sys.executable).parent / "corral-ssh"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KeyStore:
    """The keys allowed in (``<home>/keys.json``, 0600) and the account they use."""

    def __init__(self, path: Path, account: Account) -> None:
        self.path = path
        self.account = account

    def all(self) -> list[Key]:
        """Every key, by name."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        keys = [Key(**{**k, "apps": tuple(k.get("apps", ()))}) for k in data.get("keys", [])]
        return sorted(keys, key=lambda k: k.name)

    def get(self, name: str) -> Key | None:
        """The key named ``name``, or None."""
        return next((k for k in self.all() if k.name == name), None)

    def _save(self, keys: list[Key]) -> None:
        _write(self.path, json.dumps({"keys": [asdict(k) for k in keys]}, indent=1), 0o600)

    def add(self, name: str, text: str, *, apps: list[str], admin: bool, by: str) -> Key:
        """Allow a key in; refused when the name or the key itself is already there (sshd
        would act on the first line holding a key, so one key has one scope)."""
        public = PublicKey.parse(text)
        keys = self.all()
        for k in keys:
            if k.name == name:
                raise CorralError(f"a key named {name!r} exists already "
                                  f"({k.fingerprint}); `corral keys rm {name}` first",
                                  code=ErrorCode.CONFLICT)
            if k.fingerprint == public.fingerprint:
                raise CorralError(f"this key ({public.fingerprint}) is allowed in already "
                                  f"as {k.name!r}", code=ErrorCode.CONFLICT)
        key = Key(name, public.type, public.body, public.fingerprint, tuple(sorted(set(apps))),
                  admin, round(time.time(), 3), by)
        self.account.line(key)  # refuse before anything is written
        self.account.ensure()
        new = sorted([*keys, key], key=lambda k: k.name)
        self.account.install(new)
        try:
            self._save(new)
        except BaseException:
            self.account.install(keys)
            raise
        return key

    def remove(self, name: str) -> Key:
        """Remove a key (sshd refuses it from the next connection on)."""
        keys = self.all()
        gone = next((k for k in keys if k.name == name), None)
        if gone is None:
            raise NotFoundError(f"no key named {name!r}")
        kept = [k for k in keys if k.name != name]
        self.account.install(kept)  # the door closes first
        self._save(kept)
        return gone

    def sync(self) -> None:
        """Render authorized_keys again from the store (at start: paths may have moved)."""
        keys = self.all()
        if keys:
            self.account.ensure()
            self.account.install(keys)
