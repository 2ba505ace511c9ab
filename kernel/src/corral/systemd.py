"""corrald under systemd: the readiness notification and the service unit, without libsystemd.

``notify`` speaks the sd_notify datagram protocol itself (a plain AF_UNIX socket; ``@`` at
the start of ``$NOTIFY_SOCKET`` means the abstract namespace), so corrald needs no systemd
Python package. ``unit`` renders ``corrald.service``; ``corral host install`` writes it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

#: Where ``corral host install`` puts the unit (``CORRAL_SYSTEMD_UNIT_DIR`` overrides it).
UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "corrald.service"


def unit_dir() -> Path:
    """The directory units are installed in."""
    return Path(os.environ.get("CORRAL_SYSTEMD_UNIT_DIR") or UNIT_DIR)


def booted() -> bool:
    """Whether systemd is the running init (``sd_booted()``: /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to the service manager; False when there is none.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``. Errors are returned as False, never
    raised: a lost notification must not stop the kernel (systemd then times the start out).
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False  # unset, or a vsock address (not used on a host running corrald)
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


# Capabilities corrald and its drivers never use; everything else stays in the bounding set,
# because the kernel and the drivers mount, enter namespaces, write cgroups and nftables,
# switch to app uids, read the environment of app processes (live restore: CAP_SYS_PTRACE),
# raise pipe sizes (CAP_SYS_RESOURCE) and load a BPF program (CAP_BPF, CAP_SYS_ADMIN).
DROPPED_CAPABILITIES = (
    "CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_WAKE_ALARM", "CAP_SYS_RAWIO",
    "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_SYSLOG", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_LINUX_IMMUTABLE", "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
)


def unit(exec_start: list[str]) -> str:
    """The text of ``corrald.service`` running ``exec_start``."""
    command = " ".join(_quote(arg) for arg in exec_start)
    return f"""\
# corrald.service, written by `corral host install` (remove with `corral host uninstall`);
# see docs/running-corrald.md.
[Unit]
Description=corral kernel (corrald): self-hosted, container-free apps
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
# corrald sends READY=1 once its bus serves and its drivers are started.
Type=notify
NotifyAccess=main
ExecStart={command}
Restart=on-failure
RestartSec=1s
# Stopping or restarting the service stops corrald alone: drivers and apps keep running
# (apps keep serving) and the next corrald adopts them (live restore).
KillMode=process
TimeoutStopSec=30s
# Apps without a sandbox driver run in this service's cgroup: no task cap on it.
TasksMax=infinity
LimitNOFILE=1048576
# Hardening that leaves corrald what it must do as root. No ProtectSystem=, ProtectHome=,
# PrivateTmp=, PrivateDevices= or other mount-namespace options: instance roots, network
# namespaces (/run/netns) and granted paths must be the host's own, visible to the host and
# to `corral host reset`. No SystemCallFilter=, MemoryDenyWriteExecute= or other seccomp
# options: they would be inherited by every app (each app gets corral's own filter).
NoNewPrivileges=yes
CapabilityBoundingSet=~{" ".join(DROPPED_CAPABILITIES)}

[Install]
WantedBy=multi-user.target
"""


def _quote(arg: str) -> str:
    """Quote one ExecStart word as systemd reads it (double quotes, backslash escapes)."""
    if arg and all(c.isalnum() or c in "/._-=:,+@" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
