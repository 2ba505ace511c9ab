"""Shared test support for the manifest tests: write an app directory, catch its problems."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from textwrap import dedent

import pytest

from corral.errors import ManifestError
from corral.manifest import ResolvedManifest, load

MINIMAL = """\
[app]
name = "shop"
"""

# The architecture's example, extended to use every section and key style once.
FULL = """\
[app]
name = "shop"

[processes]
web    = { command = "gunicorn shop:app --bind 0.0.0.0:$PORT", instances = 2, port = "http" }
worker = { command = "python worker.py" }

[ports]
http = 8000
metrics = 9100

[paths]
data   = { path = "/var/lib/shop", mode = "rw", create = true }
static = { path = "static", mode = "ro" }

[network]
interfaces = ["eth0"]
egress = ["10.0.0.5/32:5432", "api.example.com:443", "[2001:db8::/32]:443", "10.0.0.0/8", "::1"]

[[logs.sinks]]
type = "file"
path = "log/shop.log"
rotate = "100MiB"
keep = 5
rotate_every = "1d"

[[logs.sinks]]
type = "syslog"
address = "udp://127.0.0.1:514"

[[logs.sinks]]
type = "journald"

[[logs.sinks]]
type = "http"
url = "http://loki:3100/loki/api/v1/push"
headers = { X-Org = "a" }
batch = { lines = 10, interval = "250ms" }

[limits]
processes = 64
memory = "512MiB"
cpu = 1.5

[lb]
name = "shop.example.test"
frontend = 80
policy = { exec = ["node", "policy.js"] }
health = { http = "/healthz", interval = "2s" }
activation = "on-demand"

[cron.cleanup]
schedule = "*/15 * * * *"
timezone = "Europe/Paris"
command = "python manage.py cleanup"
overlap = "forbid"
missed = "once"
timeout = "1h30m"
kill_grace = "30s"
jitter = "30s"

[cron.cleanup.alert]
command = "notify-team"
on = ["failure", "missed", "no-success"]
no_success_within = "1d"
"""


def write_app(directory: Path, toml: str, procfile: str | None = None) -> Path:
    """Write corral.toml (and a Procfile) into ``directory``; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corral.toml").write_text(dedent(toml))
    if procfile is not None:
        (directory / "Procfile").write_text(dedent(procfile))
    return directory


def problems_of(
    directory: Path,
    *,
    set_: Sequence[str] = (),
    offset: int = 0,
    env: Sequence[str] = (),
) -> list[str]:
    """Load ``directory`` expecting a ManifestError; return its problems."""
    with pytest.raises(ManifestError) as caught:
        load(directory, set_=set_, offset=offset, env=env)
    assert caught.value.problems, "a ManifestError must list at least one problem"
    assert caught.value.file == str((directory / "corral.toml").resolve())
    problems: list[str] = caught.value.problems
    return problems


def only_problem(directory: Path, **overrides: object) -> str:
    """Load ``directory`` expecting exactly one problem; return it."""
    problems = problems_of(directory, **overrides)  # type: ignore[arg-type]
    assert len(problems) == 1, problems
    return problems[0]


def located(directory: Path, line: int, field: str) -> str:
    """Return the prefix a problem at ``line`` of corral.toml about ``field`` starts with."""
    return f"{(directory / 'corral.toml').resolve()}:{line}: {field}: "


def load_ok(directory: Path, **overrides: object) -> ResolvedManifest:
    """Load ``directory``, which must be valid."""
    return load(directory, **overrides)  # type: ignore[arg-type]
