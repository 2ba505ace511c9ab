"""The resource ledger: who holds what, claimed all or nothing, with leases and a change log."""

from corral.ledger._base import (
    Change,
    Claim,
    ClaimOp,
    CompactedError,
    Compare,
    Lease,
    Ledger,
    Record,
    ReleaseAllOp,
    ReleaseOp,
    Txn,
    TxnOp,
    describe_owner,
)
from corral.ledger._group import GroupCommit
from corral.ledger._hosted import CLUSTER_KINDS, SEALED_KINDS, SHARED_READS, HostView
from corral.ledger._open import DEFAULT_FILE, open_ledger
from corral.ledger._sqlite import SCHEMA_VERSION, SqliteLedger

__all__ = [
    "CLUSTER_KINDS",
    "DEFAULT_FILE",
    "SCHEMA_VERSION",
    "SEALED_KINDS",
    "SHARED_READS",
    "Change",
    "Claim",
    "ClaimOp",
    "CompactedError",
    "Compare",
    "GroupCommit",
    "HostView",
    "Lease",
    "Ledger",
    "Record",
    "ReleaseAllOp",
    "ReleaseOp",
    "SqliteLedger",
    "Txn",
    "TxnOp",
    "describe_owner",
    "open_ledger",
]
