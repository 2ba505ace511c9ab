"""``python -m corral_log``: run the log driver process."""

from __future__ import annotations


def main() -> None:
    """Start the driver (connects to the kernel named by $CORRAL_BUS)."""
    from corral.sdk import run
    from corral_log.driver import LogDriver

    run(LogDriver)


if __name__ == "__main__":
    main()
