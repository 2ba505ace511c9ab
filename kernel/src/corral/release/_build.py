"""What a build runs, decided from the release's files (WORKFLOW.md "Build").

``[build] command`` when the manifest gives one; otherwise, by the files present, as Heroku's
buildpacks do (both when both are there):

- ``uv.lock`` → ``uv sync --frozen`` into the release's ``.venv``; ``pyproject.toml`` without
  a lock → ``uv sync``; ``requirements.txt`` → ``uv venv`` + ``uv pip install -r``. The project
  itself is not installed: the app runs from its release directory, like a Heroku slug.
- ``package.json`` → ``npm ci`` (``npm install`` without a lock).

The Python comes from ``.python-version`` (or ``requires-python``): the host's own
interpreters where one matches, uv's managed Pythons where the host config names a mirror to
fetch them from, and otherwise the build is refused naming the version asked for and the
versions there are. Every step runs in the app's sandbox (``corral.deploy``), with caches
under the app's build cache and egress only to the configured package indexes.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from corral.errors import CorralError, ErrorCode
from corral.host import BuildConfig

PYTHON_DIRS = ("/usr/bin", "/usr/local/bin")
"""Where the host's Pythons are looked for: directories every sandbox sees."""


@dataclass(frozen=True)
class Step:
    """One build step: what the progress line says, and the shell command."""

    label: str
    command: str


@dataclass
class BuildPlan:
    """The steps of one build and what they need."""

    steps: list[Step]
    env: dict[str, str]
    egress: list[str]
    tools: list[str] = field(default_factory=list)  # host binaries granted read-only
    python: str | None = None  # "3.11.2 (/usr/bin/python3.11)"
    kinds: list[str] = field(default_factory=list)  # "uv", "pip", "npm", "command"

    def script(self) -> str:
        """The whole build as one ``sh`` script: a progress line per step, stop at the first
        failure, naming it."""
        lines = ["set -e"]
        for n, step in enumerate(self.steps, 1):
            label = f"-----> [{n}/{len(self.steps)}] {step.label}"
            lines.append(f"echo {shlex.quote(label)}")
            lines.append(f"/bin/sh -ec {shlex.quote(step.command)} || {{ code=$?; echo "
                         f"{shlex.quote('-----> failed: ' + step.label)} \"(exit $code)\"; "
                         f"exit $code; }}")
        return "\n".join(lines)


def uv_binary() -> str:
    """The uv that builds run: the one installed with corral (the ``uv`` package), else PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file():
        return str(beside)
    found = shutil.which("uv")
    if found is None:
        raise CorralError("uv is not installed on this host (it comes with corral's "
                          "`uv` dependency); builds of Python apps need it",
                          code=ErrorCode.UNAVAILABLE)
    return found


def _endpoint(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def egress(config: BuildConfig, *, python: bool, node: bool) -> list[str]:
    """The HOST:PORT a build may reach: the indexes it uses and the configured extra hosts."""
    out: list[str] = []
    if python:
        out += [e for e in (_endpoint(config.python_index),) if e]
        if config.python_mirror:
            out += [e for e in (_endpoint(config.python_mirror),) if e]
    if node:
        out += [e for e in (_endpoint(config.npm_registry),) if e]
    out += list(config.hosts)
    return list(dict.fromkeys(out))


# ---- the Python ------------------------------------------------------------------------------

_VERSION_CACHE: dict[tuple[str, float], str] = {}


def host_pythons(dirs: tuple[str, ...] = PYTHON_DIRS) -> list[tuple[str, str]]:
    """``(version, path)`` of each CPython 3 interpreter in ``dirs``, newest first."""
    found: dict[str, str] = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "python3.*"))):
            if not re.fullmatch(r"python3\.\d+", os.path.basename(path)):
                continue
            real = os.path.realpath(path)
            try:
                key = (real, os.stat(real).st_mtime)
            except OSError:
                continue
            version = _VERSION_CACHE.get(key)
            if version is None:
                try:
                    out = subprocess.run(
                        [real, "-I", "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                        capture_output=True, text=True, timeout=10, check=True)
                except (OSError, subprocess.SubprocessError):
                    continue
                version = out.stdout.strip()
                _VERSION_CACHE[key] = version
            found.setdefault(version, path)
    return sorted(found.items(), key=lambda vp: Version(vp[0]), reverse=True)


def python_request(release: Path) -> tuple[str, str] | None:
    """What the app asks for and where: ``(request, file)``: ``.python-version``'s first
    entry, else ``requires-python`` of pyproject.toml; None when it asks nothing."""
    pv = release / ".python-version"
    if pv.is_file():
        for raw in pv.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                return line, ".python-version"
    pp = release / "pyproject.toml"
    if pp.is_file():
        try:
            data = tomllib.loads(pp.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CorralError(f"pyproject.toml: {exc}", code=ErrorCode.INVALID) from None
        req = (data.get("project") or {}).get("requires-python")
        if isinstance(req, str) and req.strip():
            return req.strip(), "pyproject.toml requires-python"
    return None


def matches(request: str, version: str) -> bool:
    """Whether host Python ``version`` satisfies ``request`` ("3.11", "3.11.7",
    "cpython-3.11", ">=3.10,<3.13")."""
    req = request.lower().removeprefix("cpython-").removeprefix("cpython").strip()
    if re.fullmatch(r"3(\.\d+){0,2}", req):
        return version == req or version.startswith(req + ".")
    try:
        return Version(version) in SpecifierSet(req)
    except (InvalidSpecifier, InvalidVersion):
        raise CorralError(f"the app asks for Python {request!r}, which is not a version (3.12), "
                          "a full version (3.12.4) or a specifier (>=3.11)",
                          code=ErrorCode.INVALID) from None


def choose_python(release: Path, config: BuildConfig,
                  pythons: list[tuple[str, str]] | None = None) -> tuple[str, str]:
    """The interpreter to build with: ``(uv --python argument, description)``. Refuses, naming
    the version asked for and the versions there are, when none fits and no mirror is set."""
    have = host_pythons() if pythons is None else pythons
    asked = python_request(release)
    if asked is None:
        if not have:
            raise CorralError("no Python 3 on this host (looked in "
                              f"{', '.join(PYTHON_DIRS)}); install python3", code=ErrorCode.INVALID)
        return have[0][1], f"{have[0][0]} ({have[0][1]}; the app asks for no version)"
    request, where = asked
    for version, path in have:
        if matches(request, version):
            return path, f"{version} ({path}; {where} asks {request})"
    if config.python_mirror:
        return request, f"{request} (uv's managed Python; {where})"
    listed = ", ".join(f"{v} ({p})" for v, p in have) or "none"
    raise CorralError(
        f"the app asks for Python {request} ({where}); this host has {listed}, and no "
        "[build] python_mirror in the host config lets uv fetch another. Install it on the "
        f"host, change {where}, or set python_mirror", code=ErrorCode.INVALID)


# ---- the plan ------------------------------------------------------------------------------

def plan(release: Path, manifest: dict[str, Any], *, cache: Path, config: BuildConfig,
         pythons: list[tuple[str, str]] | None = None) -> BuildPlan | None:
    """The build of ``release`` (its files as shipped), or None when there is nothing to
    build (no build command and no file that calls for one)."""
    venv = release / ".venv"
    tmp_home = "/tmp"
    env = {"HOME": tmp_home, "LANG": "C.UTF-8", "TMPDIR": str(cache / "tmp"),
           "PATH": f"{venv}/bin:{release}/node_modules/.bin:"
                   "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    command = ((manifest.get("build") or {}).get("command"))
    if command:  # it may install from either index: both are reachable, nothing else
        env.update(_python_env(release, cache, config))
        env.update(_node_env(cache, config))
        env["PATH"] = f"{env['PATH']}:{os.path.dirname(uv_binary())}"  # uv, for the command
        return BuildPlan([Step("[build] command", str(command))], env,
                         egress(config, python=True, node=True), [uv_binary()],
                         kinds=["command"])
    steps: list[Step] = []
    kinds: list[str] = []
    tools: list[str] = []
    python_desc = None
    has_lock = (release / "uv.lock").is_file()
    has_project = (release / "pyproject.toml").is_file()
    has_reqs = (release / "requirements.txt").is_file()
    if has_lock or has_project or has_reqs:
        uv = uv_binary()
        tools.append(uv)
        interpreter, python_desc = choose_python(release, config, pythons)
        env.update(_python_env(release, cache, config))
        py = shlex.quote(interpreter)
        if has_lock or has_project:
            frozen = "--frozen " if has_lock else ""
            steps.append(Step(
                f"uv sync {frozen}(Python {python_desc.split(' ')[0]})",
                f"{shlex.quote(uv)} sync {frozen}--no-install-project --no-dev --python {py}"))
            kinds.append("uv")
        else:
            steps.append(Step(f"virtualenv (Python {python_desc.split(' ')[0]})",
                              f"{shlex.quote(uv)} venv --python {py} {shlex.quote(str(venv))}"))
            steps.append(Step("install requirements.txt",
                              f"{shlex.quote(uv)} pip install --python "
                              f"{shlex.quote(str(venv / 'bin' / 'python'))} -r requirements.txt"))
            kinds.append("pip")
    if (release / "package.json").is_file():
        env.update(_node_env(cache, config))
        locked = any((release / f).is_file()
                     for f in ("package-lock.json", "npm-shrinkwrap.json"))
        steps.append(Step("npm ci" if locked else "npm install",
                          "npm ci" if locked else "npm install"))
        kinds.append("npm")
    if not steps:
        return None
    return BuildPlan(steps, env, egress(config, python="npm" not in kinds or len(kinds) > 1,
                                        node="npm" in kinds),
                     tools, python_desc, kinds)


def _python_env(release: Path, cache: Path, config: BuildConfig) -> dict[str, str]:
    env = {
        "UV_CACHE_DIR": str(cache / "uv"),
        "UV_PROJECT_ENVIRONMENT": str(release / ".venv"),
        "UV_LINK_MODE": "copy",  # nothing in a release shares an inode with the cache
        "UV_DEFAULT_INDEX": config.python_index,
        "UV_NO_PROGRESS": "1",
        "UV_SYSTEM_CERTS": "1",  # the host's trust store: an operator's proxy CA is trusted
        "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        # a fetched Python goes into the release, which its processes see (the cache is the
        # build's only)
        "UV_PYTHON_INSTALL_DIR": str(release / ".python"),
        "UV_PYTHON_DOWNLOADS": "automatic" if config.python_mirror else "never",
        "UV_PYTHON_PREFERENCE": "managed" if config.python_mirror else "only-system",
        "PIP_INDEX_URL": config.python_index,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if config.python_mirror:
        env["UV_PYTHON_INSTALL_MIRROR"] = config.python_mirror
    return env


def _node_env(cache: Path, config: BuildConfig) -> dict[str, str]:
    return {
        "npm_config_cache": str(cache / "npm"),
        "npm_config_registry": config.npm_registry,
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        "npm_config_progress": "false",
    }
