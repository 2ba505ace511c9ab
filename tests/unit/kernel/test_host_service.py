"""corrald as a systemd service: the unit's text, sd_notify, `corral host install|uninstall`."""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from corral import systemd
from corral.protocol import DriverDescription


def parse_unit(text: str) -> configparser.ConfigParser:
    """Parse a unit strictly: no duplicate sections or keys, keys case-sensitive."""
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_unit_is_notify_restarts_on_failure_and_stops_corrald_alone() -> None:
    """The unit waits for READY=1 from corrald itself, restarts it on failure, and a stop or
    restart kills only corrald (drivers and apps keep running: live restore adopts them)."""
    unit = parse_unit(systemd.unit(["/opt/corral/bin/corrald"]))
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/opt/corral/bin/corrald"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "process"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "--stop-drivers" not in service["ExecStart"]


def test_unit_hardening_leaves_what_corrald_needs_as_root() -> None:
    """No option that would give corrald a private mount namespace (its mounts and network
    namespaces must be the host's) or a seccomp filter (inherited by every app), and no
    capability that corrald uses is dropped from the bounding set."""
    unit = parse_unit(systemd.unit(["/usr/bin/corrald"]))
    service = unit["Service"]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "PrivateNetwork", "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelModules",
                "ProtectControlGroups", "ProtectKernelTunables", "SystemCallFilter",
                "MemoryDenyWriteExecute", "RestrictNamespaces", "RestrictAddressFamilies",
                "LockPersonality", "User", "DynamicUser"):
        assert key not in service, key
    bounding = service["CapabilityBoundingSet"]
    assert bounding.startswith("~"), "a deny list: everything not named stays"
    dropped = set(bounding[1:].split())
    needed = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP",
              "CAP_KILL", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_FOWNER",
              "CAP_SYS_RESOURCE", "CAP_BPF", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT"}
    assert not dropped & needed
    assert "CAP_SYS_MODULE" in dropped


def test_exec_start_quotes_words_with_spaces() -> None:
    """An interpreter path with a space stays one word for systemd."""
    unit = parse_unit(systemd.unit(["/opt/my corral/python", "-m", "corral.daemon"]))
    assert unit["Service"]["ExecStart"] == '"/opt/my corral/python" -m corral.daemon'


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    """systemd's own parser finds no unknown key or bad value in the unit."""
    require(shutil.which("systemd-analyze") is not None,
            "systemd-analyze (Debian package systemd; scripts/setup.sh installs it)")
    path = tmp_path / "corrald.service"
    path.write_text(systemd.unit([sys.executable, "-m", "corral.daemon"]))
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram_to_a_path_socket(tmp_path: Path) -> None:
    """sd_notify to a socket in the file system: one datagram, the message as sent."""
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        assert systemd.notify("READY=1\nSTATUS=x", path)
        assert sock.recv(4096) == b"READY=1\nSTATUS=x"


def test_notify_reaches_an_abstract_socket() -> None:
    """'@' at the start of NOTIFY_SOCKET is the abstract namespace (systemd's own default)."""
    name = f"corral-test-{secrets.token_hex(6)}"
    with _receiver("\0" + name) as sock:
        assert systemd.notify("READY=1", "@" + name)
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_a_manager_is_false_and_quiet(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No NOTIFY_SOCKET, or nobody listening: False, never an exception."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.notify("READY=1", str(tmp_path / "nobody.sock")) is False


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, **(env or {})})


def test_install_print_writes_nothing(tmp_path: Path) -> None:
    """--print shows the unit (with this installation's corrald) and writes no file."""
    done = cli("host", "install", "--print", "--unit-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    unit = parse_unit(done.stdout)
    assert unit["Service"]["Type"] == "notify"
    exec_start = unit["Service"]["ExecStart"]
    assert exec_start.split()[0] in (str(Path(sys.executable).parent / "corrald"),
                                     sys.executable)
    assert list(tmp_path.iterdir()) == []


def test_install_then_uninstall_under_a_given_unit_dir(tmp_path: Path) -> None:
    """install writes corrald.service (what --print shows) and says plainly that systemctl
    was not run and why; a second install changes nothing; uninstall removes the file and
    says running apps were not touched; a second uninstall has nothing to do."""
    units = tmp_path / "units"
    done = cli("host", "install", "--unit-dir", str(units))
    assert done.returncode == 0, done.stderr
    path = units / "corrald.service"
    assert path.read_text() == cli("host", "install", "--print").stdout
    assert parse_unit(path.read_text())["Service"]["KillMode"] == "process"
    assert "were not run:" in done.stdout
    reason = ("systemd is not running" if not systemd.booted()
              else f"not in {systemd.UNIT_DIR}")
    assert reason in done.stdout, done.stdout
    assert "unchanged" in cli("host", "install", "--unit-dir", str(units)).stdout

    done = cli("host", "uninstall", env={"CORRAL_SYSTEMD_UNIT_DIR": str(units)})
    assert done.returncode == 0, done.stderr
    assert not path.exists()
    assert "was not run" in done.stdout and "running apps were not touched" in done.stdout
    assert "nothing to do" in cli("host", "uninstall", "--unit-dir", str(units)).stdout


def test_driver_description_reset_is_optional() -> None:
    """A description without ``reset`` has no reset command; with one, it runs the module
    with the kernel's interpreter."""
    plain = DriverDescription(name="x", capability="log", version="1", module="x.driver")
    assert plain.reset_command() is None
    with_reset = DriverDescription(name="x", capability="log", version="1", module="x.driver",
                                   reset="x.reset")
    assert with_reset.reset_command() == [sys.executable, "-m", "x.reset"]
