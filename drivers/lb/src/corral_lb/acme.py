"""ACME (RFC 8555) issuance with the HTTP-01 challenge: an account, an order, a certificate.

Built on certbot's ``acme`` client library (``ClientV2`` over ``ClientNetwork``). What this
module adds to it:

- ``badNonce`` is retried up to ``BAD_NONCE_ATTEMPTS`` times (``ClientNetwork.post`` retries
  once: at Pebble's default 5 % rejections a two-in-a-row happens every few hundred requests,
  and a CA under load may reject more);
- polling starts after 50 ms and backs off to 2 s (the library sleeps a whole second before
  every poll), always within one deadline for the whole order;
- every failure becomes one ``AcmeError`` naming the domain and carrying the CA's problem
  detail (for a failed HTTP-01 validation: what the CA fetched, or could not fetch).

``issue`` blocks (``requests``): the driver runs it in a thread. Each call uses its own
``ClientNetwork``, so several may run at once; the account is registered once per process.

Secrets: the account key and certificate keys are never logged or put in an error. The
library's own debug log (stdlib ``logging``, logger ``acme.client``) carries signed request
bodies (public keys, CSRs, key authorizations: no private key).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import requests
import structlog
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import errors as jose_errors
from josepy import jwa, jwk

from corral.errors import CorralError, ErrorCode

log = structlog.get_logger("corral_lb")

BAD_NONCE_ATTEMPTS = 30  # at a 50 % rejection rate one POST fails with odds 2**-30
ORDER_TIMEOUT_S = 90.0  # the whole order: authorizations, validation, finalization, download
NETWORK_TIMEOUT_S = 30.0  # one HTTP request to the CA
USER_AGENT = "corral-lb acme-python"
_POLL_FIRST, _POLL_MAX = 0.05, 2.0


class AcmeError(CorralError):
    """An ACME operation failed for ``domain``; ``reason`` says why, with the CA's detail.

    ``problem`` is the ACME problem type when the CA sent one (``urn:ietf:params:acme:error:
    connection``, ``...:unauthorized``, ``...:rateLimited``...); ``retry`` is false when the
    same order cannot succeed without a change (a rejected identifier, a CA refusing the
    account), true for what may pass later (a failed validation, a timeout, an unreachable
    CA)."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, domain: str, reason: str, *, problem: str | None = None,
                 retry: bool = True) -> None:
        super().__init__(f"{domain}: {reason}", retry=retry,
                         details={"domain": domain, "problem": problem})
        self.domain = domain
        self.problem = problem


class ChallengeResponder(Protocol):
    """Where HTTP-01 answers go: the shared :80 frontend serves
    ``GET /.well-known/acme-challenge/<token>`` with the key authorization put for it.
    Called from the issuing thread."""

    def put(self, token: str, key_authorization: str) -> None:
        """Answer ``token`` with ``key_authorization`` from now on; on return it is answered
        wherever the CA may ask (``corral_lb.mesh_tls.SharedChallenges`` waits, bounded, for
        the other hosts of a routing mesh), so the CA may be told to validate."""

    def remove(self, token: str) -> None:
        """Stop answering ``token`` (no error if it is unknown)."""


class ChallengeStore:
    """In-memory ``ChallengeResponder``, thread-safe: the issuer's threads put and remove,
    the event loop's HTTP frontend reads with ``get``."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def put(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._tokens[token] = key_authorization

    def remove(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def get(self, token: str) -> str | None:
        """The key authorization for ``token``, or None (answer 404)."""
        with self._lock:
            return self._tokens.get(token)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


@dataclass(frozen=True)
class IssuedCert:
    """A certificate as the CA issued it: the leaf first, then its intermediates (PEM)."""

    fullchain_pem: bytes
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    issuer: str  # the leaf's issuer, RFC 4514 (e.g. "CN=Pebble Intermediate CA 5ec098")
    serial: str  # lowercase hex, no 0x

    @classmethod
    def from_pem(cls, fullchain_pem: bytes) -> IssuedCert:
        """Read the facts from the leaf (the first certificate) of ``fullchain_pem``."""
        leaf = x509.load_pem_x509_certificates(fullchain_pem)[0]
        return cls(fullchain_pem, leaf.not_valid_before_utc, leaf.not_valid_after_utc,
                   leaf.issuer.rfc4514_string(), format(leaf.serial_number, "x"))


class _Network(client.ClientNetwork):
    """``ClientNetwork`` that retries ``badNonce`` as often as it takes (within reason).

    A badNonce answer means the CA refused the request before acting on it, so sending it
    again with a fresh nonce is safe for every request, new-order and finalize included."""

    def __init__(self, key: jwk.JWK, *, verify: str | bool) -> None:
        super().__init__(key, alg=jwa.ES256, user_agent=USER_AGENT,
                         timeout=int(NETWORK_TIMEOUT_S))
        # requests takes a CA bundle path where the library says bool
        self.verify_ssl = verify  # type: ignore[assignment]
        self.bad_nonces = 0  # retried, over this network's life
        self.issuer: AcmeIssuer | None = None  # counts them too

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, BAD_NONCE_ATTEMPTS + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as e:
                if e.code != "badNonce" or attempt == BAD_NONCE_ATTEMPTS:
                    raise
                self.bad_nonces += 1
                if self.issuer is not None:
                    self.issuer.count_bad_nonce()
        raise AssertionError("unreachable")  # pragma: no cover


class AcmeIssuer:
    """One ACME account at one CA; ``issue`` orders certificates with HTTP-01.

    The account key (ECDSA P-256, PKCS#8 PEM) is loaded from ``account_key_path`` or made
    there on first use: the file 0600, its directory 0700, both the caller's (root's). The
    account is registered (or found again by its key) on the first ``issue`` or ``register``.
    ``ca_bundle`` is a PEM file of CAs trusted for the ACME server's HTTPS (tests: Pebble's);
    None uses the system's."""

    def __init__(self, directory_url: str, *, ca_bundle: str | None, email: str | None,
                 account_key_path: Path) -> None:
        self.directory_url = directory_url
        self.ca_bundle = ca_bundle
        self.email = email
        self.account_key_path = Path(account_key_path)
        self._key = jwk.JWKEC(key=load_or_create_account_key(self.account_key_path))
        self._account: messages.RegistrationResource | None = None
        self._lock = threading.Lock()
        self.bad_nonces = 0  # badNonce refusals retried, over this issuer's life
        self._count_lock = threading.Lock()  # not _lock: registration holds that while posting

    def count_bad_nonce(self) -> None:
        """One more badNonce refusal retried (called from the issuing threads)."""
        with self._count_lock:
            self.bad_nonces += 1

    def _network(self) -> _Network:
        return _Network(self._key, verify=self.ca_bundle if self.ca_bundle else True)

    def register(self) -> str:
        """Register the account, or find it again by its key; returns its URL. Blocks."""
        return self._client(_deadline(ORDER_TIMEOUT_S), "account").net.account["uri"]  # type: ignore[no-any-return, index]

    def _client(self, deadline: float, domain: str) -> client.ClientV2:
        net = self._network()
        net.issuer = self
        with _acme_errors(domain, deadline):
            directory = client.ClientV2.get_directory(self.directory_url, net)
            acme = client.ClientV2(directory, net)
            with self._lock:
                if self._account is None:
                    self._account = self._register(acme)
            net.account = self._account
        return acme

    def _register(self, acme: client.ClientV2) -> messages.RegistrationResource:
        new = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True)
        try:
            regr = acme.new_account(new)
            log.info("acme account registered", directory=self.directory_url, account=regr.uri)
        except errors.ConflictError as e:  # the key already has an account: its URL
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            log.info("acme account found", directory=self.directory_url, account=regr.uri)
        return regr

    def issue(self, domains: list[str], key_pem: bytes, responder: ChallengeResponder, *,
              timeout: float = ORDER_TIMEOUT_S) -> IssuedCert:
        """Order a certificate for ``domains`` (the first one is the subject) with the key
        ``key_pem``, answering HTTP-01 through ``responder``; returns it once issued.

        Blocks (run it in a thread); gives up after ``timeout`` seconds. Tokens put into
        ``responder`` are removed before returning or raising. Raises ``AcmeError`` naming
        the domain that failed and carrying the CA's problem detail."""
        if not domains:
            raise ValueError("no domains to order a certificate for")
        deadline = _deadline(timeout)
        try:
            return self._issue(domains, key_pem, responder, deadline)
        except AcmeError as e:
            if e.problem != messages.ERROR_PREFIX + "accountDoesNotExist":
                raise
            # the CA forgot the account (deactivated, or a test CA restarted): register anew
            log.warning("acme account unknown to the CA; registering again",
                        directory=self.directory_url)
            with self._lock:
                self._account = None
            return self._issue(domains, key_pem, responder, deadline)

    def _issue(self, domains: list[str], key_pem: bytes, responder: ChallengeResponder,
               deadline: float) -> IssuedCert:
        first = domains[0]
        acme = self._client(deadline, first)
        csr = crypto_util.make_csr(key_pem, domains)
        tokens: list[str] = []
        try:
            with _acme_errors(first, deadline):
                order = acme.new_order(csr)
            log.info("acme order", domains=domains, order=order.uri)
            pending: list[messages.AuthorizationResource] = []
            for authz in order.authorizations:
                domain = authz.body.identifier.value
                with _acme_errors(domain, deadline):
                    if authz.body.status == messages.STATUS_VALID:
                        continue  # the CA reuses an earlier validation
                    if authz.body.status != messages.STATUS_PENDING:
                        raise _authz_failed(authz)
                    challb = _http01(authz)
                    response, key_authorization = challb.response_and_validation(acme.net.key)
                    token = challb.chall.encode("token")
                    responder.put(token, key_authorization)
                    tokens.append(token)
                    acme.answer_challenge(challb, response)
                    pending.append(authz)
            for authz in pending:
                domain = authz.body.identifier.value
                with _acme_errors(domain, deadline):
                    self._await_authorization(acme, authz, deadline)
            with _acme_errors(first, deadline):
                chain = self._finalize(acme, order, deadline)
        finally:
            for token in tokens:
                responder.remove(token)
        cert = IssuedCert.from_pem(chain)
        log.info("acme certificate issued", domains=domains, issuer=cert.issuer,
                 serial=cert.serial, not_after=cert.not_after.isoformat(),
                 bad_nonces_retried=acme.net.bad_nonces)  # type: ignore[attr-defined]
        return cert

    def _await_authorization(self, acme: client.ClientV2, authz: messages.AuthorizationResource,
                             deadline: float) -> None:
        for wait in _polls(deadline):
            authz, _ = acme.poll(authz)
            status = authz.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                raise _authz_failed(authz)
            wait()
        raise AcmeError(authz.body.identifier.value,
                        "timed out waiting for the CA to validate the HTTP-01 challenge")

    def _finalize(self, acme: client.ClientV2, order: messages.OrderResource,
                  deadline: float) -> bytes:
        try:
            order = acme.begin_finalization(order)
        except messages.Error as e:
            if e.code != "orderNotReady":
                raise
        first = order.body.identifiers[0].value
        for wait in _polls(deadline):
            body = messages.Order.from_json(_post_as_get(acme, order.uri).json())
            if body.status == messages.STATUS_VALID and body.certificate is not None:
                return _post_as_get(acme, body.certificate).text.encode()
            if body.status == messages.STATUS_INVALID:
                if body.error is not None:
                    raise body.error
                raise AcmeError(first, "the CA marked the order invalid without a reason")
            if body.status == messages.STATUS_READY:  # orderNotReady earlier: finalize now
                acme.begin_finalization(order)
            wait()
        raise AcmeError(first, "timed out waiting for the CA to issue the certificate")


def load_or_create_account_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The ECDSA P-256 account key at ``path``, made there (0600) if absent. Its directory
    is made (or set) 0700: give the key a directory of its own."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if _create(path, pem):
            log.info("acme account key created", path=str(path))
            return key
        # another process made it first: use theirs, so that both share one account
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorralError(f"cannot read the ACME account key {path}: {e.strerror}",
                          code=ErrorCode.INVALID, retry=False) from None
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("acme account key was readable by others; now 0600", path=str(path))
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CorralError(f"the ACME account key {path} is not an unencrypted PEM private key",
                          code=ErrorCode.INVALID, retry=False) from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise CorralError(f"the ACME account key {path} is not an ECDSA P-256 key",
                          code=ErrorCode.INVALID, retry=False)
    return loaded


def _create(path: Path, data: bytes) -> bool:
    """Make ``path`` hold ``data`` (0600 from the first byte) unless it exists; whole or not
    at all across a crash (written aside, fsynced, then linked into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _polls(deadline: float) -> Iterator[Callable[[], None]]:
    """Yield a ``wait`` callable per poll while time is left: 50 ms, doubling to 2 s."""
    delay = _POLL_FIRST

    def wait() -> None:
        nonlocal delay
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, _POLL_MAX)

    while time.monotonic() < deadline:
        yield wait


def _post_as_get(acme: client.ClientV2, url: str) -> requests.Response:
    # ClientV2._post_as_get is private; ClientNetwork.post with no payload is the same
    response: requests.Response = acme.net.post(
        url, None, new_nonce_url=acme.directory["newNonce"])
    return response


def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    offered = ", ".join(c.chall.typ for c in authz.body.challenges) or "none"
    raise AcmeError(authz.body.identifier.value,
                    f"the CA offers no http-01 challenge (offered: {offered})", retry=False)


def _authz_failed(authz: messages.AuthorizationResource) -> AcmeError:
    """The error of an authorization that ended other than valid, with the CA's detail."""
    domain = authz.body.identifier.value
    for challb in authz.body.challenges:
        if challb.error is not None:
            return AcmeError(domain, f"{challb.chall.typ} validation failed: "
                             f"{_problem_text(challb.error)}", problem=challb.error.typ)
    return AcmeError(domain, f"authorization is {authz.body.status.name}")


def _problem_text(error: messages.Error) -> str:
    text = error.detail or error.description or error.typ
    for sub in error.subproblems or ():
        who = f"{sub.identifier.value}: " if sub.identifier is not None else ""
        text += f"; {who}{sub.detail or sub.typ}"
    return f"{text} ({error.code or error.typ})"


_NOT_RETRIED = {"rejectedIdentifier", "unsupportedIdentifier", "caa", "unsupportedContact",
                "invalidContact", "externalAccountRequired", "userActionRequired",
                "badSignatureAlgorithm", "badCSR"}


@contextlib.contextmanager
def _acme_errors(domain: str, deadline: float) -> Iterator[None]:
    """Turn whatever the library or the network raises into an ``AcmeError`` for ``domain``."""
    if time.monotonic() >= deadline:
        raise AcmeError(domain, "the order ran out of time")
    try:
        yield
    except AcmeError:
        raise
    except messages.Error as e:
        raise AcmeError(domain, f"the CA refused: {_problem_text(e)}", problem=e.typ,
                        retry=e.code not in _NOT_RETRIED) from None
    except errors.ValidationError as e:
        raise _authz_failed(e.failed_authzrs[0]) from None
    except errors.IssuanceError as e:
        raise AcmeError(domain, f"the CA did not issue: {_problem_text(e.error)}",
                        problem=e.error.typ) from None
    except errors.TimeoutError:
        raise AcmeError(domain, "timed out waiting for the CA") from None
    except errors.Error as e:
        raise AcmeError(domain, f"ACME protocol error: {type(e).__name__}: {e}") from None
    except requests.exceptions.SSLError as e:
        raise AcmeError(domain, f"the CA's HTTPS certificate is not trusted: {_first_line(e)}"
                        ) from None
    except requests.exceptions.RequestException as e:
        raise AcmeError(domain, f"cannot reach the CA: {type(e).__name__}: {_first_line(e)}"
                        ) from None
    except (ValueError, jose_errors.DeserializationError) as e:
        raise AcmeError(domain, f"unexpected answer from the CA: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
