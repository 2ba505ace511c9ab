"""``corral up`` and ``corral scale`` follow their deploy through the kernel's events.

A line per step and instance (started, ready, healthy, unhealthy, draining, stopped) goes to
stderr as it happens; the result goes to stdout. The CLI waits as long as the kernel works on
the deploy: only the kernel's silence (three missed heartbeats) ends the wait. Ctrl-C leaves
the deploy running in the kernel and says how to follow it (``corral events APP``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TextIO

from corral.client import KernelClient, events
from corral.protocol import Event

# The deploy runs as long as the kernel says it does: a lost kernel is found by heartbeats.
NO_CLIENT_DEADLINE_S = 30 * 24 * 3600.0

_STEPS = {
    "release.created": "release v{release}: {changes_text}",
    "build.started": "building v{release}: {steps_text}",
    "build.finished": "built v{release} in {seconds:.1f}s",
    "build.failed": "build of v{release} failed: {reason}",
    "release.phase": "release phase of v{release}: {command}",
    "rollback.started": "rolling back from v{from} to v{release}",
    "deploy.started": "deploying generation {generation}",
    "instance.started": "started (pid {pid})",
    "instance.ready": "ready",
    "instance.healthy": "healthy{health_note}",
    "instance.unhealthy": "unhealthy ({driver}: {health})",
    "instance.waiting": "waiting: {reason}",
    "instance.draining": "draining",
    "instance.stopped": "stopped",
    "instance.exited": "exited ({status})",
    "deploy.failed": "deploy of generation {generation} failed at {step}: {reason}",
    "deployed": "generation {generation} is live{release_note}",
}
_OUTPUT = ("build.output", "release.output")  # lines a build or release phase printed


def describe(app: str, event: Event) -> str | None:
    """The line for one of ``app``'s events, or None for events a deploy does not show."""
    step = event.topic.removeprefix(f"app.{app}.")
    if step in _OUTPUT:
        return f"       {event.data.get('line', '')}"
    template = _STEPS.get(step)
    if template is None:
        return None
    data = dict(event.data)
    health = str(data.get("health") or "")
    data["health_note"] = f" ({health})" if health else ""
    data["changes_text"] = ", ".join(map(str, data.get("changes") or [])) or "-"
    data["steps_text"] = "; ".join(map(str, data.get("steps") or [])) or "-"
    data["release_note"] = f" (release v{data['release']})" if data.get("release") else ""
    try:
        text = template.format(**data)
    except (KeyError, IndexError, ValueError):
        text = step
    instance = data.get("instance")
    return f"  {instance}  {text}" if instance else f"{app}: {text}"


async def _print_events(app: str, out: TextIO) -> None:
    async for event in events(f"app.{app}."):
        line = describe(app, event)
        if line is not None:
            print(line, file=out, flush=True)


async def follow(app: str, op: str, args: dict[str, Any], *, out: TextIO = sys.stderr,
                 quiet: bool = False) -> dict[str, Any]:
    """Send ``op`` and return its reply, printing ``app``'s deploy events meanwhile."""
    printer = None if quiet else asyncio.ensure_future(_print_events(app, out))
    try:
        if printer is not None:
            await asyncio.sleep(0.05)  # let the subscription reach the kernel first
        return await KernelClient().acall(op, args, timeout=NO_CLIENT_DEADLINE_S)
    finally:
        if printer is not None:
            await asyncio.sleep(0.05)  # the last events travel on another socket
            printer.cancel()
            await asyncio.gather(printer, return_exceptions=True)


def run(ns: argparse.Namespace, app: str, op: str, args: dict[str, Any], *,
        out: TextIO | None = None) -> dict[str, Any]:
    """``follow`` from synchronous code; Ctrl-C says the deploy goes on and how to watch it.
    The progress lines go to ``out`` (default stderr)."""
    try:
        return asyncio.run(follow(app, op, args, out=out or sys.stderr,
                                  quiet=bool(getattr(ns, "quiet", False))))
    except KeyboardInterrupt:
        print(f"\ncorral {ns.command}: interrupted; the deploy of {app!r} goes on in the kernel."
              f" Follow it with `corral events {app}`, check it with `corral ps`.",
              file=sys.stderr)
        raise


def cmd_events(ns: argparse.Namespace) -> int:
    """Print the kernel's events as they happen (one app's, or all); Ctrl-C ends."""
    prefix = f"app.{ns.app}." if ns.app else ""

    async def stream() -> None:
        async for event in events(prefix):
            stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
            line = describe(ns.app, event) if ns.app and not ns.raw else None
            print(f"{stamp} {line.strip() if line else event.topic + ' ' + str(event.data)}",
                  flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        return 0
    return 0


def add_flags(s: argparse.ArgumentParser) -> None:
    """The flags of every command that rolls an app (up, scale, restart, rollback, config)."""
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="time each new instance has to be ready and healthy (default: the "
                   "process's start_timeout, else the host's start_timeout_s, 60 s)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def add_parsers(sub: Any) -> None:
    """``corral events``."""
    s = sub.add_parser("events", help=cmd_events.__doc__)
    s.add_argument("app", nargs="?", help="only this app's events")
    s.add_argument("--raw", action="store_true", help="topic and data as sent")
