"""A process that test_certs.py kills with SIGKILL in the middle of certificate work.

    cert_child.py commit ROOT NAME KEY_FILE CHAIN_FILE N
        CertStore(ROOT).save(NAME, ..., key, chain), killed at its N-th rename (before it)
    cert_child.py order ROOT NAME DIRECTORY_URL CA_BUNDLE ACCOUNT_KEY
        CertManager ordering NAME (shop.test, www.shop.test), killed when it puts the first
        HTTP-01 answer (the order is in flight at the CA)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from corral_lb.acme import AcmeIssuer
from corral_lb.certs import CertManager, CertMeta, CertStore


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def commit(root: str, name: str, key_file: str, chain_file: str, n: str) -> None:
    calls = 0
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == int(n):
            die()
        real_replace(src, dst)

    os.replace = replace  # type: ignore[assignment]
    meta = CertMeta(domains=["shop.test"], state="valid")
    CertStore(Path(root)).save(name, meta, key_pem=Path(key_file).read_bytes(),
                               fullchain_pem=Path(chain_file).read_bytes())
    print("saved", calls, flush=True)


class KillOnPut:
    def put(self, token: str, key_authorization: str) -> None:
        die()

    def remove(self, token: str) -> None:
        pass


async def order(root: str, name: str, directory: str, ca_bundle: str, account_key: str) -> None:
    issuer = AcmeIssuer(directory, ca_bundle=ca_bundle, email=None,
                        account_key_path=Path(account_key))
    manager = CertManager(CertStore(Path(root)), issuer=issuer, challenges=KillOnPut())
    await manager.want(name, ["shop.test", "www.shop.test"], "auto")
    await manager.renew(name)
    print("not killed", manager.state(name), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "commit":
        commit(*sys.argv[2:])
    else:
        asyncio.run(order(*sys.argv[2:]))
