"""Certificates kept current (corral_lb.certs): ACME orders against Pebble, renewal, back-off,
files from elsewhere, and what a kill -9 leaves on disk."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from corral_lb.acme import AcmeIssuer, ChallengeStore, IssuedCert
from corral_lb.certs import (
    CertError,
    CertManager,
    CertMeta,
    CertStore,
    check_files,
    check_pair,
)
from integration.lb.pebble import ChallengeServer, Pebble, run_pebble

DOMAINS = ["shop.test", "www.shop.test"]
CHILD = Path(__file__).with_name("cert_child.py")


class Recorder:
    """on_change and on_state callbacks that queue what they are told."""

    def __init__(self) -> None:
        self.changes: asyncio.Queue[tuple[str, bytes, bytes]] = asyncio.Queue()
        self.states: list[dict[str, Any]] = []

    def on_change(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        self.changes.put_nowait((name, cert_pem, key_pem))

    async def on_state(self, name: str, state: dict[str, Any]) -> None:  # async works too
        self.states.append(state)

    async def change(self, timeout: float = 10.0) -> tuple[str, bytes, bytes]:
        return await asyncio.wait_for(self.changes.get(), timeout)


def manager(root: Path, pebble: Pebble | None, challenges: ChallengeStore, rec: Recorder,
            **kw: Any) -> CertManager:
    issuer = None if pebble is None else AcmeIssuer(
        pebble.directory_url, ca_bundle=str(pebble.ca_bundle), email=None,
        account_key_path=root / "acme" / "account.key")
    return CertManager(CertStore(root / "certs"), issuer=issuer, challenges=challenges,
                       on_change=rec.on_change, on_state=rec.on_state, **kw)


def serial_of(pem: bytes) -> str:
    return IssuedCert.from_pem(pem).serial


# --- ACME, against Pebble -------------------------------------------------------------------

def test_auto_issues_stores_privately_and_serves_after_restart(
        pebble: Pebble, challenges: ChallengeStore, answers: ChallengeServer,
        tmp_path: Path) -> None:
    """want(auto) orders a certificate, hands it to on_change and stores it root-only (dir
    0700, key 0600); a new manager on the same store serves it at once, ordering nothing."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        await m.want("shop.test", DOMAINS, "auto")
        name, cert_pem, key_pem = await rec.change()
        assert name == "shop.test"
        check_pair(cert_pem, key_pem, domains=DOMAINS)
        assert pebble.verify(cert_pem, "www.shop.test")
        assert rec.states[0]["state"] == "pending"
        st = m.state("shop.test")
        assert st is not None
        assert st["state"] == "valid" and st["serving"] and st["last_error"] is None
        assert st["issuer"].startswith("CN=Pebble Intermediate CA")
        assert rec.states[-1] == st
        assert m.status() == [st]
        await m.close()

        d = tmp_path / "certs" / "shop.test"
        assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert sorted(p.name for p in d.iterdir()) == ["fullchain.pem", "key.pem", "meta.json"]
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert (d / "key.pem").read_bytes() == key_pem
        meta = json.loads((d / "meta.json").read_text())
        assert meta["domains"] == DOMAINS and meta["state"] == "valid"
        assert meta["serial"] == serial_of(cert_pem)

        answers.requests.clear()
        rec2 = Recorder()
        m2 = manager(tmp_path, pebble, challenges, rec2)
        await m2.want("shop.test", DOMAINS, "auto")
        assert rec2.changes.qsize() == 1  # before want() returned
        assert (await rec2.change())[1:] == (cert_pem, key_pem)
        await asyncio.sleep(0.3)
        assert answers.requests == [] and rec2.changes.empty()
        await m2.close()

    asyncio.run(main())


def test_forced_renewal_replaces_the_certificate(pebble: Pebble, challenges: ChallengeStore,
                                                 tmp_path: Path) -> None:
    """renew() orders a new certificate (new key, new serial) though the old one has years
    left, swaps it in through on_change and replaces the stored pair."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        await m.want("shop.test", DOMAINS, "auto")
        _, old_cert, old_key = await rec.change()
        state = await m.renew("shop.test")
        _, new_cert, new_key = await rec.change()
        assert serial_of(new_cert) != serial_of(old_cert) and new_key != old_key
        assert state["state"] == "valid" and state["serial"] == serial_of(new_cert)
        assert m.current("shop.test") == (new_cert, new_key)
        stored = CertStore(tmp_path / "certs").load("shop.test")
        assert stored is not None
        assert (stored.fullchain_pem, stored.key_pem) == (new_cert, new_key)
        await m.close()

    asyncio.run(main())


def test_failed_order_backs_off_and_keeps_the_valid_certificate(
        pebble: Pebble, challenges: ChallengeStore, answers: ChallengeServer,
        tmp_path: Path) -> None:
    """A failed HTTP-01 validation: state failing with the CA's detail, the next attempt a
    back-off away (doubling), the valid certificate still in service; success clears it."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec, backoff_min_s=60)
        await m.want("shop.test", DOMAINS, "auto")
        _, cert_pem, key_pem = await rec.change()
        answers.fail = True
        try:
            before = datetime.now(UTC)
            first = await m.renew("shop.test")
            second = await m.renew("shop.test")
        finally:
            answers.fail = False
        for st, backoff in ((first, 60), (second, 120)):
            assert st["state"] == "failing" and st["serving"]
            assert "http-01 validation failed" in st["last_error"]
            assert "404" in st["last_error"]
            wait = (datetime.fromisoformat(st["next_attempt"]) - before).total_seconds()
            assert backoff * 0.85 <= wait <= backoff + 5, (backoff, wait)
        assert second["failures"] == 2
        assert m.current("shop.test") == (cert_pem, key_pem)
        assert rec.changes.empty()
        assert {"failing"} <= {s["state"] for s in rec.states}
        meta = json.loads((tmp_path / "certs" / "shop.test" / "meta.json").read_text())
        assert meta["state"] == "failing" and "404" in meta["last_error"]

        ok = await m.renew("shop.test")
        assert ok["state"] == "valid" and ok["last_error"] is None and ok["failures"] == 0
        await rec.change()
        await m.close()

    asyncio.run(main())


def test_failing_from_the_start_serves_nothing_and_says_why(
        pebble: Pebble, challenges: ChallengeStore, answers: ChallengeServer,
        tmp_path: Path) -> None:
    """A first order that fails leaves no certificate and state failing with the error;
    the failure survives a restart (the back-off is not reset by restarting the driver)."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        answers.fail = True
        try:
            await m.want("broken.test", ["broken.test"], "auto")
            for _ in range(200):
                if rec.states and rec.states[-1]["state"] == "failing":
                    break
                await asyncio.sleep(0.05)
        finally:
            answers.fail = False
        st = rec.states[-1]
        assert st["state"] == "failing" and not st["serving"]
        assert st["last_error"].startswith("broken.test: http-01 validation failed:")
        assert m.current("broken.test") is None and rec.changes.empty()
        await m.close()
        m2 = manager(tmp_path, pebble, challenges, Recorder())
        await m2.want("broken.test", ["broken.test"], "auto")
        again = m2.state("broken.test")
        assert again is not None and again["state"] == "failing"
        assert again["next_attempt"] == st["next_attempt"]
        await m2.close()

    asyncio.run(main())


def test_new_domains_order_a_wider_certificate(pebble: Pebble, challenges: ChallengeStore,
                                               tmp_path: Path) -> None:
    """Wanting the name with another domain list orders a certificate naming them all."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        await m.want("shop.test", DOMAINS, "auto")
        await rec.change()
        await m.want("shop.test", [*DOMAINS, "api.shop.test"], "auto")
        _, cert_pem, key_pem = await rec.change()
        check_pair(cert_pem, key_pem, domains=[*DOMAINS, "api.shop.test"])
        await m.close()

    asyncio.run(main())


def test_short_lived_certificate_renews_by_itself(tmp_path: Path) -> None:
    """Pebble issuing 3-second certificates: each is renewed when a third of its life is
    left (plus up to 1/30 of jitter), without renew() being called."""
    challenges = ChallengeStore()

    async def main(pebble: Pebble) -> None:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        await m.want("shop.test", DOMAINS, "auto")
        _, first, _ = await rec.change()
        _, second, _ = await rec.change(timeout=10)
        a, b = IssuedCert.from_pem(first), IssuedCert.from_pem(second)
        assert a.serial != b.serial
        assert b.not_before < a.not_after  # renewed before the first expired
        await m.close()

    with ChallengeServer(challenges.get) as answers, \
            run_pebble(tmp_path, answers.port, validity_s=3) as pebble:
        asyncio.run(main(pebble))


def test_no_ca_configured_is_a_failing_state(tmp_path: Path) -> None:
    """Without an ACME issuer, an auto certificate fails with a reason instead of hanging."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, None, ChallengeStore(), rec)
        await m.want("shop.test", DOMAINS, "auto")
        st = await m.renew("shop.test")
        assert st["state"] == "failing"
        assert st["last_error"] == "no ACME CA is configured on this host"
        await m.close()

    asyncio.run(main())


# --- kill -9 --------------------------------------------------------------------------------

def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True,
                          timeout=60)


def test_kill_mid_order_leaves_the_old_certificate_or_none(
        pebble: Pebble, challenges: ChallengeStore, tmp_path: Path) -> None:
    """kill -9 while an order is at the CA: the next start finds no certificate (first
    order) or the old one (renewal), nothing half-written, and orders again cleanly."""
    certs = tmp_path / "certs"
    args = [str(certs), "shop.test", pebble.directory_url, str(pebble.ca_bundle),
            str(tmp_path / "acme" / "account.key")]
    child = run_child("order", *args)
    assert child.returncode == -9, child.stdout + child.stderr
    stored = CertStore(certs).load("shop.test")
    assert stored is None or stored.fullchain_pem is None

    async def main() -> tuple[bytes, bytes]:
        rec = Recorder()
        m = manager(tmp_path, pebble, challenges, rec)
        await m.want("shop.test", DOMAINS, "auto")
        _, cert_pem, key_pem = await rec.change()
        await m.close()
        return cert_pem, key_pem

    old = asyncio.run(main())
    child = run_child("order", *args)
    assert child.returncode == -9, child.stdout + child.stderr
    stored = CertStore(certs).load("shop.test")
    assert stored is not None and (stored.fullchain_pem, stored.key_pem) == old
    assert sorted(p.name for p in (certs / "shop.test").iterdir()) == [
        "fullchain.pem", "key.pem", "meta.json"]


def test_kill_at_each_step_of_a_commit_leaves_one_whole_pair(tmp_path: Path) -> None:
    """kill -9 before each rename of CertStore.save: load() then finds the old pair (the
    new one was not complete) or the new one (it was), never a key with another chain, and
    no leftover temporary files."""
    ca = trustme.CA()
    old, new = ca.issue_cert("shop.test"), ca.issue_cert("shop.test")
    files = {}
    for label, leaf in (("old", old), ("new", new)):
        files[label] = (tmp_path / f"{label}.key", tmp_path / f"{label}.pem")
        leaf.private_key_pem.write_to_path(str(files[label][0]))
        leaf.cert_chain_pems[0].write_to_path(str(files[label][1]))
    serial = {label: serial_of(p.read_bytes()) for label, (_, p) in files.items()}
    for n in range(1, 7):
        root = tmp_path / f"store{n}"
        store = CertStore(root)
        store.save("shop.test", CertMeta(domains=["shop.test"], state="valid"),
                   key_pem=files["old"][0].read_bytes(),
                   fullchain_pem=files["old"][1].read_bytes())
        child = run_child("commit", str(root), "shop.test", *map(str, files["new"]), str(n))
        if n <= 5:
            assert child.returncode == -9, child.stdout + child.stderr
        else:
            assert child.stdout.strip() == "saved 5", child.stdout + child.stderr
        stored = store.load("shop.test")
        assert stored is not None and stored.key_pem and stored.fullchain_pem
        check_pair(stored.fullchain_pem, stored.key_pem)
        got = serial_of(stored.fullchain_pem)
        # renames: key.new, chain.new, chain into place, key into place, meta.json
        assert got == (serial["old"] if n <= 2 else serial["new"]), n
        assert stored.meta.serial == got
        assert sorted(p.name for p in (root / "shop.test").iterdir()) == [
            "fullchain.pem", "key.pem", "meta.json"], n


# --- files from elsewhere -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, d: Path, *names: str, **kw: Any) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*(names or ("shop.test",)), **kw)
    cert, key = d / "cert.pem", d / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_check_files_mismatched_pair(ca: trustme.CA, tmp_path: Path) -> None:
    """A key from another pair: the error names the key file and says it does not match."""
    cert, _ = write_pair(ca, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, key = write_pair(ca, other)
    with pytest.raises(CertError, match="key does not match the certificate") as info:
        check_files(cert, key)
    assert str(info.value) == f"{key}: key does not match the certificate {cert}"


def as_nobody(fn: Any) -> str:
    """Run ``fn`` in a forked child with uid and gid 65534; returns the CertError it raised
    (or "no error")."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions escaping
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                out = "no error"
            except CertError as e:
                out = str(e)
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


def test_check_files_unreadable_key(ca: trustme.CA) -> None:
    """A key the checking user cannot read: "cannot read key PATH: Permission denied" (run
    as nobody, since root reads anything)."""
    d = Path(tempfile.mkdtemp())
    try:
        os.chmod(d, 0o755)
        cert, key = write_pair(ca, d)
        os.chmod(cert, 0o644)
        os.chmod(key, 0o600)
        if os.geteuid() == 0:
            text = as_nobody(lambda: check_files(cert, key))
        else:
            os.chmod(key, 0)
            with pytest.raises(CertError) as info:
                check_files(cert, key)
            text = str(info.value)
        assert text == f"cannot read key {key}: Permission denied"
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_check_pair_clear_errors(ca: trustme.CA, tmp_path: Path) -> None:
    """Not PEM, a missing file, an expired certificate, a domain it does not name, an
    encrypted key: each has its own sentence."""
    cert, key = write_pair(ca, tmp_path, "shop.test", "*.shop.test")
    cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    check_pair(cert_pem, key_pem, domains=["shop.test", "www.shop.test"])
    with pytest.raises(CertError, match=r"^not a PEM certificate$"):
        check_pair(b"hello", key_pem)
    with pytest.raises(CertError, match=r"^not a PEM private key$"):
        check_pair(cert_pem, b"hello")
    with pytest.raises(CertError, match=r"does not cover a\.b\.shop\.test, other\.test \(it "
                                        r"names shop\.test, \*\.shop\.test\)"):
        check_pair(cert_pem, key_pem, domains=["a.b.shop.test", "other.test"])
    with pytest.raises(CertError, match=r"^cannot read certificate .*/nope\.pem: No such file"):
        check_files(tmp_path / "nope.pem", key)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(CertError, match=r"junk\.pem: not a PEM certificate$"):
        check_files(tmp_path / "junk.pem", key)
    later = datetime(3001, 1, 1, tzinfo=UTC)
    with pytest.raises(CertError, match=r"^the certificate expired on "):
        check_pair(cert_pem, key_pem, now=later)
    old = tmp_path / "old"
    old.mkdir()
    past = datetime.now(UTC) - timedelta(days=10)
    ocert, okey = write_pair(ca, old, not_before=past - timedelta(days=30), not_after=past)
    with pytest.raises(CertError, match=r"cert\.pem: the certificate expired on \d{4}-"):
        check_files(ocert, okey)
    from cryptography.hazmat.primitives import serialization

    k = serialization.load_pem_private_key(key_pem, password=None)
    enc = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(CertError, match="encrypted; give it without a passphrase"):
        check_pair(cert_pem, enc)


def test_files_mode_reloads_on_change_and_keeps_serving_through_a_bad_write(
        ca: trustme.CA, tmp_path: Path) -> None:
    """("files", cert, key): loaded and handed to on_change; a replaced pair is picked up by
    polling; a mismatched write turns the state failing with the reason while the last
    good pair stays in service; a fixed pair is valid again."""

    async def main() -> None:
        rec = Recorder()
        m = manager(tmp_path, None, ChallengeStore(), rec, file_poll_s=0.05)
        live = tmp_path / "live"
        live.mkdir()
        cert, key = write_pair(ca, live)
        await m.want("shop.test", ["shop.test"], ("files", cert, key))
        _, first_cert, first_key = await rec.change()
        assert (first_cert, first_key) == (cert.read_bytes(), key.read_bytes())
        st = m.state("shop.test")
        assert st is not None and st["state"] == "valid" and st["mode"] == "files"
        assert st["cert_file"] == str(cert)

        write_pair(ca, live)  # a new pair in place
        _, second_cert, second_key = await rec.change()
        assert second_cert == cert.read_bytes() and second_cert != first_cert

        other = tmp_path / "other"
        other.mkdir()
        _, other_key = write_pair(ca, other)
        key.write_bytes(other_key.read_bytes())  # a key that is not the certificate's
        for _ in range(100):
            st = m.state("shop.test")
            if st is not None and st["state"] == "failing":
                break
            await asyncio.sleep(0.05)
        assert st is not None and st["state"] == "failing" and st["serving"]
        assert st["last_error"] == f"{key}: key does not match the certificate {cert}"
        assert m.current("shop.test") == (second_cert, second_key)
        assert rec.changes.empty()

        write_pair(ca, live)
        _, third_cert, _ = await rec.change()
        st = m.state("shop.test")
        assert st is not None and st["state"] == "valid" and st["last_error"] is None
        assert third_cert == cert.read_bytes()
        await m.close()

    asyncio.run(main())


def test_store_refuses_names_that_are_not_plain(tmp_path: Path) -> None:
    """A certificate name becomes a directory: path separators and dot-names are refused;
    remove() forgets a name whole."""
    store = CertStore(tmp_path)
    for bad in ("../etc", "a/b", ".hidden", "", "x" * 300):
        with pytest.raises(CertError, match="not a usable certificate name"):
            store.path(bad)
    store.save("shop.test", CertMeta(domains=["shop.test"]))
    assert store.names() == ["shop.test"]
    store.remove("shop.test")
    assert store.names() == [] and list(tmp_path.iterdir()) == []
