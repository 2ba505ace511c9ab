"""Kernel L4 data plane: nftables DNAT through a weighted slot map, in ``table ip corral_lb``.

Layout (created once, in one transaction; left in place across driver restarts so that
traffic keeps flowing while the driver is down):

    table ip corral_lb
      map fe_any  { inet_service : verdict }              frontend port (any local address)
      map fe_addr { ipv4_addr . inet_service : verdict }  frontend address . port
      chain prerouting (nat, dstnat)   fib daddr type local tcp dport vmap @fe_any; ...
      chain output     (nat, -100)     the same for traffic from the host itself
      chain postrouting (nat, srcnat)  masquerade loopback-sourced flows DNATed off loopback
      per service:  map m_<key> { slot : addr . port }   chain c_<key> { dnat via @m_<key> }

A membership change rewrites only the service's map (flush + add, one atomic transaction), so
established flows keep their conntrack entry and new flows see the new table at once.

The host's own connections to loopback frontends are, where the host allows it, translated
once at ``connect()`` instead of per packet (:mod:`corral_lb.socket_lb`), from the same slot
table; the DNAT rules stay in place for everything else and as the fallback.
This module is the only place in the lb driver that speaks to nftables; it never touches
another table and never flushes the ruleset.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from corral.errors import CorralError
from corral_lb.backend import Backend
from corral_lb.policy import slot_table
from corral_lb.socket_lb import SocketBalancer, SocketLbUnavailable

log = structlog.get_logger("corral_lb")

TABLE = "corral_lb"
SLOTS = 256

_SELECTORS = {
    "weighted": f"numgen random mod {SLOTS}",
    "round-robin": f"numgen inc mod {SLOTS}",
    "hash-source": f"jhash ip saddr mod {SLOTS} seed 0x636f72",
}


class NftError(CorralError):
    """An nftables transaction failed; the reason carries libnftables' message."""


def service_key(name: str) -> str:
    """Short nft-safe identifier for a service name (names may hold dots and dashes)."""
    return hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


class NftPlane:
    """Installs, updates and removes DNAT services in ``table ip <table>`` (``corral_lb``).

    Each lb driver on a host needs a table of its own (host config ``[drivers.lb] config =
    { nft_table = "..." }``): garbage collection removes every service of the table that the
    driver does not know.
    """

    def __init__(self, table: str = TABLE, owner: str = "", *, socket_lb: bool = True) -> None:
        import nftables  # imported here: only hosts using the kernel plane need libnftables

        if not table or not all(c.isalnum() or c == "_" for c in table):
            raise NftError(f"lb nft_table {table!r}: letters, digits and _ only", retry=False)
        self.table = table
        # Written into each service's rule comment: garbage collection by one driver spares
        # the services another driver (another kernel) installed in a shared table.
        self.owner = "".join(c for c in owner if c.isalnum())[:16]
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()
        # connect-time translation of the host's own connections (None: DNAT only)
        self._socket_lb_wanted = socket_lb
        self._socket_lb: SocketBalancer | None = None
        self._frontends: dict[str, tuple[tuple[str, int], str]] = {}  # name -> (listen, policy)

    # -- connect-time translation ---------------------------------------------------------------

    @property
    def socket_lb(self) -> SocketBalancer | None:
        """The connect4 program, started on first use; None when off or unavailable."""
        if self._socket_lb is None and self._socket_lb_wanted:
            try:
                self._socket_lb = SocketBalancer(SLOTS)
            except SocketLbUnavailable as exc:
                self._socket_lb_wanted = False
                log.warning("host connections to nft frontends use DNAT only", reason=str(exc))
        return self._socket_lb

    def _socket_set(self, name: str, table: Sequence[Backend]) -> None:
        known = self._frontends.get(name)
        sb = self.socket_lb
        if known is None or sb is None:
            return
        try:
            sb.set(known[0], known[1], table)
        except OSError as exc:  # never fail the DNAT update for it: fall back to DNAT
            log.warning("connect-time translation off for a service", service=name,
                        error=str(exc))
            self._socket_forget(name)

    def _socket_forget(self, name: str) -> None:
        known = self._frontends.pop(name, None)
        if known is not None and self._socket_lb is not None:
            for fe in SocketBalancer.handles(*known):
                self._socket_lb.remove(fe)

    def socket_frontends(self, name: str) -> list[tuple[str, int]]:
        """The service's frontends the connect4 program translates now."""
        known = self._frontends.get(name)
        sb = self._socket_lb
        if known is None or sb is None:
            return []
        return [fe for fe in SocketBalancer.handles(*known) if sb.table(fe) is not None]

    def close(self) -> None:
        """Detach the connect4 program (the nft table stays: traffic keeps flowing)."""
        if self._socket_lb is not None:
            self._socket_lb.close()
            self._socket_lb = None
        self._frontends.clear()

    # -- low level ----------------------------------------------------------------------------

    def _text(self, script: str, what: str) -> None:
        with self._lock:
            rc, _, err = self._nft.cmd(script)
        if rc != 0:
            raise NftError(f"nft {what}: {err.strip() or f'exit {rc}'}")

    def _json(self, commands: list[dict[str, Any]], what: str) -> None:
        with self._lock:
            rc, _, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(f"nft {what}: {str(err).strip() or f'exit {rc}'}")

    def _list(self, what: str) -> list[dict[str, Any]] | None:
        with self._lock:
            rc, out, _ = self._nft.cmd(what)
        if rc != 0:
            return None
        items: list[dict[str, Any]] = json.loads(out)["nftables"]
        return items

    # -- table --------------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the table with its base chains and frontend maps unless it already exists."""
        if self._list(f"list table ip {self.table}") is not None:
            return
        dispatch = (
            "ip daddr . tcp dport vmap @fe_addr\n"
            "    fib daddr type local tcp dport vmap @fe_any"
        )
        self._text(
            f"""table ip {self.table} {{
  map fe_any {{ type inet_service : verdict; }}
  map fe_addr {{ type ipv4_addr . inet_service : verdict; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {dispatch}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    {dispatch}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat ip saddr 127.0.0.0/8 ip daddr != 127.0.0.0/8 masquerade
  }}
}}""",
            "create table",
        )

    def delete_table(self) -> None:
        """Remove the whole ``corral_lb`` table (``corral down`` of the last service, tests)."""
        if self._list(f"list table ip {self.table}") is not None:
            self._text(f"delete table ip {self.table}", "delete table")

    # -- services -----------------------------------------------------------------------------

    def installed(self, *, mine: bool = False) -> set[str]:
        """Keys of the services present in the table; with ``mine``, only those this owner
        installed (what state.sync may garbage-collect)."""
        items = self._list(f"list table ip {self.table}") or []
        keys = {
            i["chain"]["name"][2:] for i in items
            if "chain" in i and i["chain"]["name"].startswith("c_")
        }
        if not mine:
            return keys
        tag = f" @{self.owner}"
        return {
            i["rule"]["chain"][2:] for i in items
            if "rule" in i and i["rule"]["chain"][2:] in keys
            and str(i["rule"].get("comment", "")).endswith(tag)
        }

    def install(self, name: str, listen: tuple[str, int], policy: str) -> str:
        """Create (or replace) the chain and map of a service; return its key."""
        if policy not in _SELECTORS:
            raise NftError(
                f"lb service {name!r}: policy {policy!r} is not available on the nft plane "
                f"(use one of {', '.join(_SELECTORS)})",
                retry=False,
            )
        self.ensure_table()
        key = service_key(name)
        host, port = listen
        if host in ("0.0.0.0", ""):  # noqa: S104 - matches, does not bind
            elem = f"add element ip {self.table} fe_any {{ {port} : jump c_{key} }}"
        else:
            elem = f"add element ip {self.table} fe_addr {{ {host} . {port} : jump c_{key} }}"
        drop = self._remove_script(key, listen) if key in self.installed() else ""
        self._text(
            drop
            + f"add map ip {self.table} m_{key} {{ typeof numgen random mod {SLOTS} : "
            "ip daddr . tcp dport; }\n"
            f"add chain ip {self.table} c_{key}\n"
            f"add rule ip {self.table} c_{key} meta l4proto tcp dnat ip to {_SELECTORS[policy]} "
            f"map @m_{key} "
            f'comment "{_comment(name, self.owner)}"\n' + elem + "\n",
            f"install service {name!r}",
        )
        self._socket_forget(name)  # a replaced service may have moved
        self._frontends[name] = (listen, policy)  # translated once it has backends
        return key

    def set_backends(self, name: str, backends: Sequence[Backend]) -> list[Backend]:
        """Fill the service's slot map in proportion to weights, atomically; return the table."""
        key = service_key(name)
        table = slot_table(backends, SLOTS)
        commands: list[dict[str, Any]] = [
            {"flush": {"map": {"family": "ip", "table": self.table, "name": f"m_{key}"}}}
        ]
        if table:
            commands.append({"add": {"element": {
                "family": "ip", "table": self.table, "name": f"m_{key}",
                "elem": [[i, {"concat": [b.host, b.port]}] for i, b in enumerate(table)],
            }}})
        self._json(commands, f"update backends of {name!r}")
        self._socket_set(name, table)
        return table

    def slots(self, name: str) -> dict[int, tuple[str, int]]:
        """The service's slot map as installed in the kernel (for status and tests)."""
        items = self._list(f"list map ip {self.table} m_{service_key(name)}") or []
        out: dict[int, tuple[str, int]] = {}
        for i in items:
            if "map" in i:
                for k, v in i["map"].get("elem", []):
                    addr, port = v["concat"]
                    out[int(k)] = (addr, int(port))
        return out

    def uninstall(self, name: str, listen: tuple[str, int]) -> None:
        """Remove a service's frontend element, chain and map (one transaction)."""
        key = service_key(name)
        self._socket_forget(name)
        if key not in self.installed():
            return
        self._text(self._remove_script(key, listen), f"remove service {name!r}")
        self._drop_if_empty()

    def _drop_if_empty(self) -> None:
        """Delete the table once its last service is gone: teardown leaves the ruleset as it
        was before the first service."""
        if not self.installed():
            self.delete_table()

    def uninstall_key(self, key: str) -> None:
        """Remove a service known only by key (garbage from a previous run)."""
        items = self._list(f"list table ip {self.table}") or []
        script = ""
        for i in items:
            m = i.get("map")
            if m and m["name"] in ("fe_any", "fe_addr"):
                for k, v in m.get("elem", []):
                    if v.get("jump", {}).get("target") == f"c_{key}":
                        if m["name"] == "fe_any":
                            script += f"delete element ip {self.table} fe_any {{ {k} }}\n"
                        else:
                            a, p = k["concat"]
                            script += f"delete element ip {self.table} fe_addr {{ {a} . {p} }}\n"
        script += (f"flush chain ip {self.table} c_{key}\ndelete chain ip {self.table} c_{key}\n"
                   f"delete map ip {self.table} m_{key}\n")
        self._text(script, f"remove stale service {key}")
        self._drop_if_empty()

    def _remove_script(self, key: str, listen: tuple[str, int]) -> str:
        table = self.table
        host, port = listen
        if host in ("0.0.0.0", ""):  # noqa: S104 - matches, does not bind
            elem = f"delete element ip {table} fe_any {{ {port} }}\n"
        else:
            elem = f"delete element ip {table} fe_addr {{ {host} . {port} }}\n"
        return (elem + f"flush chain ip {table} c_{key}\ndelete chain ip {table} c_{key}\n"
                f"delete map ip {table} m_{key}\n")


def _comment(name: str, owner: str) -> str:
    text = "corral lb " + "".join(c for c in name if c.isalnum() or c in ".-_")[:100]
    return f"{text} @{owner}" if owner else text


CONNTRACK = Path("/proc/net/nf_conntrack")


def established_to(b: Backend, conntrack: Path = CONNTRACK) -> int:
    """Established flows whose reply comes from backend ``b`` (0 if conntrack is hidden):
    DNATed ones, and the host's own connections translated at connect() (which reach ``b``
    directly, so they are told apart from nothing else: a drain also waits for other direct
    connections to ``b``, within its timeout).

    The kernel keeps forwarding such flows after ``b`` left the map; a drain waits for them
    before the instance is stopped.
    """
    try:
        text = conntrack.read_text()
    except OSError:
        return 0
    n = 0
    for line in text.splitlines():
        if " ESTABLISHED " not in line:
            continue
        src: list[str] = []
        sport: list[str] = []
        dst: list[str] = []
        dport: list[str] = []
        for token in line.split():
            k, _, v = token.partition("=")
            if k == "src":
                src.append(v)
            elif k == "dst":
                dst.append(v)
            elif k == "sport":
                sport.append(v)
            elif k == "dport":
                dport.append(v)
        if len(src) < 2 or len(sport) < 2 or len(dst) < 1 or len(dport) < 1:
            continue
        if src[1] == b.host and sport[1] == str(b.port):  # the reply tuple comes from b
            n += 1
    return n
