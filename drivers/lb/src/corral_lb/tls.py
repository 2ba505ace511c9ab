"""TLS for the shared HTTPS frontend: Mozilla "intermediate" contexts, routed by SNI.

``server_context`` makes the SSLContext of one certificate; ``SniRouter`` holds one per
domain and hands the frontend a single context to accept with, whose SNI callback switches
each handshake to the certificate of the name the client asked for::

    router = SniRouter()
    router.set(["shop.example.com", "*.shop.example.com"], server_context(cert, key))
    await loop.connect_accepted_socket(factory, sock, ssl=router.context)
    ...
    sni(transport)  # in the protocol: the name the client sent, to check Host against

Policy (Mozilla server-side TLS guidelines 6.0, intermediate): TLS 1.2 and 1.3 only; for
TLS 1.2 the six ECDHE AEAD suites (DHE was dropped in 6.0), TLS 1.3 suites as OpenSSL has
them (the same three); the client's cipher order wins; key exchange groups X25519MLKEM768
(where OpenSSL has it), X25519, P-256, P-384; no compression, no renegotiation; ALPN offers
only http/1.1 (the proxy speaks HTTP/1.1).

A name nobody holds, or no name at all, fails the handshake with an ``unrecognized_name``
alert, as Caddy does and HAProxy with ``strict-sni``: serving some other app's certificate
(HAProxy's and nginx's default) would only fail the client's name check later, and would tell
anyone scanning the address which domains it serves. A router may name a ``default`` context
for clients that send no SNI at all (Caddy's ``default_sni``).

Kernel TLS: ``ssl.OP_ENABLE_KTLS`` is set where Python has it (3.12+), but asyncio and
uvloop drive OpenSSL through memory BIOs (``SSLObject``), and OpenSSL only hands a connection
to the kernel when it owns the socket (a socket BIO); so it changes nothing here. It would
also need the kernel's ``tls`` module and an OpenSSL built with ``enable-ktls``.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

log = structlog.get_logger("corral_lb")

# Mozilla guidelines 6.0, "intermediate", TLS 1.2 (openssl names, Mozilla's order).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))
# Key exchange groups, best first; the first list OpenSSL accepts is used (the post-quantum
# hybrid needs OpenSSL 3.5).
GROUPS = ("X25519MLKEM768:X25519:prime256v1:secp384r1", "X25519:prime256v1:secp384r1")
ALPN = ("http/1.1",)
# Session tickets are encrypted with keys of the context a connection was accepted with, and
# OpenSSL never rotates them: a stolen key would open every TLS 1.2 session it sealed. Mozilla
# turns tickets off in its nginx and HAProxy configurations for that reason; the router
# instead makes a new accepting context (new keys) this often, as Caddy rotates its keys
# every 12 h. A ticket older than that just costs a full handshake.
TICKET_KEY_LIFETIME = 12 * 3600.0

_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is a macro over SSL_CTX_ctrl()


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context with the intermediate policy and this certificate chain and key.

    ``cert_pem`` is the leaf certificate followed by its intermediates; ``key_pem`` the
    unencrypted private key. Raises ``ssl.SSLError`` when OpenSSL refuses them (the key does
    not match, a PEM is malformed) and ``ValueError`` for an encrypted key. Neither is ever
    written to disk: OpenSSL reads them from anonymous memory files (memfd).
    """
    ctx = _policy_context()
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


class RoutedSSLObject(ssl.SSLObject):
    """The TLS state of one accepted connection: the SNI name, and alerts that get sent.

    On the server side ``server_hostname`` stays None (it is the name a client verifies), so
    the router's SNI callback records the name the client asked for in ``sni``; the
    frontend's protocol reads it with ``sni(transport)``.

    When a handshake fails, asyncio and uvloop close the connection without sending what
    OpenSSL left in the outgoing buffer, the alert that says why (CPython gh-98078, fixed in
    later Pythons): the client sees the connection cut, not ``unrecognized_name`` or
    ``protocol_version``. So a failed handshake first reports "want read", on which both
    loops send the pending bytes, and the failure itself is raised the next time the loop
    drives the handshake. A client closes on a fatal alert, which ends the connection at
    once (the loop then reports a ConnectionResetError, the reason is in ``refused``); one
    that does not is closed by the handshake timeout (``ssl_handshake_timeout``).
    """

    sni: str | None = None
    refused: ssl.SSLError | None = None  # why the handshake failed, once it has
    _outgoing: ssl.MemoryBIO | None = None
    _sslobj: Any  # SSLObject's OpenSSL connection (_ssl._SSLSocket, untyped in typeshed)

    def do_handshake(self) -> None:
        if self.refused is not None:
            raise self.refused
        try:
            # OpenSSL's object directly, not through SSLObject.do_handshake: the loops call
            # this three times a handshake, twice ending in SSLWantReadError, and each
            # Python frame such an exception passes through costs about 0.3 us
            self._sslobj.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            if self._outgoing is None or not self._outgoing.pending:
                raise
            self.refused = e
            raise ssl.SSLWantReadError("handshake failed: the alert goes out first") from e


class _AcceptingContext(ssl.SSLContext):
    """The router's context: its SSLObjects know their outgoing buffer."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, RoutedSSLObject):
            obj._outgoing = outgoing
        return obj


def sni(transport: asyncio.BaseTransport) -> str | None:
    """The server name a TLS client sent (lower case), or None (no SNI, or not TLS)."""
    obj = transport.get_extra_info("ssl_object")
    return obj.sni if isinstance(obj, RoutedSSLObject) else None


class SniRouter:
    """Certificates by server name, switched per handshake from one accepting context.

    Names are exact (``shop.example.com``) or wildcards of one label (``*.example.com``
    matches ``a.example.com``, not ``example.com`` nor ``a.b.example.com``); an exact name
    wins over a wildcard. ``set`` and ``remove`` replace the whole table at once: a handshake
    sees the table before or after a change, never half of it, and a connection keeps the
    certificate it was handshaken with for as long as it is open.

    ``default``: the context for clients that send no SNI (None: refuse them too).
    """

    def __init__(self, default: ssl.SSLContext | None = None) -> None:
        self.default = default
        self._routes: dict[str, ssl.SSLContext] = {}
        self._context = self._accepting_context()
        self._context_born = time.monotonic()

    @property
    def context(self) -> ssl.SSLContext:
        """The context to accept with: ``connect_accepted_socket(..., ssl=router.context)``.

        Read it for every connection: it is replaced every ``TICKET_KEY_LIFETIME`` seconds.
        """
        if time.monotonic() - self._context_born > TICKET_KEY_LIFETIME:
            self.rotate_ticket_keys()
        return self._context

    def rotate_ticket_keys(self) -> None:
        """Accept new connections with a new context (new session ticket keys) from now on."""
        self._context = self._accepting_context()
        self._context_born = time.monotonic()

    def set(self, names: str | Iterable[str], ctx: ssl.SSLContext) -> None:
        """Serve ``ctx`` for these names (one or several) from the next handshake on."""
        keys = [_name_key(names)] if isinstance(names, str) else [_name_key(n) for n in names]
        routes = dict(self._routes)
        routes.update(dict.fromkeys(keys, ctx))
        self._routes = routes

    def remove(self, names: str | Iterable[str]) -> None:
        """Stop serving these names (open connections are left alone); unknown names pass."""
        keys = [_name_key(names)] if isinstance(names, str) else [_name_key(n) for n in names]
        routes = dict(self._routes)
        for key in keys:
            routes.pop(key, None)
        self._routes = routes

    def lookup(self, name: str) -> ssl.SSLContext | None:
        """The context a client asking for ``name`` gets, or None (it is refused)."""
        return self._route(name.lower().rstrip("."))

    def _route(self, key: str) -> ssl.SSLContext | None:
        """``lookup`` of a name already in lower case and without its trailing dot."""
        routes = self._routes
        ctx = routes.get(key)
        if ctx is None:
            _, dot, parent = key.partition(".")
            if dot:
                ctx = routes.get("*." + parent)
        return ctx

    @property
    def names(self) -> Mapping[str, ssl.SSLContext]:
        """The table as it is now (a snapshot: later changes make a new one)."""
        return self._routes

    def _accepting_context(self) -> ssl.SSLContext:
        # No certificate of its own: every handshake is switched to a domain's context or
        # refused. What SSL_set_SSL_CTX does not take from the new context (versions, TLS 1.2
        # ciphers, groups, options, the session cache and ticket keys) comes from this one,
        # so it carries the whole policy too.
        ctx = _policy_context(_AcceptingContext)
        ctx.sslobject_class = RoutedSSLObject
        ctx.sni_callback = self._on_sni
        return ctx

    def _on_sni(self, obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if name is None:
            ctx = self.default
        else:
            name = name.lower().rstrip(".")
            if isinstance(obj, RoutedSSLObject):
                obj.sni = name
            ctx = self._route(name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        obj.context = ctx
        return None


def _name_key(name: str) -> str:
    key = name.lower().rstrip(".")
    wild = "*" in key
    if (not key or "" in key.split(".")
            or (wild and (not key.startswith("*.") or "*" in key[1:]))):
        raise ValueError(f"not a server name or one-label wildcard: {name!r}")
    if not key.isascii():
        raise ValueError(f"not an A-label (xn--) name: {name!r}")
    return key


def _policy_context(cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)  # TLS 1.2; the TLS 1.3 defaults are Mozilla's
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: server_preferred_order false
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | getattr(ssl, "OP_ENABLE_KTLS", 0))
    if not _set_groups(ctx):
        log.debug("tls groups left at OpenSSL's defaults", openssl=ssl.OPENSSL_VERSION)
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


def _no_password() -> bytes:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key
    raise ValueError("the private key is encrypted: corral needs it unencrypted")


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # load_cert_chain() only reads paths: hand it anonymous memory files, gone at close
    fds = [os.memfd_create("corral-tls-cert"), os.memfd_create("corral-tls-key")]
    try:
        for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}",
                            password=_no_password)
    finally:
        for fd in fds:
            os.close(fd)


def _set_groups(ctx: ssl.SSLContext) -> bool:
    """Restrict key exchange to the first of GROUPS that OpenSSL knows; False if it cannot.

    Python before 3.15 sets one curve at most (``set_ecdh_curve``), which would drop X25519;
    so this calls OpenSSL's SSL_CTX_set1_groups_list() on the context's SSL_CTX, the first
    field after the object header in CPython's PySSLContext. The pointer is checked first
    (OpenSSL must report the options Python reports for it). Where that cannot be done,
    OpenSSL's defaults stay: these groups plus X448, P-521 and FFDHE, all sound.
    """
    setter = getattr(ctx, "set_groups", None) or _groups_setter(ctx)
    if setter is None:
        return False
    for groups in GROUPS:
        try:
            setter(groups)
            return True
        except (ssl.SSLError, ValueError):
            continue
    return False


def _groups_setter(ctx: ssl.SSLContext) -> Callable[[str], None] | None:
    lib = _libssl()
    if lib is None:
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
        return None

    def set_groups(groups: str) -> None:
        if lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
            lib.ERR_clear_error()  # leave no error queued for the ssl module to misreport
            raise ssl.SSLError(f"OpenSSL refused the groups {groups}")

    return set_groups


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The libssl that Python's ssl module uses, if it is a shared library of the same version."""
    import _ssl

    if sys.implementation.name != "cpython" or not getattr(_ssl, "__file__", None):
        return None
    try:
        lib = ctypes.CDLL(_ssl.__file__)  # finds the symbols of its libssl and libcrypto too
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        lib.ERR_clear_error.restype = None
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        return None
    return lib
