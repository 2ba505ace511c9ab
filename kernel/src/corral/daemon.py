"""``corrald``: run the kernel in the foreground (systemd ``Type=simple``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import structlog

from corral.errors import CorralError


def configure_logging(verbose: bool = False) -> None:
    """structlog to stderr, key=value lines, INFO (DEBUG with -v)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _lean_malloc() -> None:
    """Few malloc arenas: ZeroMQ's I/O threads would otherwise each get their own heap."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX = 2 (glibc)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the kernel until SIGTERM/SIGINT."""
    _lean_malloc()
    parser = argparse.ArgumentParser(prog="corrald", description="the corral kernel")
    parser.add_argument("--stop-drivers", action="store_true",
                        help="stop the drivers when the kernel stops (default: they outlive it "
                             "and reconnect to the next kernel, so apps keep being served)")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(argv)
    configure_logging(ns.verbose)
    from corral.kernel import Kernel

    try:
        kernel = Kernel(stop_drivers_on_exit=ns.stop_drivers)
    except CorralError as exc:
        print(f"corrald: {exc.reason}", file=sys.stderr)
        return 2
    try:  # uvloop when installed (a faster loop for the bus); the kernel does not require it
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(kernel.run(ready=lambda: print("corrald: ready", file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
