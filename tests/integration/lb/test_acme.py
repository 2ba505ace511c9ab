"""ACME issuance (corral_lb.acme) against Pebble on loopback: orders, failures, badNonce."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from corral_lb.acme import AcmeError, AcmeIssuer, ChallengeStore, IssuedCert
from corral_lb.certs import cert_domains, check_pair, generate_key
from integration.lb.pebble import ChallengeServer, Pebble, run_pebble

DOMAINS = ["shop.test", "www.shop.test"]


def issuer_for(pebble: Pebble, home: Path, email: str | None = "ops@example.com"
               ) -> AcmeIssuer:
    return AcmeIssuer(pebble.directory_url, ca_bundle=str(pebble.ca_bundle), email=email,
                      account_key_path=home / "acme" / "account.key")


def test_issues_a_certificate_for_two_domains(pebble: Pebble, answers: ChallengeServer,
                                              store: ChallengeStore, tmp_path: Path) -> None:
    """Both domains are validated over HTTP-01 and named in a chain that verifies up to
    Pebble's root; the facts returned are the leaf's; no token is left behind."""
    answers.requests.clear()
    key_pem = generate_key()
    cert = issuer_for(pebble, tmp_path).issue(DOMAINS, key_pem, store)
    leaf = check_pair(cert.fullchain_pem, key_pem, domains=DOMAINS)
    assert sorted(cert_domains(leaf)) == sorted(DOMAINS)
    for domain in DOMAINS:
        assert pebble.verify(cert.fullchain_pem, domain)
    assert cert == IssuedCert.from_pem(cert.fullchain_pem)
    assert cert.serial == format(leaf.serial_number, "x")
    assert cert.issuer.startswith("CN=Pebble Intermediate CA")
    assert cert.not_before <= leaf.not_valid_before_utc < cert.not_after
    assert {host.split(":")[0] for host, _ in answers.requests} == set(DOMAINS)
    assert len(store) == 0


def test_account_key_is_private_and_reused(pebble: Pebble, tmp_path: Path) -> None:
    """The account key is made 0600 in a 0700 directory; a second issuer with the same key
    finds the same account instead of making another."""
    first = issuer_for(pebble, tmp_path)
    key_path = tmp_path / "acme" / "account.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    pem = key_path.read_bytes()
    account = first.register()
    again = issuer_for(pebble, tmp_path, email=None)
    assert again.register() == account
    assert key_path.read_bytes() == pem


def test_an_account_the_ca_forgot_is_registered_again(
        pebble: Pebble, store: ChallengeStore, tmp_path: Path) -> None:
    """The CA no longer knows the account (deactivated, or a test CA restarted): the order
    fails with accountDoesNotExist, the issuer registers its key again and the order is
    retried once, transparently."""
    from acme import messages

    issuer = issuer_for(pebble, tmp_path)
    real = issuer.register()
    issuer._account = messages.RegistrationResource(
        uri=real.rsplit("/", 1)[0] + "/0000000000000000", body=messages.Registration())
    with structlog.testing.capture_logs() as events:
        cert = issuer.issue(["shop.test"], generate_key(), store)
    assert pebble.verify(cert.fullchain_pem, "shop.test")
    assert "acme account unknown to the CA; registering again" in [e["event"] for e in events]
    assert issuer.register() == real


def test_failed_challenge_names_domain_and_what_the_ca_saw(
        pebble: Pebble, answers: ChallengeServer, store: ChallengeStore,
        tmp_path: Path) -> None:
    """When the challenge URL answers 404, AcmeError names the domain and carries Pebble's
    detail (the URL it fetched and the status it got) and problem type."""
    answers.fail = True
    try:
        with pytest.raises(AcmeError) as info:
            issuer_for(pebble, tmp_path).issue(["broken.test"], generate_key(), store)
    finally:
        answers.fail = False
    e = info.value
    assert e.domain == "broken.test"
    assert str(e).startswith("broken.test: http-01 validation failed: ")
    assert "404" in str(e) and "/.well-known/acme-challenge/" in str(e)
    assert e.problem == "urn:ietf:params:acme:error:unauthorized"
    assert e.retry
    assert len(store) == 0


def test_unreachable_ca_is_a_clear_error(tmp_path: Path) -> None:
    """A CA that does not answer gives AcmeError saying so, not a requests traceback."""
    from corral.testing import free_port

    issuer = AcmeIssuer(f"https://127.0.0.1:{free_port()}/dir", ca_bundle=None, email=None,
                        account_key_path=tmp_path / "acme" / "account.key")
    with pytest.raises(AcmeError, match=r"^shop\.test: cannot reach the CA: ConnectionError"):
        issuer.issue(["shop.test"], generate_key(), ChallengeStore())


def test_untrusted_ca_certificate_is_a_clear_error(pebble: Pebble, tmp_path: Path) -> None:
    """Without Pebble's CA bundle the client refuses its HTTPS, and says why."""
    issuer = AcmeIssuer(pebble.directory_url, ca_bundle=None, email=None,
                        account_key_path=tmp_path / "acme" / "account.key")
    with pytest.raises(AcmeError, match="the CA's HTTPS certificate is not trusted"):
        issuer.issue(["shop.test"], generate_key(), ChallengeStore())


def test_bad_nonce_at_half_the_requests_still_issues(tmp_path: Path) -> None:
    """Pebble refusing 50 % of good nonces: each refused request is sent again with a fresh
    nonce until one passes (the acme library alone retries once, which fails an order of
    ~15 signed requests most of the time at this rate), and every order completes."""
    store = ChallengeStore()
    with ChallengeServer(store.get) as answers, \
            run_pebble(tmp_path, answers.port, nonce_reject=50) as pebble:
        assert "reject 50% of good nonces" in pebble.log()
        issuer = issuer_for(pebble, tmp_path)
        for _ in range(3):
            cert = issuer.issue(DOMAINS, generate_key(), store)
            assert pebble.verify(cert.fullchain_pem, "shop.test")
    assert issuer.bad_nonces >= 5  # ~45 requests at 50 %: refusals happened, were absorbed


def test_authorization_reuse_skips_the_challenge(tmp_path: Path) -> None:
    """A CA that reuses a valid authorization (Let's Encrypt does, for 30 days) is not
    asked to validate again: the second order completes without an HTTP-01 request."""
    store = ChallengeStore()
    with ChallengeServer(store.get) as answers, \
            run_pebble(tmp_path, answers.port, authz_reuse=100) as pebble:
        issuer = issuer_for(pebble, tmp_path)
        issuer.issue(DOMAINS, generate_key(), store)
        answers.requests.clear()
        cert = issuer.issue(DOMAINS, generate_key(), store)
        assert answers.requests == []
        assert pebble.verify(cert.fullchain_pem, "www.shop.test")


def test_account_and_certificate_keys_never_logged(
        pebble: Pebble, store: ChallengeStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Registration and an order log through structlog (and the acme library through
    logging, at debug): neither carries the account key or the certificate key, in PEM or
    as the JWK's private number."""
    key_pem = generate_key()
    with structlog.testing.capture_logs() as events, caplog.at_level(logging.DEBUG):
        issuer = issuer_for(pebble, tmp_path)
        issuer.issue(DOMAINS, key_pem, store)
        issuer_for(pebble, tmp_path).issue(DOMAINS, generate_key(), store)
    assert any(e["event"] == "acme certificate issued" for e in events)
    account_pem = (tmp_path / "acme" / "account.key").read_bytes()
    text = repr(events) + caplog.text
    for pem in (account_pem, key_pem):
        for secret in _private_parts(pem):
            assert secret not in text


def _private_parts(pem: bytes) -> list[str]:
    """How a P-256 private key's secret could show in a log: the scalar in decimal, hex,
    base64url (a JWK's ``d``), and the base64 characters of the PEM that encode only it.
    (Not the whole PEM: a PKCS#8 key embeds its public key, which certificates carry.)"""
    import base64

    key = serialization.load_pem_private_key(pem, password=None)
    value = key.private_numbers().private_value  # type: ignore[union-attr]
    raw = value.to_bytes(32, "big")
    body = "".join(pem.decode().splitlines()[1:-1])
    der = base64.b64decode(body)
    start = der.index(raw)
    first, last = -(-start // 3) * 4, (start + 32) // 3 * 4
    assert last - first >= 36
    return [str(value), format(value, "x"),
            base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), body[first:last]]


def test_leaf_is_ecdsa_p256_from_the_given_key(pebble: Pebble, store: ChallengeStore,
                                               tmp_path: Path) -> None:
    """The certificate is for the key passed in (ECDSA P-256 from certs.generate_key)."""
    key_pem = generate_key()
    cert = issuer_for(pebble, tmp_path).issue(["shop.test"], key_pem, store)
    leaf = x509.load_pem_x509_certificates(cert.fullchain_pem)[0]
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    check_pair(cert.fullchain_pem, key_pem)
