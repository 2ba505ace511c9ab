"""Fuzzing: the line locator against random TOML, and load() against random manifests."""

from __future__ import annotations

import re
import string
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_support import FULL as FULL_TEXT
from manifest_support import write_app
from toml_writer import TomlWriter

from corral.errors import ManifestError
from corral.manifest import ResolvedManifest, load
from corral.manifest._locate import field_lines

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys a manifest uses, so random documents reach deep into validation, plus strangers.
MANIFEST_KEYS = [
    "app", "name", "processes", "web", "worker", "command", "instances", "port", "ports",
    "http", "metrics", "paths", "data", "path", "mode", "create", "network", "interfaces",
    "egress", "logs", "sinks", "type", "rotate", "keep", "compress", "rotate_every",
    "address", "facility", "format", "url", "headers", "batch", "limits", "memory", "cpu",
    "lb", "frontend", "policy", "exec", "health", "interval", "timeout", "rise", "fall",
    "activation", "idle", "plane", "cron", "cleanup", "schedule", "timezone", "overlap",
    "missed", "jitter", "alert", "on", "tcp", "process", "lines", "bytes",
]  # fmt: skip
MANIFEST_STRINGS = [
    "shop", "http", "rw", "ro", "file", "syslog", "journald", "http", "loki", "512MiB", "1GiB",
    "10m", "1h30m", "500ms", "2x", "UTC", "Europe/Paris", "Mars/Olympus", "udp://127.0.0.1:514",
    "10.0.0.5/32:5432", "api.example.com:443", "[2001:db8::/32]:443", "p2c", "/healthz",
    "on-demand", "always", "nft", "proxy", "tcp", "forbid", "once", "failure", "no-success",
    "@daily", "*/5 * * * *", "data", "http://loki:3100/x", "", "-", "1e9GiB", "99999999999d",
]  # fmt: skip

keys = st.one_of(
    st.sampled_from(MANIFEST_KEYS),
    st.text(alphabet=string.ascii_letters + "_-", min_size=1, max_size=8),
    st.text(max_size=6),  # quoted keys: spaces, dots, quotes, unicode, empty
)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=70000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(MANIFEST_STRINGS),
    st.text(max_size=12),
    st.dates(),
    st.datetimes(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)
documents = st.dictionaries(keys, values, max_size=6)


@FUZZ
@given(document=documents, style=st.randoms(use_true_random=False))
def test_locator_finds_every_field(document: dict[str, Any], style: Any) -> None:
    """field_lines() gives the line the writer put each key and element on, in every style."""
    writer = TomlWriter(lambda question: style.random() < 0.5)
    text = writer.document(document)
    parsed = tomllib.loads(text)
    assert parsed == document  # the writer is right, so its lines are the truth
    lines = field_lines(text)
    for path, line in writer.lines.items():
        assert lines.get(path) == line, (path, line, lines.get(path), text)


LOCATED = re.compile(r"^(?P<file>/\S*?)(:\d+(:\d+)?| \((--set|--env) .*?\)): \S")


def _assert_located(error: ManifestError, directory: Path) -> None:
    root = str(directory.resolve())
    for problem in error.problems:
        match = LOCATED.match(problem)
        assert match is not None, problem
        assert match.group("file") in {f"{root}/corral.toml", f"{root}/Procfile"}, problem


def _load(text: str | bytes, **overrides: Any) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        file = directory / "corral.toml"
        if isinstance(text, bytes):
            file.write_bytes(text)
        else:
            file.write_text(text)
        try:
            resolved = load(directory, **overrides)
        except ManifestError as exc:
            _assert_located(exc, directory)
        else:
            assert isinstance(resolved, ResolvedManifest)
            resolved.instances()
            assert ResolvedManifest.from_json(resolved.as_json()) == resolved


@FUZZ
@given(document=documents, style=st.randoms(use_true_random=False))
def test_random_documents(document: dict[str, Any], style: Any) -> None:
    """Any TOML document: a located ManifestError or a manifest, never another exception."""
    _load(TomlWriter(lambda question: style.random() < 0.5).document(document))


FULL: dict[str, Any] = tomllib.loads(FULL_TEXT)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for name, item in value.items():
            found += _paths(item, (*prefix, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """The full example with a few fields replaced, removed or added."""
    import copy

    document = copy.deepcopy(FULL)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        parent: Any = document
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(keys)] = draw(values)
    return document


@FUZZ
@given(document=mutated_manifests(), style=st.randoms(use_true_random=False))
def test_mutated_manifests(document: dict[str, Any], style: Any) -> None:
    """The full example, damaged at random: clear errors or success, nothing else."""
    _load(TomlWriter(lambda question: style.random() < 0.5).document(document))


override_items = st.one_of(
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(
            [
                "ports.http",
                "limits.memory",
                "processes.web.instances",
                "lb",
                "app",
                "logs.sinks.0.path",
                "logs.sinks.9",
                "x.y",
                'a."b c"',
                "cron.x.timezone",
            ]
        ),
        st.one_of(st.sampled_from(MANIFEST_STRINGS), st.text(max_size=10), st.integers().map(str)),
    ),
    st.text(max_size=20),
)


@FUZZ
@given(
    sets=st.lists(override_items, max_size=3),
    envs=st.lists(st.text(max_size=12), max_size=3),
    offset=st.integers(min_value=-70000, max_value=70000),
)
def test_random_overrides(sets: list[str], envs: list[str], offset: int) -> None:
    """Random --set, --env and --offset on a valid manifest: clear errors or success."""
    _load(FULL_TEXT, set_=sets, env=envs, offset=offset)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_text(text: str | bytes) -> None:
    """Arbitrary text or bytes: a located ManifestError (or, rarely, a manifest)."""
    _load(text)


def test_procfile_problems_are_located(tmp_path: Path) -> None:
    """The located-format check also covers Procfile problems."""
    app = write_app(tmp_path, '[app]\nname = "x"\n', procfile="bad line\n")
    try:
        load(app)
    except ManifestError as exc:
        _assert_located(exc, app)
    else:
        raise AssertionError("expected a ManifestError")
