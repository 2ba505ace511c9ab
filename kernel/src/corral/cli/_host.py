"""``corral host install|uninstall|reset``: corrald as a service, and a clean slate for a host.

``install`` writes ``corrald.service`` (``--print`` shows it, writes nothing) and enables it
with systemctl when systemd runs this host; ``uninstall`` disables it (stopping corrald: apps
and drivers keep running) and removes it; ``reset`` finds everything corral created on this
host by names alone (``corral.hostreset``) and, with ``--yes``, removes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from corral import host, systemd

EXIT_FAILED = 1


def corrald_command() -> list[str]:
    """How the unit starts the installed corrald: the ``corrald`` script beside this
    interpreter (a venv's bin), else this interpreter with ``-m corral.daemon``."""
    script = Path(sys.executable).parent / "corrald"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "corral.daemon"]


def _systemctl(*args: str) -> tuple[bool, str]:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    return done.returncode == 0, (done.stderr or done.stdout).strip()


def _why_no_systemctl(unit_dir: Path) -> str | None:
    """Why systemctl must not be run here (None: run it)."""
    if not systemd.booted():
        return "systemd is not running on this host (no /run/systemd/system)"
    if unit_dir != systemd.UNIT_DIR:
        return f"the unit is not in {systemd.UNIT_DIR}, where systemd looks for it"
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    return None


def cmd_install(ns: argparse.Namespace) -> int:
    """Write corrald.service (Type=notify, KillMode=process) and enable it."""
    command = ns.corrald.split() if ns.corrald else corrald_command()
    text = systemd.unit(command)
    if ns.print_only:
        sys.stdout.write(text)
        return 0
    unit_dir = Path(ns.unit_dir) if ns.unit_dir else systemd.unit_dir()
    path = unit_dir / systemd.UNIT_NAME
    before = path.read_text() if path.is_file() else None
    if before == text:
        print(f"{path}: already installed, unchanged")
    else:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
        print(f"{path}: {'updated' if before is not None else 'written'} "
              f"(ExecStart={' '.join(command)})")
    why = _why_no_systemctl(unit_dir)
    if why is not None:
        print(f"systemctl daemon-reload and enable{' --now' if ns.now else ''} were not run: "
              f"{why}. Start corrald another way (docs/running-corrald.md).")
        return 0
    for args in (["daemon-reload"], ["enable", *(["--now"] if ns.now else []),
                                     systemd.UNIT_NAME]):
        ok, said = _systemctl(*args)
        if not ok:
            print(f"corral host install: systemctl {' '.join(args)} failed: {said}",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"systemctl {' '.join(args)}: done")
    if not ns.now:
        print(f"start it with: systemctl start {systemd.UNIT_NAME} (a corrald already running "
              "outside systemd must be stopped first: apps and drivers keep running)")
    return 0


def cmd_uninstall(ns: argparse.Namespace) -> int:
    """Disable and stop corrald.service and remove it; apps and drivers keep running."""
    unit_dir = Path(ns.unit_dir) if ns.unit_dir else systemd.unit_dir()
    path = unit_dir / systemd.UNIT_NAME
    if not path.exists():
        print(f"{path}: not installed, nothing to do")
        return 0
    why = _why_no_systemctl(unit_dir)
    if why is None:
        ok, said = _systemctl("disable", "--now", systemd.UNIT_NAME)
        if not ok:
            print(f"corral host uninstall: systemctl disable --now failed: {said}",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"systemctl disable --now {systemd.UNIT_NAME}: done (corrald stopped; apps and "
              "drivers keep running, and a corrald started later adopts them)")
    else:
        print(f"systemctl disable --now was not run: {why}")
    path.unlink()
    print(f"{path}: removed")
    if why is None:
        _systemctl("daemon-reload")
    print("running apps were not touched")
    return 0


def cmd_reset(ns: argparse.Namespace) -> int:
    """Remove everything corral created on this host (processes, namespaces, nft tables,
    mounts, cgroups, runtime dir), found without the ledger; a dry run without --yes."""
    from corral.hostreset import Where, reset

    config_path = Path(ns.config) if ns.config else host.config_path()
    where = Where(home=Path(ns.home) if ns.home else host.home(),
                  runtime=Path(ns.runtime_dir) if ns.runtime_dir else host.runtime_dir(),
                  config=host.load_config(config_path))
    sections, notes = reset(where, apply=ns.yes)
    failed = any(s.failed for s in sections)
    if ns.json:
        print(json.dumps({"applied": ns.yes, "home": str(where.home),
                          "runtime_dir": str(where.runtime), "config": str(config_path),
                          "sections": [vars(s) for s in sections], "notes": notes},
                         indent=2))
        return EXIT_FAILED if failed else 0
    print(f"corral host reset: home {where.home}, runtime dir {where.runtime}, "
          f"host config {config_path}")
    for s in sections:
        if ns.yes:
            lines = [f"removed {x}" for x in s.removed] + [f"FAILED {x}" for x in s.failed]
        else:
            lines = [*s.found, *s.failed]
        if lines:
            print(f"{s.name}:")
            for line in lines:
                print(f"  {line}")
    for note in notes:
        print(note)
    if not any(s.found or s.failed for s in sections):
        print("nothing of corral's found on this host")
    elif not ns.yes:
        print("dry run: nothing was removed; run `corral host reset --yes` to remove the above")
    print(f"the home {where.home} (ledger, logs) is left as it is: a corrald started on it "
          "restarts the apps its ledger lists; delete it for a fresh start")
    return EXIT_FAILED if failed else 0


def cmd_host(ns: argparse.Namespace) -> int:
    """This host: corrald as a systemd service (install, uninstall), reset."""
    return {"install": cmd_install, "uninstall": cmd_uninstall, "reset": cmd_reset}[
        ns.host_command](ns)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``corral host`` and its sub-commands."""
    p = sub.add_parser("host", help=cmd_host.__doc__)
    hsub = p.add_subparsers(dest="host_command", required=True, metavar="HOST_COMMAND")
    s = hsub.add_parser("install", help=cmd_install.__doc__)
    s.add_argument("--print", "--dry-run", dest="print_only", action="store_true",
                   help="print the unit, write and enable nothing")
    s.add_argument("--now", action="store_true", help="also start it (systemctl enable --now)")
    s.add_argument("--corrald", metavar="COMMAND",
                   help="the ExecStart command (default: the corrald installed with this CLI)")
    s.add_argument("--unit-dir", help=argparse.SUPPRESS)  # tests; CORRAL_SYSTEMD_UNIT_DIR too
    s = hsub.add_parser("uninstall", help=cmd_uninstall.__doc__)
    s.add_argument("--unit-dir", help=argparse.SUPPRESS)
    s = hsub.add_parser("reset", help=cmd_reset.__doc__)
    s.add_argument("--yes", action="store_true", help="remove (without it: only say what)")
    s.add_argument("--config", metavar="PATH",
                   help="the host config naming the drivers and their prefixes and tables "
                   "(default: CORRAL_HOST_CONFIG, else /etc/corral/host.toml as root)")
    s.add_argument("--home", metavar="DIR", help="the home (default: CORRAL_HOME, else "
                   "/var/lib/corral as root): instances' manifests live below it")
    s.add_argument("--runtime-dir", metavar="DIR", help="the runtime dir (default: "
                   "CORRAL_RUNTIME_DIR, else /run/corral as root)")
    s.add_argument("--json", action="store_true")
