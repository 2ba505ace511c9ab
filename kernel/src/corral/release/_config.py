"""Config vars and secrets: an app's environment, kept by corral between commands.

The desired config of app ``A`` is ``<home>/config/A.json`` (0600 root, in a 0700 directory):
``{"vars": {K: V}, "secrets": {K: REF}}``. A secret's value is only ever in
``<home>/secrets/A/REF`` (0600 root; REF is random, so it says nothing of the value). A release
records the config it was made with in the same shape: values of plain vars, references of
secrets. Nothing else — the ledger, events, logs, listings, error messages, the instances'
recorded environment — ever holds a secret's value; it reaches the process only at launch
(``LaunchPlan.secret_env``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError, ErrorCode, NotFoundError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED = frozenset({"PORT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                      "HOME"})
RESERVED_PREFIX = "CORRAL_"
MASK = "********"
MAX_VALUE = 32 * 1024


def check_name(name: str) -> None:
    """Refuse a key that is not a usable environment variable name, or one corral sets."""
    if not _NAME.fullmatch(name):
        raise CorralError(
            f"config key {name!r} is not a valid environment variable name (letters, digits "
            "and '_', not starting with a digit)", code=ErrorCode.INVALID)
    if name in RESERVED or name.startswith(RESERVED_PREFIX):
        raise CorralError(f"config key {name!r} is set by corral itself (PORT, HOME, "
                          "CORRAL_*, the socket-activation variables); choose another name",
                          code=ErrorCode.INVALID)


def check_value(name: str, value: str) -> None:
    """Refuse values an environment cannot carry (the value itself is never quoted back)."""
    if "\0" in value:
        raise CorralError(f"config {name}: the value holds a NUL byte", code=ErrorCode.INVALID)
    if len(value.encode()) > MAX_VALUE:
        raise CorralError(f"config {name}: the value is longer than {MAX_VALUE} bytes",
                          code=ErrorCode.INVALID)


@dataclass(frozen=True)
class AppConfig:
    """An app's config: plain vars with their values, secrets by reference."""

    vars: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The shape kept in files and release records (no secret value in it)."""
        return {"vars": dict(sorted(self.vars.items())),
                "secrets": dict(sorted(self.secrets.items()))}

    @classmethod
    def from_json(cls, data: Any) -> AppConfig:
        """Read ``as_json()`` output (missing parts are empty)."""
        data = data if isinstance(data, dict) else {}
        return cls({str(k): str(v) for k, v in (data.get("vars") or {}).items()},
                   {str(k): str(v) for k, v in (data.get("secrets") or {}).items()})

    def masked(self) -> dict[str, str]:
        """Every key with its value, secrets masked: what listings show."""
        out = dict(self.vars)
        out.update(dict.fromkeys(self.secrets, MASK))
        return dict(sorted(out.items()))

    def keys(self) -> set[str]:
        """Every key, plain or secret."""
        return set(self.vars) | set(self.secrets)


class ConfigStore:
    """Config files and secret values under the corral home (root-only)."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def _private(self, path: Path) -> Path:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def _file(self, app: str) -> Path:
        return self._private(self.home / "config") / f"{app}.json"

    def _secrets(self, app: str) -> Path:
        return self._private(self._private(self.home / "secrets") / app)

    def current(self, app: str) -> AppConfig:
        """The app's desired config (empty when none was ever set)."""
        try:
            return AppConfig.from_json(json.loads(self._file(app).read_text()))
        except FileNotFoundError:
            return AppConfig()

    def write(self, app: str, config: AppConfig) -> None:
        """Make ``config`` the app's desired config (atomically, 0600)."""
        _write_private(self._file(app), json.dumps(config.as_json(), indent=2) + "\n")

    def with_set(self, app: str, values: dict[str, str], *, secret: bool,
                 base: AppConfig | None = None) -> AppConfig:
        """``base`` (default: the current config) with ``values`` set; a secret's value is
        stored now under a new reference (unreferenced ones are removed by ``prune``)."""
        for name, value in values.items():
            check_name(name)
            check_value(name, value)
        cfg = base if base is not None else self.current(app)
        plain, hidden = dict(cfg.vars), dict(cfg.secrets)
        for name, value in values.items():
            plain.pop(name, None)
            hidden.pop(name, None)
            if secret:
                ref = secrets.token_hex(16)
                _write_private(self._secrets(app) / ref, value)
                hidden[name] = ref
            else:
                plain[name] = value
        return AppConfig(plain, hidden)

    def without(self, app: str, names: list[str], base: AppConfig | None = None) -> AppConfig:
        """``base`` (default: the current config) without ``names``; an unknown one is an
        error naming it and the keys there are."""
        cfg = base if base is not None else self.current(app)
        unknown = sorted(set(names) - cfg.keys())
        if unknown:
            raise NotFoundError(
                f"app {app!r} has no config {', '.join(unknown)} (it has "
                f"{', '.join(sorted(cfg.keys())) or 'none'})")
        return AppConfig({k: v for k, v in cfg.vars.items() if k not in names},
                         {k: v for k, v in cfg.secrets.items() if k not in names})

    def secret_values(self, app: str, config: AppConfig) -> dict[str, str]:
        """The secrets' values, for a launch only; a missing one is an error naming its key."""
        out = {}
        for name, ref in config.secrets.items():
            if not re.fullmatch(r"[0-9a-f]{32}", ref):
                raise CorralError(f"config {name}: bad secret reference", code=ErrorCode.INTERNAL)
            try:
                out[name] = (self._secrets(app) / ref).read_text()
            except FileNotFoundError:
                raise CorralError(f"config {name} of {app!r}: its secret value is gone from "
                                  f"{self.home}/secrets; set it again with `corral config set "
                                  f"{app} {name}=... --secret`",
                                  code=ErrorCode.INTERNAL) from None
        return out

    def keep_secret(self, app: str, ref: str, value: str) -> None:
        """Store a secret's value under its reference as another host holds it (a copy of
        that host's release, ``corral.replication``): 0600 root, as ``with_set`` does."""
        if not re.fullmatch(r"[0-9a-f]{32}", ref):
            raise CorralError("bad secret reference", code=ErrorCode.INVALID)
        _write_private(self._secrets(app) / ref, value)

    def has_secrets(self, app: str, refs: list[str]) -> bool:
        """Whether every referenced value is in the app's store."""
        return all((self.home / "secrets" / app / ref).is_file() for ref in refs)

    def prune(self, app: str, keep: set[str]) -> int:
        """Remove the secret values no kept release nor the desired config references."""
        keep = keep | set(self.current(app).secrets.values())
        d = self.home / "secrets" / app
        removed = 0
        if d.is_dir():
            for f in d.iterdir():
                if f.name not in keep and not f.name.startswith("."):
                    f.unlink()
                    removed += 1
        return removed

    def purge(self, app: str) -> None:
        """Forget the app's config and secrets."""
        self._file(app).unlink(missing_ok=True)
        d = self.home / "secrets" / app
        if d.is_dir():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


def _write_private(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
