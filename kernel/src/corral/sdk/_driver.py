"""The Python driver runtime: declare operations with ``@op``, start with ``run(MyDriver)``.

The operations a driver serves form an explicit table built when the class is defined; HELLO
declares exactly that table, and the kernel checks it against the capability's contract.
Lifecycle operations' arguments are validated against the models in ``corral.protocol``
before the handler runs. A driver that loses the kernel keeps running and reconnects: the
apps it serves (proxied connections, log capture) must not notice a kernel restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from corral._forksafety import protect_signal_handlers
from corral.bus import Connection, Handler
from corral.errors import CorralError, ErrorCode
from corral.host import bus_endpoint
from corral.protocol import (
    LIFECYCLE_OPS,
    PROTOCOL,
    QUERY_OP,
    DriverDescription,
    Hello,
    ManifestCheck,
    ManifestChecked,
    Welcome,
)

log = structlog.get_logger("corral.sdk")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def op(name: str) -> Callable[[F], F]:
    """Mark a coroutine method as the handler of operation ``name``."""
    if name not in LIFECYCLE_OPS and QUERY_OP.match(name) is None:
        raise ValueError(f"{name!r} is neither a lifecycle operation nor query.<cap>.<name>")

    def mark(fn: F) -> F:
        fn.__corral_op__ = name  # type: ignore[attr-defined]
        return fn

    return mark


class KernelLink:
    """The driver's handle on the kernel: requests and events."""

    def __init__(self) -> None:
        self._conn: Connection | None = None

    @property
    def welcomed(self) -> bool:
        """Whether the current connection has had the kernel's WELCOME (requests may go)."""
        return self._conn is not None and self._conn.welcome is not None

    async def call(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Ask the kernel (ledger.claim, instance.spawn, ...); raises CorralError,
        ``UNAVAILABLE`` (retry) while not connected or before the kernel's WELCOME (a request
        sent ahead of it would make the kernel refuse the driver: HELLO first)."""
        if self._conn is None or self._conn.welcome is None:
            raise CorralError("kernel not connected", code=ErrorCode.UNAVAILABLE, retry=True)
        return await self._conn.call(op, args, timeout=timeout)

    async def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an event through the kernel's PUB socket (best effort)."""
        if self._conn is not None:
            await self._conn.publish(topic, data)


class Driver:
    """Base class of Python drivers. Subclasses set name, capability, version.

    ``description``: the driver's entry point description. When it names manifest sections
    (``DriverDescription.sections``) the driver declares them in HELLO and serves
    ``manifest.check`` with their checkers (``corral.sdk.sections``), automatically.
    """

    name: ClassVar[str]
    capability: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    operations: ClassVar[dict[str, str]] = {}
    features: ClassVar[frozenset[str]] = frozenset()  # corral.protocol.FEATURES it declares
    description: ClassVar[DriverDescription | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        table: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                name = getattr(value, "__corral_op__", None)
                if name is not None:
                    table[name] = attr
        if cls.description is not None and cls.description.sections:
            table.setdefault("manifest.check", "check_manifest")
        cls.operations = table

    def __init__(self) -> None:
        self.kernel = KernelLink()
        self.config: dict[str, Any] = {}
        self.home = Path(os.environ.get("CORRAL_HOME", "."))
        self.runtime_dir = Path(os.environ.get("CORRAL_RUNTIME_DIR", "."))

    async def start(self) -> None:
        """Called once before the first connection (open state, start servers)."""

    async def stop(self) -> None:
        """Called once on orderly shutdown."""

    async def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an event on the kernel's bus."""
        await self.kernel.publish(topic, data)

    async def check_manifest(self, args: ManifestCheck) -> ManifestChecked:
        """``manifest.check``: the description's section checkers (``corral.sdk.sections``)."""
        from corral.sdk.sections import check_sections, load_section

        assert self.description is not None
        owned = {name: load_section(target)
                 for name, target in self.description.sections.items()}
        return check_sections(owned, args)

    def handlers(self) -> dict[str, Handler]:
        """The explicit dispatch table handed to the connection."""
        return {
            name: self._wrap(name, getattr(self, attr)) for name, attr in self.operations.items()
        }

    def _wrap(self, name: str, fn: Callable[[Any], Awaitable[Any]]) -> Handler:
        model = LIFECYCLE_OPS[name].args if name in LIFECYCLE_OPS else None

        async def handle(args: dict[str, Any]) -> dict[str, Any]:
            parsed: Any = args
            if model is not None:
                try:
                    parsed = model.model_validate(args)
                except ValidationError as exc:
                    raise CorralError(
                        f"{name}: invalid arguments: {exc.errors()[0]['msg']}",
                        code=ErrorCode.INVALID,
                    ) from None
            result = await fn(parsed)
            if isinstance(result, BaseModel):
                return result.model_dump(mode="json")
            return dict(result or {})

        return handle

    def hello(self, token: str | None) -> Hello:
        """This driver's HELLO."""
        return Hello(
            role="driver",
            name=self.name,
            version=self.version,
            protocols=[PROTOCOL],
            capability=self.capability,
            ops=sorted(self.operations),
            features=sorted(self.features),
            sections=sorted(self.description.sections) if self.description else [],
            token=token,
        )

    def welcomed(self, welcome: Welcome) -> None:
        """Take the configuration the kernel handed over."""
        self.config = welcome.config
        if welcome.home:
            self.home = Path(welcome.home)
        if welcome.runtime_dir:
            self.runtime_dir = Path(welcome.runtime_dir)


async def serve(driver: Driver, endpoint: str, token: str | None) -> None:
    """Connect, serve, and reconnect whenever the kernel is lost, until SIGTERM or BYE."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await driver.start()
    try:
        while not stop.is_set():
            conn = Connection(endpoint, driver.hello(token), handlers=driver.handlers(),
                              on_welcome=driver.welcomed)
            driver.kernel._conn = conn  # handlers may call the kernel as soon as WELCOME is in
            try:
                await conn.connect(timeout=2.0)
            except CorralError as exc:
                if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                    log.error("kernel refused this driver", reason=exc.reason)
                    raise SystemExit(3) from None
                driver.kernel._conn = None
                await _sleep_or(stop, 0.5)
                continue
            runner = asyncio.create_task(conn.run())
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            driver.kernel._conn = None
            if stopper in done:
                runner.cancel()
                await conn.bye("driver stopping")
                break
            stopper.cancel()
            conn.close()
            if runner.result():  # the kernel said BYE: it is stopping us
                break
            log.info("reconnecting to the kernel")
    finally:
        await driver.stop()


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


def run(driver_cls: type[Driver], *, uvloop: bool = False) -> None:
    """Entry point of a Python driver process (``python -m corral_<cap>``).

    ``uvloop=True`` runs the driver on uvloop when it is installed (the lb's proxy wants it);
    it is off by default because some libraries (pyroute2's netlink sockets) need the
    standard event loop.
    """
    endpoint = os.environ.get("CORRAL_BUS") or bus_endpoint()
    token = os.environ.get("CORRAL_DRIVER_TOKEN")
    # A child forked by a library (pyroute2 forks for netns work) inherits asyncio's signal
    # wake-up fd: a SIGTERM sent to that child would be read by *our* loop as our own
    # SIGTERM, and the driver would stop. Children get default signal handling instead.
    protect_signal_handlers()
    if uvloop:
        try:
            import uvloop as _uvloop

            _uvloop.install()
        except ImportError:
            pass
    asyncio.run(serve(driver_cls(), endpoint, token))
