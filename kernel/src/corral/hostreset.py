"""``corral host reset``: find, and remove, everything corral created on this host, no ledger.

After a lost home or a crashed host the ledger cannot say what runs; names can. What the
kernel itself creates is found here:

- **processes**: the kernel (``corral.daemon`` / ``corrald`` whose runtime dir is this one),
  the drivers and whatever they started with their environment (the log driver's FIFO
  keepers, lb policy programs: ``CORRAL_DRIVER_TOKEN`` and this ``CORRAL_RUNTIME_DIR``), and
  the app instances with their tini (``CORRAL_INSTANCE`` with ``CORRAL_MANIFEST`` under this
  home or ``NOTIFY_SOCKET`` in this notify dir);
- **the runtime dir** (bus sockets, the log driver's FIFOs and keeper files, the lb's policy
  sockets, instance roots) and the notify dir beside it, with any mount left below them.

What a driver creates outside the runtime dir (network namespaces, nft tables, cgroups) its
own package finds: each driver description may name a ``reset`` module (``corral.sdk``
``serve_reset``), run with the host config's section of that driver. The kernel never imports
driver code. Processes go first (the kernel first, so that it restarts nothing), then the
drivers' resets, then the runtime dir. The home (ledger, logs, manifests) is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from corral.host import HostConfig
from corral.protocol import DriverDescription

NAMESPACE = "corral.drivers"


@dataclass
class Section:
    """One part of the reset (the kernel's processes, a driver, the runtime dir)."""

    name: str
    found: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Where:
    """The corral whose leftovers are looked for: its home, runtime dir and host config."""

    home: Path
    runtime: Path
    config: HostConfig

    @property
    def notify_dir(self) -> Path:
        """Where the kernel made the instances' sd_notify sockets."""
        return Path(str(self.runtime) + "-notify")

    @property
    def gateway_dir(self) -> Path:
        """Where the kernel bound the bus for the SSH account (``corral keys``)."""
        return Path(str(self.runtime) + "-gateway")


# ---- processes ---------------------------------------------------------------------------------


def _under(path: str, base: Path) -> bool:
    return path == str(base) or path.startswith(str(base).rstrip("/") + "/")


def _runtime_of(env: dict[str, str], uid: int) -> str | None:
    found = env.get("CORRAL_RUNTIME_DIR")
    if found:
        return found
    return "/run/corral" if uid == 0 else None  # a user's default depends on its XDG dirs


def what_process(proc: psutil.Process, where: Where) -> str | None:
    """What ``proc`` is to the corral at ``where`` (a short label), or None if not of it."""
    try:
        env = proc.environ()
        cmdline = proc.cmdline()
        uid = proc.uids().real
    except (psutil.Error, OSError):
        return None
    if "CORRAL_INSTANCE" in env:
        manifest = env.get("CORRAL_MANIFEST", "")
        notify = env.get("NOTIFY_SOCKET", "")
        if (manifest and _under(manifest, where.home)) or (
                notify and _under(notify, where.notify_dir)):
            return f"instance {env['CORRAL_INSTANCE']}"
        return None
    if _runtime_of(env, uid) != str(where.runtime):
        return None
    if "CORRAL_DRIVER_TOKEN" in env:
        name = env.get("CORRAL_DRIVER_NAME", "?")
        first = os.path.basename(cmdline[0]) if cmdline else "python"
        # a driver itself runs on python; anything else was started by it (log keepers...)
        return f"driver {name}" + ("" if first.startswith("python") else f": {first}")
    if "corral.daemon" in cmdline[:3] or any(os.path.basename(a) == "corrald"
                                             for a in cmdline[:2]):
        return "kernel (corrald)"
    return None


def processes(where: Where) -> list[tuple[psutil.Process, str]]:
    """Every live process of the corral at ``where``, the kernel first, then the drivers."""
    me = os.getpid()
    found: list[tuple[psutil.Process, str]] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        label = what_process(proc, where)
        if label is not None:
            found.append((proc, label))
    order = {"kernel": 0, "driver": 1, "instance": 2}
    return sorted(found, key=lambda item: (order[item[1].split()[0]], item[0].pid))


def _kill(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL every process; return those still alive (not zombies) after ``timeout``."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            continue
    return left


def reset_processes(where: Where, *, apply: bool) -> Section:
    """Find (and with ``apply`` SIGKILL) the kernel, the drivers and the instances."""
    section = Section("processes")
    found = processes(where)
    labels = {proc.pid: f"pid {proc.pid}: {label}" for proc, label in found}
    section.found = list(labels.values())
    if apply and found:
        left = {p.pid for p in _kill([p for p, _ in found])}
        section.removed = [text for pid, text in labels.items() if pid not in left]
        section.failed = [f"{labels[pid]}: still running after SIGKILL" for pid in sorted(left)]
    return section


# ---- drivers -----------------------------------------------------------------------------------


def _descriptions() -> tuple[dict[str, DriverDescription], dict[str, str]]:
    from importlib.metadata import entry_points

    found: dict[str, DriverDescription] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=NAMESPACE):
        try:
            desc = ep.load()
        except Exception as exc:  # a broken package is reported, not fatal
            broken[ep.name] = f"cannot load entry point {ep.value!r}: {exc}"
            continue
        if isinstance(desc, DriverDescription):
            found[ep.name] = desc
        else:
            broken[ep.name] = f"entry point {ep.value!r} is not a DriverDescription"
    return found, broken


def driver_resets(config: HostConfig) -> list[tuple[str, list[str] | None, dict[str, Any], str]]:
    """(name, reset command or None, its config, a note) for every driver the host config
    enables, or every installed one when it names none; disabled ones too (they may have
    run before)."""
    found, broken = _descriptions()
    wanted = {name: dconf for name, dconf in config.drivers.items()} or dict.fromkeys(
        sorted(set(found) | set(broken)))
    out: list[tuple[str, list[str] | None, dict[str, Any], str]] = []
    for name, dconf in wanted.items():
        if dconf is not None and dconf.exec:
            out.append((name, None, {}, "a foreign (exec) driver: its leftovers outside the "
                                        "runtime dir are not known to corral"))
            continue
        ep_name = dconf.entry_point if dconf is not None and dconf.entry_point else name
        desc = found.get(ep_name)
        if desc is None:
            reason = broken.get(ep_name, f"no entry point {ep_name!r} in {NAMESPACE}")
            out.append((name, None, {}, f"not reset: {reason}"))
            continue
        command = desc.reset_command()
        note = "" if command else "declares no reset (keeps nothing outside the runtime dir)"
        out.append((name, command, dict(dconf.config) if dconf is not None else {}, note))
    return out


def run_driver_reset(name: str, command: list[str], config: dict[str, Any], where: Where, *,
                     apply: bool, timeout: float = 120.0) -> Section:
    """Run one driver's reset (the ``corral.sdk`` ``serve_reset`` contract)."""
    section = Section(f"driver {name}")
    request = json.dumps({"home": str(where.home), "runtime_dir": str(where.runtime),
                          "config": config, "apply": apply})
    try:
        done = subprocess.run(command, input=request, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        section.failed.append(f"{' '.join(command)}: {exc}")
        return section
    try:
        report = json.loads(done.stdout)
        section.found = [str(x) for x in report.get("found", [])]
        section.removed = [str(x) for x in report.get("removed", [])]
        section.failed = [str(x) for x in report.get("failed", [])]
    except (ValueError, AttributeError):
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        section.failed.append(f"{' '.join(command[-2:])} failed: {tail}")
    return section


# ---- the runtime dir ---------------------------------------------------------------------------


def _mounts_below(path: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if _under(target, path):
                found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def _remove_dir(path: Path) -> None:
    """Detach every mount below ``path`` (deepest first), then delete it, never through a
    mount: a root left behind binds host directories, and rw grants hold app data."""
    from corral.launch import linux

    for target in _mounts_below(path):
        try:
            linux.umount2(target, linux.MNT_DETACH)
        except OSError:
            pass  # gone with its parent; checked below
    left = _mounts_below(path)
    if left:
        raise OSError(f"still mounted below it: {', '.join(left[:3])}")
    shutil.rmtree(path)


def reset_runtime(where: Where, *, apply: bool) -> Section:
    """Find (and with ``apply`` remove) the runtime dir, the notify dir and the SSH
    account's bus dir."""
    section = Section("runtime dir")
    for path in (where.runtime, where.notify_dir, where.gateway_dir):
        if not path.exists():
            continue
        mounts = len(_mounts_below(path))
        what = f"{path}" + (f" ({mounts} mounts below it)" if mounts else "")
        section.found.append(what)
        if apply:
            try:
                _remove_dir(path)
            except OSError as exc:
                section.failed.append(f"{what}: {exc}")
            else:
                section.removed.append(what)
    return section


def reset(where: Where, *, apply: bool) -> tuple[list[Section], list[str]]:
    """The whole reset, in order: processes, drivers, runtime dir. Returns the sections and
    notes (drivers with nothing to reset, or that cannot be reset)."""
    sections = [reset_processes(where, apply=apply)]
    notes = []
    for name, command, config, note in driver_resets(where.config):
        if command is None:
            notes.append(f"driver {name}: {note}")
            continue
        sections.append(run_driver_reset(name, command, config, where, apply=apply))
    sections.append(reset_runtime(where, apply=apply))
    return sections, notes
