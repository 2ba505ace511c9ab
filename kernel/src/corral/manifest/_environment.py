"""The app's side of the contract: the environment every instance and cron run starts with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.manifest._load import ResolvedManifest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
# What may pass from the caller's environment (e.g. `corral dev` on a laptop): locale, terminal
# and search path. Nothing else leaks, so a secret in the operator's shell stays there.
INHERITED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM"})
INHERITED_PREFIX = "LC_"


def env_suffix(name: str) -> str:
    """Return the variable suffix for a port or path name: ``static-files`` -> ``STATIC_FILES``."""
    return name.upper().replace("-", "_")


def app_environment(
    resolved: ResolvedManifest,
    *,
    process: str,
    index: int,
    manifest_path: Path,
    base_env: Mapping[str, str] | None = None,
    job: str | None = None,
    config: Mapping[str, str] | None = None,
    release: int | None = None,
) -> dict[str, str]:
    """Return the complete environment of instance ``index`` of ``process``.

    ``process`` is a ``[processes]`` name. For a job a driver spawns (a cron run), ``job`` is
    the job's instance id, which its environment carries as CORRAL_INSTANCE; it has no port
    and ``process`` is then the driver's name for the job. ``base_env`` is consulted only for
    PATH, HOME, LANG, LANGUAGE, LC_*, TZ and TERM; the app's config vars (``config``, plain
    values only: secrets go in at launch) and ``--env`` values come next, the contract
    variables last. A ``.venv`` or ``node_modules/.bin`` in the app directory (what a build
    makes) goes first on PATH, as Heroku's buildpacks put them; ``release`` is the release
    number the process runs (CORRAL_RELEASE=vN).
    """
    manifest = resolved.manifest
    app = manifest.app.name
    if index < 0:
        raise CorralError(f"instance index must be 0 or more, got {index}", code=ErrorCode.INVALID)
    port: int | None = None
    if job is not None:
        instance = job
    elif process in manifest.processes:
        port_name = manifest.processes[process].port
        port = manifest.ports[port_name] if port_name is not None else None
        instance = f"{app}.{process}.{index}"
    else:
        raise NotFoundError(f"app {app!r} has no process {process!r} "
                            f"(it has: {', '.join(manifest.processes) or 'none'})")

    env = {"PATH": DEFAULT_PATH, "LANG": DEFAULT_LANG, "HOME": str(resolved.directory)}
    for key, value in (base_env or {}).items():
        if key in INHERITED or key.startswith(INHERITED_PREFIX):
            env[key] = value
    directory = Path(resolved.directory)
    tools = [str(directory / d) for d in (".venv/bin", "node_modules/.bin")
             if (directory / d).is_dir()]
    if tools:
        env["PATH"] = ":".join([*tools, env["PATH"]])
    if (directory / ".venv" / "bin").is_dir():
        env["VIRTUAL_ENV"] = str(directory / ".venv")
    env.update(config or {})
    env.update(resolved.env_overrides)
    env["CORRAL_APP"] = app
    if release is not None:
        env["CORRAL_RELEASE"] = f"v{release}"
    env["CORRAL_INSTANCE"] = instance
    env["CORRAL_MANIFEST"] = str(manifest_path)
    for name, number in manifest.ports.items():
        env[f"CORRAL_PORT_{env_suffix(name)}"] = str(number)
    for name, grant in manifest.paths.items():
        env[f"CORRAL_PATH_{env_suffix(name)}"] = grant.path
    if port is not None:
        env["PORT"] = str(port)
    return env
