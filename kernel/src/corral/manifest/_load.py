"""Load ``corral.toml`` (and a Procfile), apply overrides, validate, and resolve it.

A directory with a Procfile and no ``corral.toml`` loads as if ``corral init`` had written
one (``defaults``). The kernel validates its own sections ([app], [processes], [ports],
[paths], [build], [release]); every other
section is checked by the driver that owns it (``corral.sdk.sections``): ``read`` gives a
``Draft`` whose ``request()`` is what the owners are asked (``manifest.check``), and
``Draft.finish`` turns their answer into a ``ResolvedManifest`` or located problems. ``load``
does both with the installed drivers' section modules, in this process.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError

from corral.errors import ManifestError
from corral.manifest._locate import Location, Path_, field_lines, format_path
from corral.manifest._model import Manifest, render
from corral.manifest._overrides import (
    OverrideError,
    ProcfileEntry,
    apply_set,
    parse_env,
    parse_procfile,
    parse_set,
)
from corral.manifest._problems import describe
from corral.protocol import KERNEL_SECTIONS, ClaimItem, ManifestCheck, ManifestChecked

MANIFEST_FILE = "corral.toml"
PROCFILE = "Procfile"
PROCFILE_WEB_PORT = "http"  # Heroku's convention: the Procfile's `web` process receives $PORT
PROCFILE_RELEASE = "release"  # Heroku's release phase: a command, not a process
DEFAULT_WEB_PORT = 5000  # foreman's and `heroku local`'s $PORT
DEFAULTS = "default without corral.toml"  # where a default value is said to come from

_NOT_IN_LABEL = re.compile(r"[^a-z0-9]+")

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
    sections: dict[str, Any] = field(default_factory=dict)
    """The driver-owned sections, as their owners normalized them (plain JSON)."""
    claims: list[ClaimItem] = field(default_factory=list)
    """What the owners asked the deploy to claim besides the kernel's own (lb name, port)."""
    on_demand: list[str] = field(default_factory=list)
    """Processes started on demand (no instance at deploy; their driver asks for one)."""

    def as_json(self) -> dict[str, Any]:
        """Return the plain-JSON form: sizes in bytes, durations in seconds, paths absolute."""
        data = self.manifest.model_dump(mode="json")
        data.update(self.sections)
        data["resolved"] = {
            "directory": str(self.directory),
            "file": str(self.file),
            "offset": self.offset,
            "env": dict(self.env_overrides),
            "claims": [c.model_dump(mode="json") for c in self.claims],
            "on_demand": list(self.on_demand),
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
        # the owners' sections were checked when the manifest was resolved: kept as data
        sections = {k: data.pop(k) for k in list(data) if k not in KERNEL_SECTIONS}
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
            sections=sections,
            claims=[ClaimItem.model_validate(c) for c in meta.get("claims") or []],
            on_demand=[str(p) for p in meta.get("on_demand") or []],
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


def default_app_name(directory: Path) -> str | None:
    """The app name of a directory without corral.toml: the directory's name made into a DNS
    label (lowercase, other characters '-', from its first letter, at most 63), or None."""
    label = _NOT_IN_LABEL.sub("-", directory.name.lower())
    return label.lstrip("-0123456789")[:63].rstrip("-") or None


def defaults(directory: Path, entries: Sequence[ProcfileEntry]) -> dict[str, Any]:
    """The corral.toml a directory with only a Procfile (``entries``) stands for: the app's
    name (missing when none can be made of the directory's) and, with a `web` process, the
    port it is given. The processes and the release command come from the Procfile."""
    name = default_app_name(directory)
    document: dict[str, Any] = {"app": {} if name is None else {"name": name}}
    if any(entry.name == "web" for entry in entries):
        document["ports"] = {PROCFILE_WEB_PORT: DEFAULT_WEB_PORT}
    return document


def _read_procfile(procfile: Path, problems: _Problems) -> list[ProcfileEntry]:
    """The Procfile's entries; each line that does not parse is a problem at its line."""
    entries, bad_lines = parse_procfile(_read(procfile))
    for line, message in bad_lines:
        problems.add_at(Location(str(procfile), line), message)
    return entries


def _merge_procfile(
    document: dict[str, Any],
    procfile: Path,
    entries: Sequence[ProcfileEntry],
    problems: _Problems,
) -> None:
    """Add the Procfile's processes (and its `release:` command) to ``document``; one defined
    in both files is a problem."""
    processes = document.setdefault("processes", {})
    ports = document.get("ports")
    for entry in entries:
        location = Location(str(procfile), entry.line)
        if entry.name == PROCFILE_RELEASE:
            _merge_release(document, entry, location, problems)
            continue
        if not isinstance(processes, dict):
            continue  # validation reports "processes: expected a table"
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


def _merge_release(
    document: dict[str, Any], entry: ProcfileEntry, location: Location, problems: _Problems
) -> None:
    """The Procfile's `release:` line is ``[release] command`` (Heroku's release phase)."""
    release = document.setdefault("release", {})
    if not isinstance(release, dict):
        return  # validation reports "release: expected a table"
    if "command" in release:
        other = problems.locate(("release", "command"))
        problems.add_at(
            location,
            f"release.command: defined both in {PROCFILE} (release:) and in {other.prefix()}; "
            "define the release command in one place",
        )
        return
    release["command"] = entry.command
    problems.locations.setdefault(("release",), location)
    problems.locations[("release", "command")] = location


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
    """Add ``offset`` to every [ports] entry (non-integers are left alone); the owners of other
    sections add it to the ports they hold (``Section.offset_ports``)."""

    def shift(value: Any) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return value + offset if is_int else value

    ports = document.get("ports")
    if isinstance(ports, dict):
        for name in ports:
            ports[name] = shift(ports[name])


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def _cross_check(manifest: Manifest, checked: ManifestChecked, problems: _Problems) -> None:
    """Rules across fields: port references, distinct ports (the owners' too), env names."""
    names = ", ".join(manifest.ports) or "none defined"
    for name, process in manifest.processes.items():
        if process.port is not None and process.port not in manifest.ports:
            problems.add(
                ("processes", name, "port"),
                f"expected the name of a [ports] entry ({names}), got {render(process.port)}",
            )

    claims: list[tuple[Path_, int]] = [(("ports", n), p) for n, p in manifest.ports.items()]
    claims += [(tuple(p.path), p.port) for p in checked.ports]
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


def _valid(annotation: Any, value: Any) -> Any:
    """``value`` validated as ``annotation``, or None (its problems are reported elsewhere)."""
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return None


@dataclass
class Draft:
    """A manifest read and overridden, its kernel sections validated, the others not yet."""

    file: Path
    directory: Path
    document: dict[str, Any]
    problems: _Problems
    manifest: Manifest | None
    env_overrides: dict[str, str]
    offset: int

    @property
    def app(self) -> str:
        """The app's name ('' when [app] is invalid)."""
        app = self.document.get("app")
        name = app.get("name") if isinstance(app, dict) else None
        return name if isinstance(name, str) else ""

    def foreign(self) -> dict[str, Any]:
        """The sections the kernel does not own, as written."""
        return {k: v for k, v in self.document.items() if k not in KERNEL_SECTIONS}

    def request(self, owned: Mapping[str, str]) -> ManifestCheck:
        """What the owners are asked: the ``owned`` sections present in the manifest, and the
        kernel's resolved processes and ports (those that are valid) to cross-check against."""
        from corral.manifest._model import Process

        processes: dict[str, Any] = {}
        ports: dict[str, int] = {}
        if self.manifest is not None:
            processes = self.manifest.model_dump(mode="json")["processes"]
            ports = dict(self.manifest.ports)
        else:  # report the owners' problems too; cross-checks see what is valid
            for name, raw in (_valid(dict[str, Any], self.document.get("processes")) or {}).items():
                process = _valid(Process, raw)
                if process is not None:
                    processes[name] = process.model_dump(mode="json")
            for name, port in (_valid(dict[str, Any], self.document.get("ports")) or {}).items():
                if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
                    ports[name] = port
        return ManifestCheck(
            app=self.app or "app", directory=str(self.directory),
            sections={k: v for k, v in self.foreign().items() if k in owned},
            processes=processes, ports=ports, offset=self.offset)

    def finish(self, checked: ManifestChecked, owned: Mapping[str, str]) -> ResolvedManifest:
        """The resolved manifest, given the owners' answer; ManifestError lists every problem
        (the kernel's, the owners', a section nobody owns), located."""
        problems = self.problems
        known = [*KERNEL_SECTIONS, *sorted(owned)]
        for name in self.foreign():
            if name in owned:
                continue
            hint = difflib.get_close_matches(name, known, n=1)
            problems.add(
                (name,),
                f"unknown key: no enabled driver owns a [{name}] section (expected one of: "
                f"{', '.join(known)})"
                + (f"; did you mean {hint[0]!r}?" if hint
                   else "; enable the driver that provides it (host.toml [drivers], "
                   "`corral drivers`)"),
            )
        for problem in checked.problems:
            problems.add(tuple(problem.path), problem.message)
        if self.manifest is not None:
            _cross_check(self.manifest, checked, problems)
        problems.raise_if_any()
        assert self.manifest is not None
        for grant in self.manifest.paths.values():
            grant.path = _absolute(self.directory, grant.path)
        return ResolvedManifest(
            manifest=self.manifest,
            directory=self.directory,
            file=self.file,
            env_overrides=self.env_overrides,
            offset=self.offset,
            sections={k: checked.sections[k] for k in self.foreign() if k in checked.sections},
            claims=list(checked.claims),
            on_demand=list(dict.fromkeys(checked.on_demand)),
        )


def read(
    directory: Path,
    *,
    set_: Sequence[str] = (),
    offset: int = 0,
    env: Sequence[str] = (),
) -> Draft:
    """Read ``directory/corral.toml`` (+ Procfile; a Procfile alone gets the ``defaults``),
    apply ``--set``/``--offset``/``--env`` and validate the kernel's sections; problems are
    kept in the draft until ``finish``."""
    directory = Path(directory)
    if _is_file(directory):
        file, directory = directory, directory.parent
        if file.name == PROCFILE:
            file = directory / MANIFEST_FILE
    else:
        file = directory / MANIFEST_FILE
    directory = directory.resolve()
    file = directory / file.name
    procfile = directory / PROCFILE

    has_toml = _present(file)
    if not has_toml and not _present(procfile):
        raise ManifestError(
            [
                f"{file}: no such file (expected the app's {MANIFEST_FILE} there); a {PROCFILE} "
                'alone is enough (e.g. "web: python app.py"): without corral.toml, corral uses '
                "the defaults `corral init` writes out"
            ],
            file=str(file),
        )
    unnamed = False
    if has_toml:
        problems = _Problems(str(file))
        text = _read(file)
        document = _parse_toml(file, text)
        problems.locations.update(
            {path: Location(str(file), line) for path, line in field_lines(text).items()}
        )
        if _present(procfile):
            _merge_procfile(document, procfile, _read_procfile(procfile, problems), problems)
    else:  # a Procfile and no corral.toml: the defaults are the corral.toml
        file = procfile
        problems = _Problems(str(file))
        entries = _read_procfile(procfile, problems)
        document = defaults(directory, entries)
        unnamed = "name" not in document["app"]
        default = Location(str(file), override=DEFAULTS)
        for path in (("app",), ("app", "name"), ("ports",), ("ports", PROCFILE_WEB_PORT)):
            problems.locations[path] = default
        _merge_procfile(document, procfile, entries, problems)

    _apply_sets(document, set_, problems)
    app = document.get("app")
    if unnamed and isinstance(app, dict) and "name" not in app:  # and no --set app.name=NAME
        raise ManifestError(
            [
                f"{directory}: cannot make an app name of the directory's name "
                f"{directory.name!r} (an app name is a DNS label, starting with a letter); "
                f"run `corral init --name NAME {directory}` or write {MANIFEST_FILE} with "
                "[app] name"
            ],
            file=str(file),
        )
    env_overrides, env_problems = parse_env(env)
    for env_problem in env_problems:
        problems.add_at(Location(str(file), override=env_problem.label), env_problem.message)
    if offset:
        _apply_offset(document, offset)

    own = {k: v for k, v in document.items() if k in KERNEL_SECTIONS}
    manifest: Manifest | None = None
    try:
        manifest = Manifest.model_validate(own, context={"offset": offset})
    except ValidationError as exc:
        for error in exc.errors():
            problems.add(*describe(error, own))
    return Draft(file, directory, document, problems, manifest, env_overrides, offset)


def load(
    directory: Path,
    *,
    set_: Sequence[str] = (),
    offset: int = 0,
    env: Sequence[str] = (),
    owners: Any = None,
) -> ResolvedManifest:
    """Load ``directory/corral.toml`` (+ Procfile), apply ``--set``/``--offset``/``--env``,
    validate and resolve it, every section by its owner (``owners``: a ``LocalOwners``,
    default the drivers installed and enabled on this host); raise ManifestError listing
    every problem, located."""
    from corral.manifest._owners import LocalOwners

    draft = read(directory, set_=set_, offset=offset, env=env)
    if owners is None:
        owners = LocalOwners.installed()
    owned = owners.owners()
    return draft.finish(owners.check(draft.request(owned)), owned)
