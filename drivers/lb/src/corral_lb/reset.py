"""``python -m corral_lb.reset``: the lb driver's part of ``corral host reset``.

Finds, by the host config's ``[drivers.lb]`` ``nft_table`` (default ``corral_lb``) and the
home's path alone (no ledger): the services this kernel installed in ``table ip <nft_table>``
(tagged with the owner derived from the home's path, as the driver tags them), removed one by
one, and the table once no service of any kernel is left in it. The connect-time BPF program
is held by the driver process only (nothing pinned) and goes when that process is killed;
policy program sockets live in the runtime dir.
"""

from __future__ import annotations

import hashlib
from functools import partial

from corral.sdk import ResetReport, ResetRequest, serve_reset
from corral_lb.nft import TABLE, NftPlane


def reset(request: ResetRequest, report: ResetReport) -> None:
    """Find (and with ``request.apply`` remove) this kernel's services in the lb's nft table."""
    try:
        import nftables

        nftables.Nftables()
    except (ImportError, OSError):
        return  # no libnftables: the kernel plane was never available, nothing to find
    owner = hashlib.blake2b(str(request.home).encode(), digest_size=6).hexdigest()
    plane = NftPlane(str(request.config.get("nft_table", TABLE)), owner=owner, socket_lb=False)
    for key in sorted(plane.installed(mine=True)):
        report.item(f"nftables service {key} in table ip {plane.table}",
                    partial(plane.uninstall_key, key), apply=request.apply)
    if plane._list(f"list table ip {plane.table}") is not None and not plane.installed():
        # empty (a crash between the last removal and the drop): gone with nothing in it
        report.item(f"nftables table ip {plane.table} (empty)", plane.delete_table,
                    apply=request.apply)


if __name__ == "__main__":
    serve_reset(reset)
