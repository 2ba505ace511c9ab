"""The ONE module that speaks to nftables, through libnftables' JSON API.

Every change is one ``nft`` transaction: a JSON batch either applies whole or not at all.
Only tables corral owns are ever touched; the host's ruleset is never flushed.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from corral.errors import CorralError, ErrorCode

Command = dict[str, Any]


class Nftables:
    """A thread-safe handle on libnftables with JSON input and output."""

    def __init__(self) -> None:
        try:
            import nftables
        except (ImportError, OSError) as exc:  # the binding dlopens libnftables.so.1
            raise CorralError(
                f"net: cannot load libnftables ({exc}); install Debian's libnftables1",
                code=ErrorCode.UNAVAILABLE,
            ) from exc
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def apply(self, commands: list[Command], *, what: str) -> None:
        """Run ``commands`` as one atomic transaction; raise naming ``what`` if nft refuses."""
        if not commands:
            return
        batch = json.dumps({"nftables": commands})
        with self._lock:
            rc, _out, err = self._nft.cmd(batch)
        if rc != 0:
            raise CorralError(f"net: nftables refused {what}: {err.strip()}",
                              code=ErrorCode.INTERNAL)

    def list_table(self, family: str, table: str) -> list[dict[str, Any]] | None:
        """Return the JSON objects of ``family table`` (None if the table does not exist)."""
        with self._lock:
            rc, out, _err = self._nft.cmd(f"list table {family} {table}")
        if rc != 0:
            return None
        objects: list[dict[str, Any]] = json.loads(out).get("nftables", [])
        return [o for o in objects if "metainfo" not in o]

    def tables(self) -> list[tuple[str, str]]:
        """Every (family, name) table on the host."""
        with self._lock:
            rc, out, err = self._nft.cmd("list tables")
        if rc != 0:
            raise CorralError(f"net: nft list tables: {err.strip()}", code=ErrorCode.INTERNAL)
        return [
            (o["table"]["family"], o["table"]["name"])
            for o in json.loads(out).get("nftables", []) if "table" in o
        ]

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """Named counters of a table: name -> (packets, bytes); empty if the table is absent."""
        found: dict[str, tuple[int, int]] = {}
        for obj in self.list_table(family, table) or []:
            counter = obj.get("counter")
            if counter is not None:
                found[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
        return found
