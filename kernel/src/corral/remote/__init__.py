"""Remote access over SSH: the keys allowed in, what each may do, and the sources they send.

Kernel side: ``KeyStore``/``Account`` keep the keys and the unprivileged account's
authorized_keys; ``authorize`` decides what a key may ask; ``unpacked`` opens what the gateway
received. SSH side: ``corral.remote.gateway`` is the forced command (``corral-ssh``) every
key runs, and the git hook of pushes.
"""

from corral.remote._access import authorize
from corral.remote._keys import Account, Key, KeyStore, PublicKey, gateway_path
from corral.remote._uploads import Branches, unpacked

__all__ = ["Account", "Branches", "Key", "KeyStore", "PublicKey", "authorize", "gateway_path",
           "unpacked"]
