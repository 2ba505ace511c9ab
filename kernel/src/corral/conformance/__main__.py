"""``python -m corral.conformance [OPTIONS] -- CMD ARGS...``: check a driver executable.

Also ``--write-schemas DIR`` (JSON Schemas of every body and operation) and ``--list``.
Run it on a test host: ``state.sync`` with no apps asks the driver to collect whatever it
finds, and host-wide state (nftables tables, network namespaces) is not private to the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corral.conformance._checks import CHECKS
from corral.conformance._kit import run_kit
from corral.conformance._schemas import write_schemas


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print one line per check; the exit status (0: all passed)."""
    parser = argparse.ArgumentParser(
        prog="python -m corral.conformance",
        description="Start a CDP/1 driver as the corral kernel would and check it conforms.",
    )
    parser.add_argument("--capability", help="the capability the driver must declare")
    parser.add_argument("--heartbeat-ms", type=int, default=300,
                        help="heartbeat interval handed over in WELCOME (default 300)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the driver (repeatable)")
    parser.add_argument("--write-schemas", metavar="DIR", type=Path,
                        help="write the JSON Schemas of CDP/1 into DIR and exit")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("command", nargs="*", help="the driver command (after --)")
    args = parser.parse_args(argv)

    if args.write_schemas is not None:
        written = write_schemas(args.write_schemas)
        print(f"wrote {len(written)} schemas into {args.write_schemas}")
        return 0
    if args.list:
        for spec in CHECKS:
            print(f"{spec.name}: {spec.doc}")
        return 0
    if not args.command:
        parser.error("name the driver command after --")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value

    result = run_kit(args.command, capability=args.capability, heartbeat_ms=args.heartbeat_ms,
                     extra_env=env, on_outcome=lambda o: print(o.line(), flush=True))
    failed = [o for o in result.outcomes if o.status != "PASS"]
    if failed:
        print(f"---- {len(failed)} of {len(result.outcomes)} checks did not pass; "
              "driver output (last lines):", file=sys.stderr)
        print(result.driver_log, file=sys.stderr)
        return 1
    print(f"all {len(result.outcomes)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
