"""Load ``corral.toml`` (and a Procfile), apply overrides, validate, and resolve it."""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from corral.errors import ManifestError
from corral.manifest._locate import Location, Path_, field_lines, format_path
from corral.manifest._model import Balancer, Manifest, render
from corral.manifest._overrides import (
    OverrideError,
    apply_set,
    parse_env,
    parse_procfile,
    parse_set,
)
from corral.manifest._problems import describe

MANIFEST_FILE = "corral.toml"
PROCFILE = "Procfile"
PROCFILE_WEB_PORT = "http"  # Heroku's convention: the Procfile's `web` process receives $PORT
DEFAULT_IDLE = 300.0  # seconds an on-demand app may stay idle before it is stopped

_SYNTAX_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


class InstanceSlot(NamedTuple):
    """One instance the manifest asks for: process, 1-based index, command and port number."""

    process: str
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: InstanceSpec.index
    command: str
    port: int | None


@dataclass(frozen=True)
class ResolvedManifest:
    """A validated manifest with its overrides applied: what is claimed, enforced and handed
    to the app."""

    manifest: Manifest
    directory: Path
    file: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    offset: int = 0

    def as_json(self) -> dict[str, Any]:
        """Return the plain-JSON form: sizes in bytes, durations in seconds, paths absolute."""
        data = self.manifest.model_dump(mode="json")
        data["resolved"] = {
            "directory": str(self.directory),
            "file": str(self.file),
            "offset": self.offset,
            "env": dict(self.env_overrides),
        }
        return data

    def instances(self) -> list[InstanceSlot]:
        """Return every instance to run, in manifest order, indexes starting at 1."""
        ports = self.manifest.ports
        return [
            InstanceSlot(
                name, index, process.command, ports[process.port] if process.port else None
            )
            for name, process in self.manifest.processes.items()
            for index in range(1, process.instances + 1)
        ]

    def write_json(self, path: Path) -> Path:
        """Write ``as_json()`` to ``path`` atomically (the file $CORRAL_MANIFEST names)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.as_json(), out, indent=2, sort_keys=False)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)  # the app's user reads it, nobody writes it
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResolvedManifest:
        """Rebuild a ResolvedManifest from ``as_json()`` output (e.g. read from the ledger)."""
        data = dict(data)
        meta = data.pop("resolved", None)
        if not isinstance(meta, dict) or not isinstance(meta.get("directory"), str):
            raise ManifestError(["resolved manifest: expected a 'resolved' table with 'directory'"])
        file = str(meta.get("file", "<resolved manifest>"))
        try:
            manifest = Manifest.model_validate(data, context={"offset": 0})
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                path, message = describe(error, data)
                problems.append(f"resolved manifest of {file}: {format_path(path)}: {message}")
            raise ManifestError(problems, file=file) from None
        return cls(
            manifest=manifest,
            directory=Path(meta["directory"]),
            file=Path(file),
            env_overrides={str(k): str(v) for k, v in dict(meta.get("env", {})).items()},
            offset=int(meta.get("offset", 0)),
        )


@dataclass
class _Problems:
    """Problems found so far, each with where it was written."""

    file: str
    locations: dict[Path_, Location] = field(default_factory=dict)
    found: list[tuple[Location, str]] = field(default_factory=list)

    def locate(self, path: Path_) -> Location:
        for end in range(len(path), -1, -1):
            location = self.locations.get(path[:end])
            if location is not None:
                return location
        return Location(self.file, 1)

    def add(self, path: Path_, message: str) -> None:
        self.found.append(
            (self.locate(path), f"{format_path(path)}: {message}" if path else message)
        )

    def add_at(self, location: Location, message: str) -> None:
        self.found.append((location, message))

    def where(self, path: Path_) -> str:
        location = self.locate(path)
        if location.override is not None:
            return location.override
        if location.file == self.file:
            return f"line {location.line}"
        return f"{location.file}:{location.line}"

    def raise_if_any(self) -> None:
        if not self.found:
            return
        ordered = sorted(
            self.found,
            key=lambda item: (
                item[0].override is not None,
                item[0].file != self.file,
                item[0].line or 0,
            ),
        )
        raise ManifestError(
            [f"{loc.prefix()}: {message}" for loc, message in ordered], file=self.file
        )


def _read(file: Path) -> str:
    """Read ``file`` as UTF-8 text; raise a located ManifestError if that is impossible."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            [f"{file}: no such file (expected the app's {file.name} there)"], file=str(file)
        ) from None
    except IsADirectoryError:
        raise ManifestError([f"{file}: is a directory, expected a file"], file=str(file)) from None
    except OSError as exc:
        raise ManifestError(
            [f"{file}: cannot read: {exc.strerror or exc}"], file=str(file)
        ) from None
    try:
        return data.decode("utf-8-sig")  # a BOM (Windows editors) is not an error
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(
            [f"{file}:{line}: expected UTF-8 text, got byte 0x{data[exc.start]:02x}"],
            file=str(file),
        ) from None


def _parse_toml(file: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _SYNTAX_POSITION.search(message)
        if match is not None:
            where = f"{file}:{match.group(1)}:{match.group(2)}"
            message = message[: match.start()]
        else:  # "(at end of document)"
            where = f"{file}:{text.count(chr(10)) + 1}"
            message = message.replace(" (at end of document)", " at end of document")
        raise ManifestError([f"{where}: TOML syntax error: {message}"], file=str(file)) from None


def _merge_procfile(document: dict[str, Any], procfile: Path, problems: _Problems) -> None:
    """Add the Procfile's processes to ``document``; a name defined twice is a problem."""
    entries, bad_lines = parse_procfile(_read(procfile))
    for line, message in bad_lines:
        problems.add_at(Location(str(procfile), line), message)
    processes = document.setdefault("processes", {})
    if not isinstance(processes, dict):
        return  # validation reports "processes: expected a table"
    ports = document.get("ports")
    for entry in entries:
        location = Location(str(procfile), entry.line)
        if entry.name in processes:
            other = problems.locate(("processes", entry.name))
            problems.add_at(
                location,
                f"processes.{entry.name}: defined both in {PROCFILE} and in {problems.file}:"
                f"{other.line}; define each process in one place",
            )
            continue
        process: dict[str, Any] = {"command": entry.command}
        if entry.name == "web" and isinstance(ports, dict) and PROCFILE_WEB_PORT in ports:
            process["port"] = PROCFILE_WEB_PORT
        processes[entry.name] = process
        problems.locations[("processes", entry.name)] = location


def _apply_sets(document: dict[str, Any], items: Sequence[str], problems: _Problems) -> None:
    for item in items:
        try:
            setting = parse_set(item)
            apply_set(document, setting)
        except OverrideError as exc:
            problems.add_at(Location(problems.file, override=exc.label), exc.message)
            continue
        # The override replaced whatever the file said at and below this path, and created
        # the tables on the way that the file did not have.
        for path in [p for p in problems.locations if p[: len(setting.path)] == setting.path]:
            del problems.locations[path]
        label = Location(problems.file, override=setting.label)
        for end in range(1, len(setting.path) + 1):
            problems.locations.setdefault(setting.path[:end], label)


def _apply_offset(document: dict[str, Any], offset: int) -> None:
    """Add ``offset`` to every [ports] entry and to lb.frontend (non-integers are left alone)."""

    def shift(value: Any) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return value + offset if is_int else value

    ports = document.get("ports")
    if isinstance(ports, dict):
        for name in ports:
            ports[name] = shift(ports[name])
    lb = document.get("lb")
    if isinstance(lb, dict) and "frontend" in lb:
        lb["frontend"] = shift(lb["frontend"])


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def _cross_check(manifest: Manifest, problems: _Problems) -> None:
    """Rules across fields: port references, distinct ports, env names, lb and cron sanity."""
    names = ", ".join(manifest.ports) or "none defined"
    for name, process in manifest.processes.items():
        if process.port is not None and process.port not in manifest.ports:
            problems.add(
                ("processes", name, "port"),
                f"expected the name of a [ports] entry ({names}), got {render(process.port)}",
            )

    claims: list[tuple[Path_, int]] = [(("ports", n), p) for n, p in manifest.ports.items()]
    if manifest.lb is not None:
        claims.append((("lb", "frontend"), manifest.lb.frontend))
    first_use: dict[int, Path_] = {}
    for path, port in claims:
        if port in first_use:
            other = first_use[port]
            problems.add(
                path,
                f"port {port} is also {format_path(other)} ({problems.where(other)}); "
                "expected every port to be different",
            )
        else:
            first_use[port] = path

    for section, variable in (("ports", "CORRAL_PORT_"), ("paths", "CORRAL_PATH_")):
        by_variable: dict[str, str] = {}
        for name in getattr(manifest, section):
            env = variable + _env_name(name)
            if env in by_variable:
                problems.add(
                    (section, name),
                    f"{name!r} and {by_variable[env]!r} would both be ${env}; rename one",
                )
            by_variable[env] = name

    if manifest.lb is not None:
        _check_balancer(manifest, manifest.lb, problems)

    for job_name, job in manifest.cron.items():
        alert = job.alert
        if alert is None:
            continue
        wants = "no-success" in alert.on
        if wants and alert.no_success_within is None:
            problems.add(
                ("cron", job_name, "alert", "on"),
                'expected no_success_within = "<duration>" alongside "no-success"',
            )
        if alert.no_success_within is not None and not wants:
            problems.add(
                ("cron", job_name, "alert", "no_success_within"),
                'expected "no-success" in alert.on for no_success_within to take effect',
            )


def _check_balancer(manifest: Manifest, lb: Balancer, problems: _Problems) -> None:
    with_port = [name for name, p in manifest.processes.items() if p.port is not None]
    if lb.process is not None:
        chosen = manifest.processes.get(lb.process)
        if chosen is None or chosen.port is None:
            problems.add(
                ("lb", "process"),
                f"expected a process with a port ({', '.join(with_port) or 'none defined'}), "
                f"got {render(lb.process)}",
            )
    elif "web" in with_port or len(with_port) == 1:
        lb.process = "web" if "web" in with_port else with_port[0]
    else:
        problems.add(
            ("lb",),
            "expected one process with a port to receive the traffic "
            + (
                f"(several have one: {', '.join(with_port)}; choose with lb.process)"
                if with_port
                else '(give a [processes] entry port = "<name of a [ports] entry>")'
            ),
        )
    if lb.mode == "http" and lb.plane == "nft":
        problems.add(
            ("lb", "mode"),
            'expected mode = "tcp" with plane = "nft" (kernel forwarding cannot read HTTP); '
            'use plane = "proxy" for mode = "http"',
        )
    if lb.activation == "always" and lb.idle is not None:
        problems.add(("lb", "idle"), 'expected idle only with activation = "on-demand"')
    if lb.activation == "on-demand" and lb.idle is None:
        lb.idle = DEFAULT_IDLE
    health = lb.health
    if health is not None and (health.http is None) == (not health.tcp):
        problems.add(
            ("lb", "health"),
            'expected exactly one check: http = "/path" or tcp = true',
        )


def _is_file(path: Path) -> bool:
    """Like Path.is_file(), but False (not PermissionError) when the path cannot be reached."""
    try:
        return path.is_file()
    except OSError:
        return False


def _present(path: Path) -> bool:
    """Whether anything (even a dangling link or an unreadable file) is at ``path``."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True  # let the read report why it cannot be read
    return True


def _absolute(directory: Path, path: str) -> str:
    return os.path.normpath(directory / path)


def load(
    directory: Path,
    *,
    set_: Sequence[str] = (),
    offset: int = 0,
    env: Sequence[str] = (),
) -> ResolvedManifest:
    """Load ``directory/corral.toml`` (+ Procfile), apply ``--set``/``--offset``/``--env``,
    validate and resolve it; raise ManifestError listing every problem, located."""
    directory = Path(directory)
    if _is_file(directory):
        file, directory = directory, directory.parent
    else:
        file = directory / MANIFEST_FILE
    directory = directory.resolve()
    file = directory / file.name
    problems = _Problems(str(file))

    text = _read(file)
    document = _parse_toml(file, text)
    problems.locations.update(
        {path: Location(str(file), line) for path, line in field_lines(text).items()}
    )
    procfile = directory / PROCFILE
    if _present(procfile):
        _merge_procfile(document, procfile, problems)
    _apply_sets(document, set_, problems)
    env_overrides, env_problems = parse_env(env)
    for env_problem in env_problems:
        problems.add_at(Location(str(file), override=env_problem.label), env_problem.message)
    if offset:
        _apply_offset(document, offset)

    try:
        manifest = Manifest.model_validate(document, context={"offset": offset})
    except ValidationError as exc:
        for error in exc.errors():
            problems.add(*describe(error, document))
        problems.raise_if_any()
        raise AssertionError("unreachable: a validation error is a problem") from None
    _cross_check(manifest, problems)
    problems.raise_if_any()

    for grant in manifest.paths.values():
        grant.path = _absolute(directory, grant.path)
    for sink in manifest.logs.sinks:
        if sink.type == "file":
            sink.path = _absolute(directory, sink.path)
    return ResolvedManifest(
        manifest=manifest,
        directory=directory,
        file=file,
        env_overrides=env_overrides,
        offset=offset,
    )
