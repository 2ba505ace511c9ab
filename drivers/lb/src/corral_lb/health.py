"""Health probes: a TCP connect or an HTTP GET, with rise/fall thresholds."""

from __future__ import annotations

import asyncio

from corral_lb.config import HealthConfig


async def probe(host: str, port: int, cfg: HealthConfig, hostname: str = "") -> str:
    """Probe once; return "" when healthy, else what failed (e.g. 'http 503', 'refused')."""
    try:
        async with asyncio.timeout(cfg.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if cfg.http is None:
                    return ""
                writer.write(
                    f"GET {cfg.http} HTTP/1.1\r\nHost: {hostname or host}\r\n"
                    "User-Agent: corral-lb-health\r\nConnection: close\r\n\r\n".encode()
                )
                line = await reader.readline()
                parts = line.split(None, 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                    return f"http: bad status line {line[:60]!r}"
                status = int(parts[1])
                return "" if 200 <= status < 400 else f"http {status}"
            finally:
                writer.close()
    except TimeoutError:
        return f"timeout after {cfg.timeout:g}s"
    except ConnectionRefusedError:
        return "connection refused"
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


class HealthCounter:
    """Turns a stream of probe results into up/down transitions with rise/fall hysteresis."""

    __slots__ = ("fails", "fall", "passes", "rise", "up")

    def __init__(self, rise: int, fall: int, *, up: bool = False) -> None:
        self.rise, self.fall = rise, fall
        self.passes = self.fails = 0
        self.up = up

    def record(self, ok: bool) -> bool | None:
        """Count one result; return the new state on a transition, None otherwise."""
        if ok:
            self.fails = 0
            self.passes += 1
            if not self.up and self.passes >= self.rise:
                self.up = True
                return True
        else:
            self.passes = 0
            self.fails += 1
            if self.up and self.fails >= self.fall:
                self.up = False
                return False
        return None
