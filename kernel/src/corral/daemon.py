"""``corrald``: run the kernel in the foreground (systemd ``Type=notify``: ``READY=1`` once the
bus serves and the drivers are started; ``corral host install`` writes the unit).

The kernel never loads OpenSSL. Its bus is local IPC, authenticated by the peer's uid
(SO_PEERCRED), so it has no use for TLS or OpenSSL's hashes, and ``libcrypto`` alone would add
~6 MiB to its resident size (goal: <= 40 MiB idle). :func:`main` therefore marks ``ssl`` and
``_hashlib`` as absent before asyncio is imported: asyncio runs without TLS support and
``hashlib``/``hmac`` use CPython's built-in digests. A consequence is that the kernel runs on
the standard asyncio loop, not uvloop (which requires ``ssl``); the bus drains its sockets from
the loop's reader either way and meets its throughput goal on the standard loop.
"""

from __future__ import annotations

import argparse
import sys

#: Modules corrald must not load (see the module docstring).
WITHOUT = ("ssl", "_ssl", "_hashlib")


def keep_openssl_out() -> None:
    """Make ``import ssl`` and ``import _hashlib`` fail in this process.

    Only takes effect before anything imported them; a module already loaded (``corral daemon``
    run from a CLI process that imported asyncio) stays as it is.
    """
    for name in WITHOUT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: import refused


def configure_logging(verbose: bool = False) -> None:
    """structlog to stderr, key=value lines, INFO (DEBUG with -v)."""
    import logging

    import structlog

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
    keep_openssl_out()
    _lean_malloc()
    parser = argparse.ArgumentParser(prog="corrald", description="the corral kernel")
    parser.add_argument("--stop-drivers", action="store_true",
                        help="stop the drivers when the kernel stops (default: they outlive it "
                             "and reconnect to the next kernel, so apps keep being served)")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(argv)
    configure_logging(ns.verbose)
    import asyncio
    import os

    from corral import systemd
    from corral.errors import CorralError
    from corral.kernel import Kernel

    # Only corrald itself speaks to the service manager: nothing it starts inherits the socket.
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        kernel = Kernel(stop_drivers_on_exit=ns.stop_drivers)
    except CorralError as exc:
        print(f"corrald: {exc.reason}", file=sys.stderr)
        return 2

    def ready() -> None:
        print("corrald: ready", file=sys.stderr, flush=True)
        if notify_socket:
            systemd.notify(f"READY=1\nSTATUS=serving {kernel.bus.endpoint}", notify_socket)

    asyncio.run(kernel.run(ready=ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
