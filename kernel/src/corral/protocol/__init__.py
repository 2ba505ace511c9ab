"""CDP/1, the corral driver protocol: frames, message bodies, operation tables, lifecycle models.

This package is the contract between the kernel, its clients and its drivers. It holds
documented models and tables and no behaviour beyond encoding and strict decoding.
"""

from corral.protocol._driver import DriverDescription
from corral.protocol._frames import MAX_BODY, SIGNATURE, decode, encode
from corral.protocol._lifecycle import (
    AppSpec,
    BindMount,
    InstanceRecord,
    InstanceSpec,
    LaunchPlan,
    PlanFragment,
)
from corral.protocol._messages import (
    BODIES,
    PROTOCOL,
    Body,
    Bye,
    Error,
    Event,
    Heartbeat,
    Hello,
    Reply,
    Request,
    Welcome,
)
from corral.protocol._ops import (
    CAPABILITIES,
    FEATURES,
    KERNEL_OPS,
    KERNEL_SECTIONS,
    LIFECYCLE_OPS,
    QUERY_OP,
    Args,
    Capability,
    ClaimItem,
    ManifestCheck,
    ManifestChecked,
    Operation,
    SectionPort,
    SectionProblem,
    check_driver_ops,
)

__all__ = [
    "BODIES",
    "CAPABILITIES",
    "FEATURES",
    "KERNEL_OPS",
    "KERNEL_SECTIONS",
    "LIFECYCLE_OPS",
    "MAX_BODY",
    "PROTOCOL",
    "QUERY_OP",
    "SIGNATURE",
    "AppSpec",
    "Args",
    "BindMount",
    "Body",
    "Bye",
    "Capability",
    "ClaimItem",
    "DriverDescription",
    "Error",
    "Event",
    "Heartbeat",
    "Hello",
    "InstanceRecord",
    "InstanceSpec",
    "LaunchPlan",
    "ManifestCheck",
    "ManifestChecked",
    "Operation",
    "PlanFragment",
    "Reply",
    "Request",
    "SectionPort",
    "SectionProblem",
    "Welcome",
    "check_driver_ops",
    "decode",
    "encode",
]
