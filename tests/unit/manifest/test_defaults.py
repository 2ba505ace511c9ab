"""A Procfile without corral.toml, the [build] and [release] sections, and `corral init`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from manifest_support import MINIMAL, located, only_problem, problems_of, write_app

from corral.cli._init import add_parsers, cmd_init
from corral.errors import ManifestError
from corral.manifest import Manifest, ResolvedManifest, load
from corral.manifest._load import default_app_name
from corral.protocol import KERNEL_SECTIONS

HEROKU = """\
web: gunicorn app:app --bind 0.0.0.0:$PORT
worker: python worker.py
release: python manage.py migrate
"""


def procfile_app(directory: Path, procfile: str = HEROKU) -> Path:
    """Write only a Procfile into ``directory``; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Procfile").write_text(dedent(procfile))
    return directory


def problems_without_toml(directory: Path, **overrides: Any) -> list[str]:
    """Load a Procfile-only ``directory`` expecting a ManifestError; return its problems."""
    with pytest.raises(ManifestError) as caught:
        load(directory, **overrides)
    assert caught.value.file == str((directory / "Procfile").resolve())
    problems: list[str] = caught.value.problems
    return problems


def comparable(resolved: ResolvedManifest) -> dict[str, Any]:
    """The resolved manifest as JSON, without the file it was read from."""
    data = resolved.as_json()
    data["resolved"].pop("file")
    return data


def init(directory: Path, name: str | None = None) -> int:
    return cmd_init(argparse.Namespace(directory=str(directory), name=name))


# --- the kernel's sections ---------------------------------------------------------------------


def test_kernel_sections_are_the_models() -> None:
    """The protocol's KERNEL_SECTIONS (which no driver may own, and which the loader validates
    itself) are exactly the sections of the kernel's model, [build] and [release] included."""
    assert set(KERNEL_SECTIONS) == set(Manifest.model_fields)


# --- a Procfile and no corral.toml -------------------------------------------------------------


def test_procfile_alone_loads_with_the_defaults(tmp_path: Path) -> None:
    """The app is named after its directory, `web` gets port 5000 as `http`, `release:` is the
    release command, and nothing else is set."""
    app = procfile_app(tmp_path / "shop")
    resolved = load(app)
    data = resolved.as_json()
    assert data["app"] == {"name": "shop"}
    assert data["ports"] == {"http": 5000}
    assert data["paths"] == {}
    assert data["processes"]["web"]["port"] == "http"
    assert data["processes"]["worker"]["port"] is None
    assert data["build"] == {"command": None, "timeout": None}
    assert data["release"] == {"command": "python manage.py migrate", "timeout": 600.0}
    assert set(data) == {"app", "processes", "ports", "paths", "build", "release", "placement",
                         "resolved"}
    assert resolved.instances() == [
        ("web", 1, "gunicorn app:app --bind 0.0.0.0:$PORT", 5000),
        ("worker", 1, "python worker.py", None),
    ]
    assert resolved.file == app.resolve() / "Procfile"
    assert resolved.directory == app.resolve()


def test_procfile_without_web_has_no_port(tmp_path: Path) -> None:
    """Without a `web` process no port is claimed."""
    resolved = load(procfile_app(tmp_path / "jobs", "worker: python worker.py\n"))
    assert resolved.manifest.ports == {}
    assert resolved.instances() == [("worker", 1, "python worker.py", None)]


def test_defaults_take_overrides(tmp_path: Path) -> None:
    """--set and --offset move the default port, as for a corral.toml."""
    app = procfile_app(tmp_path / "shop")
    assert load(app, set_=["ports.http=6000"]).manifest.ports == {"http": 6000}
    assert load(app, offset=100).instances()[0].port == 5100


def test_a_default_out_of_range_names_the_default(tmp_path: Path) -> None:
    """A problem with a default value says it is one (it has no line)."""
    app = procfile_app(tmp_path / "shop")
    (problem,) = problems_without_toml(app, offset=70000)
    assert problem.startswith(
        f"{app.resolve() / 'Procfile'} (default without corral.toml): ports.http: "
    )
    assert "5000 + --offset 70000" in problem


def test_a_procfile_path_is_its_directory(tmp_path: Path) -> None:
    """load() given the Procfile itself loads its directory."""
    app = procfile_app(tmp_path / "shop")
    assert load(app / "Procfile").manifest.app.name == "shop"


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("shop", "shop"),
        ("My_Shop 2", "my-shop-2"),
        ("python-getting-started", "python-getting-started"),
        ("2048-game", "game"),
        ("--Shop--", "shop"),
        ("café.au.lait", "caf-au-lait"),
        ("a" * 70, "a" * 63),
        ("a" * 62 + "-b", "a" * 62),
        ("x", "x"),
    ],
)
def test_app_name_from_the_directory(tmp_path: Path, directory: str, name: str) -> None:
    """The directory's name made into a DNS label: lowercase, other characters '-', from the
    first letter, cut to 63 and without a trailing '-'."""
    assert default_app_name(Path(directory)) == name
    assert load(procfile_app(tmp_path / directory)).manifest.app.name == name


@pytest.mark.parametrize("directory", ["123", "___", "2-4"])
def test_no_app_name_from_the_directory(tmp_path: Path, directory: str) -> None:
    """A directory whose name has no letter is a clear error naming it and the fixes; a name
    given with --set is enough."""
    app = procfile_app(tmp_path / directory)
    (problem,) = problems_without_toml(app)
    assert problem.startswith(f"{app.resolve()}: cannot make an app name")
    assert "corral init --name NAME" in problem and "corral.toml" in problem
    assert load(app, set_=["app.name=shop"]).manifest.app.name == "shop"


def test_bad_procfile_line_without_corral_toml(tmp_path: Path) -> None:
    """A Procfile line that does not parse is located at its line (exit 2 at the CLI)."""
    app = procfile_app(tmp_path / "shop", "web: gunicorn app:app\n\nworker python w.py\n")
    assert problems_without_toml(app) == [
        f'{app.resolve() / "Procfile"}:3: expected "name: command", e.g. "web: python app.py"'
    ]


def test_bad_process_name_without_corral_toml(tmp_path: Path) -> None:
    """A bad name from the Procfile is located at its Procfile line."""
    app = procfile_app(tmp_path / "shop", "web: a\nWorker: b\n")
    (problem,) = problems_without_toml(app)
    assert problem.startswith(f"{app.resolve() / 'Procfile'}:2: processes.Worker: ")


def test_neither_file(tmp_path: Path) -> None:
    """A directory with neither file keeps the error naming corral.toml, and says that a
    Procfile alone is enough."""
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(
        f"{tmp_path.resolve() / 'corral.toml'}: no such file (expected the app's corral.toml "
        "there); a Procfile alone is enough"
    )


def test_corral_toml_wins_over_defaults(tmp_path: Path) -> None:
    """With a corral.toml beside the Procfile nothing is assumed: no default port or name."""
    app = write_app(tmp_path / "shop", '[app]\nname = "other"\n', procfile="web: a\n")
    resolved = load(app)
    assert resolved.manifest.app.name == "other"
    assert resolved.manifest.ports == {}
    assert resolved.manifest.processes["web"].port is None


# --- the release phase ---------------------------------------------------------------------


def test_release_line_is_the_release_command(tmp_path: Path) -> None:
    """`release:` in the Procfile is [release] command, never a process; a [release] timeout
    in corral.toml applies to it."""
    app = write_app(
        tmp_path, MINIMAL + '[release]\ntimeout = "2m"\n', procfile="release: ./migrate\nweb: a\n"
    )
    manifest = load(app).manifest
    assert manifest.release.command == "./migrate"
    assert manifest.release.timeout == 120.0
    assert list(manifest.processes) == ["web"]


def test_release_defined_twice(tmp_path: Path) -> None:
    """A release command in both files is one problem naming both places."""
    app = write_app(
        tmp_path, MINIMAL + '\n[release]\ncommand = "./migrate"\n', procfile="web: a\nrelease: b\n"
    )
    assert only_problem(app) == (
        f"{app.resolve() / 'Procfile'}:2: release.command: defined both in Procfile (release:) "
        f"and in {app.resolve() / 'corral.toml'}:5; define the release command in one place"
    )


def test_release_from_procfile_located_there(tmp_path: Path) -> None:
    """A problem with the Procfile's release command is located at its line."""
    app = write_app(tmp_path, "release = 3\n" + MINIMAL, procfile="web: a\nrelease: b\n")
    problem = only_problem(app)
    assert problem.startswith(located(app, 1, "release"))
    assert "expected a table" in problem


# --- [build] and [release] -----------------------------------------------------------------


def test_build_and_release_defaults(tmp_path: Path) -> None:
    """Without the sections: no commands; the host's build timeout (None), 10 minutes."""
    manifest = load(write_app(tmp_path, MINIMAL)).manifest
    assert (manifest.build.command, manifest.build.timeout) == (None, None)
    assert (manifest.release.command, manifest.release.timeout) == (None, 600.0)


def test_build_and_release_given(tmp_path: Path) -> None:
    """Commands are strings, timeouts durations, in the resolved manifest in seconds; they
    survive the JSON round trip."""
    app = write_app(
        tmp_path,
        MINIMAL
        + '[build]\ncommand = "make"\ntimeout = "1h"\n'
        + '[release]\ncommand = "./migrate"\ntimeout = 30\n',
    )
    resolved = load(app)
    data = resolved.as_json()
    assert data["build"] == {"command": "make", "timeout": 3600.0}
    assert data["release"] == {"command": "./migrate", "timeout": 30.0}
    assert ResolvedManifest.from_json(json.loads(json.dumps(data))) == resolved


@pytest.mark.parametrize(
    ("section", "line", "field", "expected"),
    [
        ("[build]\ncommand = 5\n", 4, "build.command", "expected a non-empty string, got 5"),
        ('[build]\ncommand = ""\n', 4, "build.command", 'expected a non-empty string, got ""'),
        ('[build]\ntimeout = "soon"\n', 4, "build.timeout", 'expected a duration such as'),
        ("[build]\ntimeout = 0\n", 4, "build.timeout", "longer than 0, got 0"),
        ("[build]\ncmd = 1\n", 4, "build.cmd", "unknown key (expected one of: command, timeout)"),
        ('[build.command]\nshell = "make"\n', 3, "build.command", "expected a non-empty string"),
        ("[release]\ncommand = []\n", 4, "release.command", "expected a non-empty string"),
        ('[release]\ntimeout = "-1m"\n', 4, "release.timeout", "expected a duration such as"),
        ('[release]\ntimout = "1m"\n', 4, "release.timout", "did you mean 'timeout'"),
    ],
)
def test_bad_build_and_release(
    tmp_path: Path, section: str, line: int, field: str, expected: str
) -> None:
    """Bad values and unknown keys in [build] and [release] are located by file and line."""
    app = write_app(tmp_path, MINIMAL + section)
    problem = only_problem(app)
    assert problem.startswith(located(app, line, field)), problem
    assert expected in problem, problem


# --- corral init ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "procfile",
    [
        HEROKU,
        "worker: python worker.py\n",
        "release: ./migrate\n",
        'web: printf "a\tb" # tab\nodd: echo "\\\\" \'q\' \x7f\n',  # escaped in comments
    ],
)
def test_init_writes_what_the_defaults_mean(
    tmp_path: Path, procfile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The written corral.toml loads to the same resolved manifest as the Procfile alone, and
    init prints what it wrote."""
    app = procfile_app(tmp_path / "shop", procfile)
    before = comparable(load(app))
    assert init(app) == 0
    written = (app / "corral.toml").read_text()
    assert capsys.readouterr().out.endswith(written)
    after = load(app)
    assert after.file == app.resolve() / "corral.toml"
    assert comparable(after) == before
    assert "# [build]" in written and "# [paths]" in written and "# [limits]" in written
    assert sorted(p.name for p in app.iterdir()) == ["Procfile", "corral.toml"]  # no temporary


def test_init_with_a_name(tmp_path: Path) -> None:
    """--name names an app whose directory gives no name."""
    app = procfile_app(tmp_path / "123")
    assert init(app, name="shop") == 0
    assert load(app).manifest.app.name == "shop"


def test_init_refuses_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --name that is not an app name: exit 2, nothing written."""
    app = procfile_app(tmp_path / "shop")
    assert init(app, name="Shop!") == 2
    assert "--name: expected an app name like a DNS label" in capsys.readouterr().err
    assert not (app / "corral.toml").exists()


def test_init_refuses_an_existing_corral_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing corral.toml is left as it is: exit 2."""
    app = write_app(tmp_path / "shop", MINIMAL, procfile="web: a\n")
    assert init(app) == 2
    assert "already exists" in capsys.readouterr().err
    assert (app / "corral.toml").read_text() == MINIMAL


def test_init_refuses_a_directory_without_procfile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a Procfile there is nothing to write down: exit 2, nothing written."""
    assert init(tmp_path) == 2
    assert "no Procfile" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_bad_procfile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Procfile with problems: they are printed, located, and nothing is written."""
    app = procfile_app(tmp_path / "shop", "web python app.py\n")
    assert init(app) == 2
    assert f"corral: {app.resolve() / 'Procfile'}:1: expected" in capsys.readouterr().err
    assert not (app / "corral.toml").exists()


def test_init_parser(tmp_path: Path) -> None:
    """`corral init [DIR] [--name NAME]` as registered by add_parsers."""
    parser = argparse.ArgumentParser(prog="corral")
    add_parsers(parser.add_subparsers(dest="command"))
    app = procfile_app(tmp_path / "shop")
    ns = parser.parse_args(["init", str(app), "--name", "boutique"])
    assert (ns.command, ns.directory, ns.name) == ("init", str(app), "boutique")
    assert cmd_init(ns) == 0
    assert load(app).manifest.app.name == "boutique"
    assert parser.parse_args(["init"]).directory == "."
