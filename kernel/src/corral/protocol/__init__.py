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
    LIFECYCLE_OPS,
    QUERY_OP,
    AppAttach,
    AppDetach,
    Args,
    Capability,
    InstancePrepare,
    InstanceStarted,
    InstanceStopped,
    Operation,
    StateSync,
    check_driver_ops,
)

__all__ = [
    "BODIES",
    "CAPABILITIES",
    "FEATURES",
    "KERNEL_OPS",
    "LIFECYCLE_OPS",
    "MAX_BODY",
    "PROTOCOL",
    "QUERY_OP",
    "SIGNATURE",
    "AppAttach",
    "AppDetach",
    "AppSpec",
    "Args",
    "BindMount",
    "Body",
    "Bye",
    "Capability",
    "DriverDescription",
    "Error",
    "Event",
    "Heartbeat",
    "Hello",
    "InstancePrepare",
    "InstanceRecord",
    "InstanceSpec",
    "InstanceStarted",
    "InstanceStopped",
    "LaunchPlan",
    "Operation",
    "PlanFragment",
    "Reply",
    "Request",
    "StateSync",
    "Welcome",
    "check_driver_ops",
    "decode",
    "encode",
]
