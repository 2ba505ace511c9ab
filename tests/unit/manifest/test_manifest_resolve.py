"""A valid manifest resolves: overrides, offset, units, absolute paths, JSON, instances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from manifest_support import FULL, MINIMAL, load_ok, write_app

from corral.errors import ManifestError
from corral.manifest import ResolvedManifest, schema
from corral.units import UnitError, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[3]


def test_full_example_resolves(tmp_path: Path) -> None:
    """The architecture's example loads; units become bytes and seconds, paths absolute."""
    resolved = load_ok(write_app(tmp_path, FULL))
    data = resolved.as_json()
    root = str(tmp_path.resolve())
    assert data["limits"] == {"processes": 64, "memory": 512 * 1024**2, "cpu": 1.5}
    assert data["paths"]["static"] == {"path": f"{root}/static", "mode": "ro", "create": False}
    assert data["paths"]["data"]["path"] == "/var/lib/shop"
    file_sink = data["logs"]["sinks"][0]
    assert file_sink["path"] == f"{root}/log/shop.log"
    assert file_sink["rotate"] == 100 * 1024**2 and file_sink["rotate_every"] == 86400.0
    assert data["logs"]["sinks"][3]["batch"] == {"lines": 10, "bytes": 1024**2, "interval": 0.25}
    assert data["cron"]["cleanup"]["timeout"] == 5400.0
    assert data["cron"]["cleanup"]["jitter"] == 30.0
    assert data["cron"]["cleanup"]["kill_grace"] == 30.0
    assert data["cron"]["cleanup"]["backfill"] == 3
    assert data["lb"]["process"] == "web"  # the one process with a port
    assert data["lb"]["idle"] == 300.0  # on-demand default
    assert data["lb"]["policy"] == {"exec": ["node", "policy.js"], "deadline": 0.005,
                                    "fallback": "p2c"}  # the lb's defaults, filled by the lb
    assert data["network"]["egress"] == [
        {"rule": "10.0.0.5/32:5432", "network": "10.0.0.5/32", "host": None, "port": 5432},
        {"rule": "api.example.com:443", "network": None, "host": "api.example.com", "port": 443},
        {"rule": "[2001:db8::/32]:443", "network": "2001:db8::/32", "host": None, "port": 443},
        {"rule": "10.0.0.0/8", "network": "10.0.0.0/8", "host": None, "port": None},
        {"rule": "::1", "network": "::1/128", "host": None, "port": None},
    ]
    assert data["resolved"] == {
        "directory": root,
        "file": f"{root}/corral.toml",
        "offset": 0,
        "env": {},
        # what the lb asked the deploy to claim, and its on-demand process: the kernel reads
        # these, never the [lb] table
        "claims": [
            {"kind": "lbname", "key": "shop.example.test", "value": {"app": "shop"}},
            {"kind": "port", "key": "80", "value": {"app": "shop", "name": "lb"}},
        ],
        "on_demand": ["web"],
    }
    assert json.loads(json.dumps(data)) == data  # plain JSON


def test_instances(tmp_path: Path) -> None:
    """instances() lists (process, index from 1, command, port number or None)."""
    resolved = load_ok(write_app(tmp_path, FULL), set_=["processes.worker.instances=2"])
    assert resolved.instances() == [
        ("web", 1, "gunicorn shop:app --bind 0.0.0.0:$PORT", 8000),
        ("web", 2, "gunicorn shop:app --bind 0.0.0.0:$PORT", 8000),
        ("worker", 1, "python worker.py", None),
        ("worker", 2, "python worker.py", None),
    ]
    assert resolved.instances()[0].port == 8000


def test_set_overrides(tmp_path: Path) -> None:
    """--set parses TOML values (ints, sizes as strings, tables) and falls back to strings."""
    resolved = load_ok(
        write_app(tmp_path, FULL),
        set_=[
            "ports.http=9000",
            "limits.memory=1GiB",
            "processes.web.instances=3",
            "processes.web.command=python -m http.server $PORT",
            'lb.policy="least-conn"',
            "network.egress=[]",
            "logs.sinks.0.keep=2",
            'paths.cache={ path = "cache", mode = "rw" }',
        ],
    )
    m = resolved.manifest
    sections = resolved.sections  # checked and normalized by the drivers that own them
    assert m.ports["http"] == 9000
    assert sections["limits"]["memory"] == 1024**3
    assert m.processes["web"].instances == 3
    assert m.processes["web"].command == "python -m http.server $PORT"
    assert sections["lb"]["policy"] == "least-conn"
    assert sections["network"]["egress"] == []
    assert sections["logs"]["sinks"][0]["keep"] == 2
    assert m.paths["cache"].path == str(tmp_path.resolve() / "cache")


def test_set_then_offset(tmp_path: Path) -> None:
    """--offset applies after --set, to every [ports] entry and to lb.frontend."""
    resolved = load_ok(write_app(tmp_path, FULL), set_=["ports.http=9000"], offset=100)
    assert resolved.manifest.ports == {"http": 9100, "metrics": 9200}
    assert resolved.sections["lb"]["frontend"] == 180
    assert resolved.as_json()["resolved"]["offset"] == 100
    assert {"kind": "port", "key": "180", "value": {"app": "shop", "name": "lb"}} in [
        c.model_dump() for c in resolved.claims]  # the lb's claim, moved by --offset too
    assert resolved.instances()[0].port == 9100


def test_env_overrides(tmp_path: Path) -> None:
    """--env values are kept, last one wins."""
    resolved = load_ok(
        write_app(tmp_path, MINIMAL), env=["DATABASE_URL=postgres://db/shop", "A=1", "A=2=3"]
    )
    assert resolved.env_overrides == {"DATABASE_URL": "postgres://db/shop", "A": "2=3"}
    assert resolved.as_json()["resolved"]["env"] == resolved.env_overrides


def test_load_accepts_the_file_itself(tmp_path: Path) -> None:
    """load() takes the app directory or the corral.toml path."""
    app = write_app(tmp_path, MINIMAL)
    assert load_ok(app / "corral.toml").directory == app.resolve()


def test_procfile(tmp_path: Path) -> None:
    """Procfile processes join [processes]; `web` gets the `http` port by convention."""
    app = write_app(
        tmp_path,
        MINIMAL + '[ports]\nhttp = 8000\n[processes]\nsidecar = { command = "s" }\n',
        procfile="# Heroku style\nweb: gunicorn app:app\nworker:python worker.py\n",
    )
    resolved = load_ok(app, set_=["processes.worker.instances=2"])
    assert resolved.instances() == [
        ("sidecar", 1, "s", None),
        ("web", 1, "gunicorn app:app", 8000),
        ("worker", 1, "python worker.py", None),
        ("worker", 2, "python worker.py", None),
    ]


def test_json_round_trip(tmp_path: Path) -> None:
    """from_json(as_json()) rebuilds the same resolved manifest (e.g. from the ledger)."""
    resolved = load_ok(write_app(tmp_path, FULL), offset=10, env=["A=b"])
    again = ResolvedManifest.from_json(json.loads(json.dumps(resolved.as_json())))
    assert again == resolved
    assert again.as_json() == resolved.as_json()


def test_from_json_rejects_bad_data(tmp_path: Path) -> None:
    """A damaged resolved manifest is a ManifestError naming the field."""
    data = load_ok(write_app(tmp_path, FULL)).as_json()
    data["ports"]["http"] = "x"
    with pytest.raises(ManifestError, match=r"ports\.http: expected an integer 1\.\.65535"):
        ResolvedManifest.from_json(data)


def test_write_json(tmp_path: Path) -> None:
    """write_json writes as_json() atomically, readable by everyone."""
    resolved = load_ok(write_app(tmp_path / "app", FULL))
    target = resolved.write_json(tmp_path / "run" / "manifest.json")
    assert json.loads(target.read_text()) == resolved.as_json()
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_schema() -> None:
    """The JSON Schema covers every section and forbids unknown keys."""
    document = schema()
    json.dumps(document)
    assert set(document["properties"]) == {
        "app",
        "processes",
        "ports",
        "paths",
        "build",
        "release",
        "placement",
        "network",
        "logs",
        "limits",
        "lb",
        "cron",
    }
    assert document["additionalProperties"] is False
    assert document["required"] == ["app"]


def test_example_hello_loads() -> None:
    """examples/hello/corral.toml is valid."""
    resolved = load_ok(REPO / "examples" / "hello")
    assert resolved.manifest.app.name == "hello"
    assert resolved.instances() == [("web", 1, "python3 app.py", 8080)]
    assert resolved.manifest.paths["data"].path == str(REPO / "examples" / "hello" / "data")
    assert resolved.manifest.paths["data"].mode == "rw"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("512MiB", 512 * 2**20),
        ("1GiB", 2**30),
        ("100MB", 10**8),
        ("512M", 512 * 2**20),
        ("1.5KiB", 1536),
        ("10 kB", 10_000),
        ("7", 7),
        ("3b", 3),
        ("2TiB", 2 * 2**40),
    ],
)
def test_sizes(text: object, size: int) -> None:
    """Sizes: binary and decimal units, K/M/G/T as binary, plain integers as bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600.0),
        ("2s", 2.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        (3, 3.0),
        (0.25, 0.25),
        ("1d", 86400.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    """Durations: ms, s, m, h, d, combined; plain numbers are seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "1y", "-1s", True, None, "1s2", float("nan")])
def test_bad_durations(text: object) -> None:
    """Anything else is a UnitError saying what a duration looks like."""
    with pytest.raises(UnitError, match="expected a duration such as"):
        parse_duration(text)


def test_string_number_is_not_a_duration() -> None:
    """A quoted number without a unit is ambiguous and refused; write 10 or "10s"."""
    with pytest.raises(UnitError):
        parse_duration("10")
