"""The host: where corral keeps its state (home, runtime dir) and the host config it obeys.

Defaults follow the FHS when running as root (/var/lib/corral, /run/corral,
/etc/corral/host.toml) and the XDG layout otherwise. ``CORRAL_HOME``, ``CORRAL_RUNTIME_DIR``
and ``CORRAL_HOST_CONFIG`` override each of them (tests and side-by-side kernels use these).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.errors import ManifestError


class DriverConfig(BaseModel):
    """One enabled driver: an entry point name, or an exec command for a foreign driver."""

    model_config = ConfigDict(extra="forbid")

    entry_point: str | None = Field(default=None, description="name in group corral.drivers")
    exec: list[str] | None = Field(default=None, description="argv of a foreign driver")
    capability: str | None = Field(default=None, description="required with exec")
    config: dict[str, Any] = Field(default_factory=dict, description="handed over in WELCOME")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")


class BuildConfig(BaseModel):
    """``[build]`` of ``host.toml``: where builds may fetch packages from, and nothing else."""

    model_config = ConfigDict(extra="forbid")

    python_index: str = Field(
        default="https://pypi.org/simple",
        description="the Python package index builds use (uv's default index)")
    npm_registry: str = Field(default="https://registry.npmjs.org",
                              description="the npm registry builds use")
    hosts: list[str] = Field(
        default_factory=lambda: ["files.pythonhosted.org:443"],
        description="further HOST:PORT a build may reach (where the index keeps its files)")
    python_mirror: str | None = Field(
        default=None,
        description="where uv may download a Python the host does not have "
        "(UV_PYTHON_INSTALL_MIRROR); unset: builds use the host's Pythons only")
    timeout_s: float = Field(default=900.0, gt=0,
                             description="default time a build may take ([build] timeout)")


class HostIdentity(BaseModel):
    """``[host]``: this host among the ledger's hosts (``corral hosts``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                             description="default: the system's host name (first label)")
    address: str | None = Field(default=None, max_length=255,
                                description="where other hosts reach this one")
    ttl_s: float = Field(default=10.0, ge=2.0, le=300.0,
                         description="the host's lease: gone this long after its kernel")
    cluster_key: str | None = Field(
        default=None, description="a root-only file with the cluster's key, the same on "
        "every host (`corral hosts key`): releases are copied between hosts and a lost "
        "host's apps re-placed only with it")
    labels: list[Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]] = Field(
        default_factory=list, description="what this host offers, for [placement] in "
        "corral.toml (e.g. ssd, eu-west): DNS-label words")
    files_port: int = Field(default=7480, gt=0, lt=65536,
                            description="where this host serves its releases to the others "
                            "(on its address; sealed with the cluster key)")


class SshConfig(BaseModel):
    """``[ssh]``: the account git pushes and the remote CLI come in through (``corral keys``)."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(default="corral", pattern=r"^[a-z_][a-z0-9_-]{0,30}$",
                      description="the unprivileged user whose authorized_keys corral keeps; "
                      "made by the first `corral keys add`")
    home: str | None = Field(default=None, description="its home (authorized_keys, the apps' "
                             "git repositories, uploads); default: <corral home>/ssh")
    max_upload_mb: int = Field(default=512, gt=0, le=65536,
                               description="the largest source a push or a remote `corral up` "
                               "may send (the tar of its files)")


class HostConfig(BaseModel):
    """``host.toml``. Every field has a default: an empty file (or none) is a valid host."""

    model_config = ConfigDict(extra="forbid")

    ledger: str = Field(default="sqlite:", description="ledger URL; sqlite: is under the home")
    drivers: dict[str, DriverConfig] = Field(
        default_factory=dict,
        description="enabled drivers by name; empty means every installed entry point",
    )
    disabled: list[str] = Field(default_factory=list, description="entry points not to start")
    admins: list[int] = Field(
        default_factory=list, description="uids admitted as clients besides root and the kernel"
    )
    heartbeat_ms: int = Field(default=1000, gt=0)
    address_pool: str = Field(default="10.231.0.0/16", description="app network addresses")
    address_pool6: str = Field(default="fd63:6f72:7261:1::/64")
    app_uids: tuple[int, int] = Field(default=(61000, 61999), description="dynamic app uids")
    restart_window_s: float = Field(default=60.0, description="flap detection window")
    restart_limit: int = Field(default=5, description="restarts allowed in the window")
    unconfined: bool = Field(
        default=False,
        description="allow apps to run with no sandbox driver (fs) enabled; without it such a "
        "host refuses every deploy rather than run apps unconfined",
    )
    driver_wait_s: float = Field(
        default=15.0, gt=0,
        description="how long a deploy, restart, cron run or one-off waits for a driver it "
        "needs that is not connected, before it is refused",
    )
    stop_grace_s: float = Field(
        default=30.0, gt=0,
        description="default time between SIGTERM and SIGKILL when an instance is stopped "
        "(processes.<name>.stop_grace overrides it per process)",
    )
    releases_kept: int = Field(
        default=10, ge=2,
        description="releases kept per app (older ones are removed; never the current one "
        "nor the one before it)")
    build: BuildConfig = Field(default_factory=BuildConfig,
                               description="what builds may reach")
    host: HostIdentity = Field(default_factory=HostIdentity,
                               description="this host among the ledger's hosts")
    ssh: SshConfig = Field(default_factory=SshConfig,
                           description="git push and the remote CLI over SSH")
    start_timeout_s: float = Field(
        default=60.0, gt=0,
        description="default time for a new instance to be ready and healthy in a rollout "
        "(processes.<name>.start_timeout overrides it per process)",
    )


def is_root() -> bool:
    """Whether this process runs as root (and so enforces everything)."""
    return os.geteuid() == 0


def home() -> Path:
    """The corral home: ledger, logs, state."""
    env = os.environ.get("CORRAL_HOME")
    if env:
        return Path(env)
    if is_root():
        return Path("/var/lib/corral")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "corral"


def runtime_dir() -> Path:
    """The runtime directory (mode 0700): bus sockets, FIFOs, sandbox roots."""
    env = os.environ.get("CORRAL_RUNTIME_DIR")
    if env:
        return Path(env)
    if is_root():
        return Path("/run/corral")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "corral" if xdg else home() / "run"


def config_path() -> Path:
    """Where the host config is read from."""
    env = os.environ.get("CORRAL_HOST_CONFIG")
    if env:
        return Path(env)
    return Path("/etc/corral/host.toml") if is_root() else home() / "host.toml"


def bus_endpoint(runtime: Path | None = None) -> str:
    """The kernel's ROUTER endpoint."""
    return f"ipc://{(runtime or runtime_dir()) / 'bus.sock'}"


def events_endpoint(runtime: Path | None = None) -> str:
    """The kernel's PUB endpoint."""
    return f"ipc://{(runtime or runtime_dir()) / 'events.sock'}"


def load_config(path: Path | None = None) -> HostConfig:
    """Read the host config; a missing file means the embedded defaults."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return HostConfig()
    except OSError as exc:
        raise ManifestError(
            [f"{path}: cannot read host config: {exc.strerror}"], file=str(path)
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{path}: {exc}"], file=str(path)) from None
    try:
        return HostConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        ]
        raise ManifestError(problems, file=str(path)) from None


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and force mode 0700 on it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
