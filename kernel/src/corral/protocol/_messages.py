"""CDP/1 message bodies: one pydantic model per command. The models are the contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL = "CDP/1"

Role = Literal["driver", "client", "remote"]


class Body(BaseModel):
    """Base of every message body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class Hello(Body):
    """A peer's first message. Drivers name their capability and the operations they serve."""

    role: Role
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")
    version: str = Field(max_length=64)
    protocols: list[str] = Field(min_length=1, description='e.g. ["CDP/1"]')
    capability: str | None = Field(default=None, description="drivers: net, fs, log, lb, cron")
    ops: list[str] = Field(default_factory=list, description="drivers: operations served")
    features: list[str] = Field(
        default_factory=list, max_length=64,
        description="drivers: optional behaviours the kernel may rely on (FEATURES)")
    token: str | None = Field(default=None, description="drivers: CORRAL_DRIVER_TOKEN")
    sections: list[str] = Field(
        default_factory=list, max_length=64,
        description="drivers: the manifest sections it owns and checks with manifest.check "
        "(e.g. [\"lb\"]); a section no enabled driver owns is refused")


class Welcome(Body):
    """The kernel's answer to an accepted HELLO."""

    protocol: Literal["CDP/1"] = "CDP/1"
    peer_id: str
    heartbeat_ms: int = Field(gt=0)
    config: dict[str, Any] = Field(default_factory=dict)
    home: str = ""
    runtime_dir: str = ""


class Request(Body):
    """A request; ``id`` is chosen by the sender and echoed in the REPLY or ERROR."""

    id: int = Field(ge=0)
    op: str = Field(min_length=1, max_length=128)
    args: dict[str, Any] = Field(default_factory=dict)
    deadline_ms: int | None = Field(default=None, gt=0)


class Reply(Body):
    """A successful answer to REQUEST ``id``."""

    id: int = Field(ge=0)
    result: dict[str, Any] = Field(default_factory=dict)


class Error(Body):
    """A failure: answers REQUEST ``id`` (or HELLO/a bad frame with id null)."""

    id: int | None = None
    code: int
    reason: str
    retry: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


class Event(Body):
    """A notification; published by the kernel on PUB under ``topic``."""

    topic: str = Field(min_length=1, max_length=256)
    time: float
    data: dict[str, Any] = Field(default_factory=dict)


class Heartbeat(Body):
    """Liveness, both ways, every ``heartbeat_ms``; three missed means the peer is dead."""

    time: float = 0.0


class Bye(Body):
    """Orderly goodbye; the receiver forgets the peer."""

    reason: str = ""


BODIES: dict[str, type[Body]] = {
    "HELLO": Hello,
    "WELCOME": Welcome,
    "REQUEST": Request,
    "REPLY": Reply,
    "ERROR": Error,
    "EVENT": Event,
    "HEARTBEAT": Heartbeat,
    "BYE": Bye,
}
"""Explicit table: command name -> body model. Nothing else is a CDP/1 command."""
