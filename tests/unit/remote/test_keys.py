"""The SSH keys allowed in: parsing a public key, the key store, and the authorized_keys lines
corral writes for the unprivileged account (no system user is created: ``Account.ensure`` is
replaced by a stand-in)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from corral.errors import CorralError, ErrorCode, NotFoundError
from corral.remote import Account, Key, KeyStore, PublicKey

BUS = "ipc:///run/corral/ssh-bus.sock"
EVENTS = "ipc:///run/corral/ssh-events.sock"

# ---- real keys, made by ssh-keygen -----------------------------------------------------------


def _keygen(directory: Path, name: str, *options: str) -> tuple[str, str]:
    """A new key pair's public line and its fingerprint as ``ssh-keygen -lf`` prints it."""
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", f"{name}@test", "-f", str(path),
                    *options], check=True, capture_output=True, timeout=120)
    pub = (directory / f"{name}.pub").read_text()
    shown = subprocess.run(["ssh-keygen", "-lf", str(directory / f"{name}.pub")], check=True,
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert shown[1].startswith("SHA256:")
    return pub, shown[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    d = tmp_path_factory.mktemp("sshkeys")
    return {
        "ed25519": _keygen(d, "ed25519", "-t", "ed25519"),
        "ed25519-b": _keygen(d, "ed25519-b", "-t", "ed25519"),
        "ed25519-c": _keygen(d, "ed25519-c", "-t", "ed25519"),
        "ecdsa256": _keygen(d, "ecdsa256", "-t", "ecdsa", "-b", "256"),
        "ecdsa384": _keygen(d, "ecdsa384", "-t", "ecdsa", "-b", "384"),
        "ecdsa521": _keygen(d, "ecdsa521", "-t", "ecdsa", "-b", "521"),
        "rsa2048": _keygen(d, "rsa2048", "-t", "rsa", "-b", "2048"),
    }


def _rsa_1024() -> str:
    """An RSA key of 1024 bits in OpenSSH format (newer ssh-keygen refuse to make one)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " weak"


def _code(exc: pytest.ExceptionInfo[CorralError]) -> ErrorCode:
    return exc.value.code


# ---- PublicKey.parse -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    ("ed25519", "ssh-ed25519"), ("ecdsa256", "ecdsa-sha2-nistp256"),
    ("ecdsa384", "ecdsa-sha2-nistp384"), ("ecdsa521", "ecdsa-sha2-nistp521"),
    ("rsa2048", "ssh-rsa"),
])
def test_keys_made_by_ssh_keygen_parse_with_its_fingerprint(
        keys: dict[str, tuple[str, str]], name: str, kind: str) -> None:
    """Each accepted type parses to its type, its base64 body and the very fingerprint
    ``ssh-keygen -lf`` shows (SHA256, unpadded base64)."""
    line, fingerprint = keys[name]
    parsed = PublicKey.parse(line)
    assert parsed == PublicKey(kind, line.split()[1], fingerprint)


def test_blank_lines_around_the_key_and_its_comment_do_not_count(
        keys: dict[str, tuple[str, str]]) -> None:
    """Surrounding blank lines and the comment are ignored: the key is the same."""
    line, fingerprint = keys["ed25519"]
    body = line.split()[1]
    assert PublicKey.parse(f"\n\n  ssh-ed25519 {body}  \n \n").fingerprint == fingerprint
    assert PublicKey.parse(f"ssh-ed25519 {body} a comment with spaces").body == body


def test_a_key_of_1024_rsa_bits_is_too_weak() -> None:
    """RSA under 2048 bits is refused (INVALID), saying why."""
    with pytest.raises(CorralError, match="1024 bits is too weak") as exc:
        PublicKey.parse(_rsa_1024())
    assert _code(exc) == ErrorCode.INVALID


def _other(keys: dict[str, tuple[str, str]], name: str) -> str:
    return keys[name][0].split()[1]


@pytest.mark.parametrize("make", [
    pytest.param(lambda k: "", id="empty"),
    pytest.param(lambda k: "\n \n", id="blank"),
    pytest.param(lambda k: k["ed25519"][0] + "\n" + k["rsa2048"][0], id="two-lines"),
    pytest.param(lambda k: k["ed25519"][0] + "\n" + k["ed25519"][0], id="same-key-twice"),
    pytest.param(lambda k: f'command="x" {k["ed25519"][0]}', id="command-option"),
    pytest.param(lambda k: f"restrict {k['ed25519'][0]}", id="restrict-option"),
    pytest.param(lambda k: f'from="*" {k["ed25519"][0]}', id="from-option"),
    pytest.param(lambda k: f"no-pty,permitopen=\"*:*\" {k['ed25519'][0]}", id="options"),
    pytest.param(lambda k: "ssh-dss AAAAB3NzaC1kc3MAAACBAP dss@old", id="ssh-dss"),
    pytest.param(lambda k: "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t",
                 id="security-key"),
    pytest.param(lambda k: "ssh-ed25519-cert-v01@openssh.com " + _other(k, "ed25519"),
                 id="certificate"),
    pytest.param(lambda k: "SSH-ED25519 " + _other(k, "ed25519"), id="uppercase-type"),
    pytest.param(lambda k: "ssh-ed25519", id="type-without-body"),
    pytest.param(lambda k: "ssh-ed25519 !!!not-base64!!!", id="garbage-body"),
    pytest.param(lambda k: "ssh-ed25519 AAAA\u00e9AAA", id="non-ascii-body"),
    pytest.param(lambda k: "ssh-ed25519 " + base64.b64encode(os.urandom(51)).decode(),
                 id="random-bytes"),
    pytest.param(lambda k: "ssh-ed25519 " + _other(k, "ed25519")[:-8], id="truncated-body"),
    pytest.param(lambda k: "ssh-ed25519 " + _other(k, "ed25519") + "AAAA", id="longer-body"),
    pytest.param(lambda k: "ssh-rsa " + _other(k, "ed25519"), id="ed25519-body-as-rsa"),
    pytest.param(lambda k: "ssh-ed25519 " + _other(k, "rsa2048"), id="rsa-body-as-ed25519"),
    pytest.param(lambda k: "ecdsa-sha2-nistp384 " + _other(k, "ecdsa256"),
                 id="p256-body-as-p384"),
    pytest.param(lambda k: "ecdsa-sha2-nistp256 " + _other(k, "ed25519"),
                 id="ed25519-body-as-ecdsa"),
    pytest.param(lambda k: "ssh-rsa " + _rsa_1024().split()[1], id="rsa-1024"),
])
def test_what_is_not_one_acceptable_key_is_refused(
        keys: dict[str, tuple[str, str]], make: object) -> None:
    """Several lines, options, other types, bodies that do not decode to a key of the
    declared type, weak RSA: refused with INVALID (never a traceback)."""
    text = make(keys)  # type: ignore[operator]
    with pytest.raises(CorralError) as exc:
        PublicKey.parse(text)
    assert _code(exc) == ErrorCode.INVALID
    assert not isinstance(exc.value, NotFoundError)


# ---- Key -------------------------------------------------------------------------------------


def _key(name: str = "alice", apps: tuple[str, ...] = ("shop",), admin: bool = False) -> Key:
    return Key(name, "ssh-ed25519", "AAAAbody", "SHA256:fp", apps, admin, 1.5, "root")


def test_a_scoped_key_may_act_on_its_apps_only() -> None:
    """``may`` is exact membership: no prefix, no case folding, no empty name."""
    key = _key(apps=("blog", "shop"))
    assert [app for app in ("shop", "blog", "shop2", "sho", "Shop", "", "other")
            if key.may(app)] == ["shop", "blog"]


def test_an_admin_key_may_act_on_every_app() -> None:
    """An admin key may act on any app, named in its scope or not."""
    key = _key(apps=(), admin=True)
    assert all(key.may(app) for app in ("shop", "other", "x"))


def test_a_listing_shows_no_key_body() -> None:
    """``corral keys ls`` shows name, type, fingerprint, scope, when and by whom: the body
    stays in the store."""
    assert _key().listing() == {"name": "alice", "type": "ssh-ed25519",
                                "fingerprint": "SHA256:fp", "apps": ["shop"], "admin": False,
                                "added": 1.5, "by": "root"}


# ---- Account ---------------------------------------------------------------------------------


def _account(tmp_path: Path, **over: object) -> Account:
    fields: dict[str, object] = {
        "user": "corral-test-no-such-user", "home": tmp_path / "home",
        "gateway": Path("/opt/corral/bin/corral-ssh"), "bus": BUS, "events": EVENTS}
    fields.update(over)
    return Account(**fields)  # type: ignore[arg-type]


def test_the_account_paths_are_under_its_home(tmp_path: Path) -> None:
    """authorized_keys in ~/.ssh, the bare repos in ~/repos, uploads in ~/uploads."""
    acct = _account(tmp_path)
    home = tmp_path / "home"
    assert (acct.authorized_keys, acct.repos, acct.uploads) == (
        home / ".ssh" / "authorized_keys", home / "repos", home / "uploads")


def test_an_account_that_does_not_exist_has_no_ids(tmp_path: Path) -> None:
    """``ids`` is None while the system user is missing (and root's are root's)."""
    assert _account(tmp_path).ids() is None
    assert _account(tmp_path, user="root").ids() == (0, 0)


def test_the_line_forces_the_gateway_with_the_key_name_baked_in(tmp_path: Path) -> None:
    """One line: the forced command (gateway, endpoints, home, key name), restrict and pty
    back, then the key's type and body, and ``corral:NAME`` as comment."""
    acct = _account(tmp_path)
    home = tmp_path / "home"
    assert acct.line(_key("alice")) == (
        f'command="/opt/corral/bin/corral-ssh --bus {BUS} --events {EVENTS} --home {home} '
        f'alice",restrict,pty ssh-ed25519 AAAAbody corral:alice')


@pytest.mark.parametrize("field", ["gateway", "home", "bus", "events"])
@pytest.mark.parametrize("bad", ['"', " ", "$", ";", "\n", "'", "`", "\\", ",", "\t", "*",
                                 "(", "|", "&", "#", "=", "\u00e9"])
def test_nothing_needing_quotes_goes_into_the_forced_command(
        tmp_path: Path, field: str, bad: str) -> None:
    """Every part of command="..." is checked: a character that would need quoting (or end
    the option, or the line) refuses the line (INVALID) instead of being written."""
    value = {"gateway": f"/opt/cor{bad}ral/corral-ssh", "home": f"/var/lib/cor{bad}ral",
             "bus": f"ipc:///run/cor{bad}ral.sock", "events": f"ipc:///run/ev{bad}ents"}[field]
    acct = _account(tmp_path, **{field: Path(value) if field in ("gateway", "home") else value})
    with pytest.raises(CorralError, match="cannot be written into authorized_keys") as exc:
        acct.line(_key())
    assert _code(exc) == ErrorCode.INVALID


@pytest.mark.parametrize("name", ["al ice", 'a"b', "a$b", "a;b", "a\nb", "", "a,b"])
def test_a_key_name_needing_quotes_is_refused_too(tmp_path: Path, name: str) -> None:
    """The key's name is the forced command's last word: checked like the rest."""
    with pytest.raises(CorralError) as exc:
        _account(tmp_path).command(name)
    assert _code(exc) == ErrorCode.INVALID


@pytest.mark.parametrize("field", ["gateway", "key"])
def test_a_trailing_newline_is_refused(tmp_path: Path, field: str) -> None:
    """A part ending with a newline would break the line: refused like any newline."""
    acct = _account(tmp_path, gateway=Path("/opt/corral-ssh\n")) if field == "gateway" \
        else _account(tmp_path)
    try:
        line = acct.line(_key("alice\n" if field == "key" else "alice"))
    except CorralError as exc:
        assert exc.code == ErrorCode.INVALID
        return
    assert "\n" not in line, f"written as {line!r}"


# ---- KeyStore --------------------------------------------------------------------------------


class _Ensured:
    """Stands in for Account.ensure (which would create a system user): counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, account: Account) -> tuple[int, int]:
        self.calls += 1
        (account.home / ".ssh").mkdir(parents=True, exist_ok=True)
        return 12345, 12345


@pytest.fixture
def ensured(monkeypatch: pytest.MonkeyPatch) -> _Ensured:
    fake = _Ensured()
    monkeypatch.setattr(Account, "ensure", lambda self: fake(self))
    return fake


@pytest.fixture
def store(tmp_path: Path, ensured: _Ensured) -> KeyStore:
    return KeyStore(tmp_path / "state" / "keys.json", _account(tmp_path))


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()


def _lines(store: KeyStore) -> list[str]:
    return store.account.authorized_keys.read_text().splitlines()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_an_empty_store_has_no_keys(store: KeyStore, ensured: _Ensured) -> None:
    """No keys.json yet: no keys, and a sync writes nothing nor creates the account."""
    assert store.all() == [] and store.get("alice") is None
    store.sync()
    assert ensured.calls == 0
    assert not store.account.authorized_keys.exists()


def test_adding_a_key_stores_it_root_only_and_writes_its_line(
        store: KeyStore, keys: dict[str, tuple[str, str]], ensured: _Ensured,
        tmp_path: Path) -> None:
    """keys.json is 0600 and holds the key; authorized_keys (0644) has exactly its line."""
    line, fingerprint = keys["ed25519"]
    body = line.split()[1]
    key = store.add("alice", line, apps=["shop", "blog", "shop"], admin=False, by="root")
    assert (key.name, key.type, key.body, key.fingerprint, key.apps, key.admin, key.by) == (
        "alice", "ssh-ed25519", body, fingerprint, ("blog", "shop"), False, "root")
    assert key.added > 0
    assert ensured.calls == 1
    assert _mode(store.path) == 0o600
    assert _mode(store.account.authorized_keys) == 0o644
    home = tmp_path / "home"
    assert _lines(store) == [
        f'command="/opt/corral/bin/corral-ssh --bus {BUS} --events {EVENTS} --home {home} '
        f'alice",restrict,pty ssh-ed25519 {body} corral:alice']
    saved = json.loads(store.path.read_text())["keys"]
    assert [(k["name"], k["body"], k["apps"]) for k in saved] == [("alice", body,
                                                                  ["blog", "shop"])]
    assert KeyStore(store.path, store.account).all() == [key]  # read back the same
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["keys.json"]  # no tmp


def test_the_store_keeps_keys_by_name(store: KeyStore,
                                      keys: dict[str, tuple[str, str]]) -> None:
    """Keys come back sorted by name, and authorized_keys lists them in that order."""
    store.add("zed", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    store.add("bob", keys["rsa2048"][0], apps=[], admin=True, by="root")
    store.add("mia", keys["ecdsa384"][0], apps=["blog"], admin=False, by="key:bob")
    assert [k.name for k in store.all()] == ["bob", "mia", "zed"]
    assert [x.rsplit(" ", 1)[1] for x in _lines(store)] == ["corral:bob", "corral:mia",
                                                            "corral:zed"]
    bob = store.get("bob")
    assert bob is not None and bob.admin and bob.apps == () and bob.type == "ssh-rsa"
    assert store.get("mia") == next(k for k in store.all() if k.name == "mia")


def test_a_name_is_given_once(store: KeyStore, keys: dict[str, tuple[str, str]]) -> None:
    """Adding a second key under a taken name: CONFLICT, and nothing changes."""
    store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    before = (store.path.read_bytes(), store.account.authorized_keys.read_bytes())
    with pytest.raises(CorralError, match="exists already") as exc:
        store.add("alice", keys["ed25519-b"][0], apps=["shop"], admin=False, by="root")
    assert _code(exc) == ErrorCode.CONFLICT
    assert (store.path.read_bytes(), store.account.authorized_keys.read_bytes()) == before


def test_one_key_has_one_scope(store: KeyStore, keys: dict[str, tuple[str, str]]) -> None:
    """The same key under another name (even with another comment) is refused: sshd would
    act on the first line only. Nothing changes."""
    line = keys["ed25519"][0]
    store.add("alice", line, apps=["shop"], admin=False, by="root")
    before = (store.path.read_bytes(), store.account.authorized_keys.read_bytes())
    other_comment = " ".join(line.split()[:2]) + " someone-else"
    with pytest.raises(CorralError, match="allowed in already as 'alice'") as exc:
        store.add("root-too", other_comment, apps=[], admin=True, by="root")
    assert _code(exc) == ErrorCode.CONFLICT
    assert (store.path.read_bytes(), store.account.authorized_keys.read_bytes()) == before


def test_an_invalid_key_writes_nothing(store: KeyStore, ensured: _Ensured) -> None:
    """A key that does not parse is refused before the account is touched."""
    with pytest.raises(CorralError) as exc:
        store.add("alice", "ssh-ed25519 nope", apps=["shop"], admin=False, by="root")
    assert _code(exc) == ErrorCode.INVALID
    assert ensured.calls == 0
    assert not store.path.exists() and not store.account.authorized_keys.exists()


def test_a_line_that_cannot_be_written_is_refused_before_anything(
        tmp_path: Path, ensured: _Ensured, keys: dict[str, tuple[str, str]]) -> None:
    """A gateway path needing quotes: refused before the account is made or a file
    written."""
    store = KeyStore(tmp_path / "state" / "keys.json",
                     _account(tmp_path, gateway=Path("/home/me/my venv/bin/corral-ssh")))
    with pytest.raises(CorralError) as exc:
        store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    assert _code(exc) == ErrorCode.INVALID
    assert ensured.calls == 0
    assert not store.path.exists() and not store.account.authorized_keys.exists()


def test_a_failed_save_puts_the_old_authorized_keys_back(
        store: KeyStore, keys: dict[str, tuple[str, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If keys.json cannot be written, authorized_keys is rendered again without the new
    key (the door never stays open for a key the store does not know)."""
    store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    before = _lines(store)

    def broken(self: KeyStore, keys: list[Key]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(KeyStore, "_save", broken)
    with pytest.raises(OSError, match="No space left"):
        store.add("bob", keys["ed25519-b"][0], apps=["blog"], admin=False, by="root")
    assert _lines(store) == before
    assert [k.name for k in store.all()] == ["alice"]


def test_removing_a_key_closes_its_door(store: KeyStore,
                                        keys: dict[str, tuple[str, str]]) -> None:
    """remove returns the key gone; authorized_keys and keys.json keep only the others."""
    alice = store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    store.add("bob", keys["ed25519-b"][0], apps=["blog"], admin=False, by="root")
    bob_line = [x for x in _lines(store) if x.endswith("corral:bob")]
    assert store.remove("alice") == alice
    assert _lines(store) == bob_line
    assert alice.body not in store.account.authorized_keys.read_text()
    assert [k.name for k in store.all()] == ["bob"]
    assert _mode(store.path) == 0o600
    assert store.remove("bob").name == "bob"
    assert store.account.authorized_keys.read_text() == "" and store.all() == []


def test_removing_an_unknown_key_is_not_found(store: KeyStore,
                                              keys: dict[str, tuple[str, str]]) -> None:
    """An unknown name: NotFoundError, and the keys there stay."""
    store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    before = store.account.authorized_keys.read_bytes()
    with pytest.raises(NotFoundError, match="no key named 'bob'"):
        store.remove("bob")
    assert store.account.authorized_keys.read_bytes() == before
    assert [k.name for k in store.all()] == ["alice"]


def test_a_removed_key_can_come_back_under_another_name(
        store: KeyStore, keys: dict[str, tuple[str, str]]) -> None:
    """Once removed, the same key may be added again (the fingerprint check sees the store
    as it is now)."""
    line = keys["ed25519"][0]
    store.add("alice", line, apps=["shop"], admin=False, by="root")
    store.remove("alice")
    again = store.add("alice2", line, apps=["blog"], admin=False, by="root")
    assert [k.name for k in store.all()] == ["alice2"] and again.apps == ("blog",)
    assert [x.rsplit(" ", 1)[1] for x in _lines(store)] == ["corral:alice2"]


def test_sync_renders_authorized_keys_again_from_the_store(
        store: KeyStore, keys: dict[str, tuple[str, str]], ensured: _Ensured,
        tmp_path: Path) -> None:
    """At start, authorized_keys is written again from keys.json (lines with the current
    paths): a tampered or stale file is replaced."""
    store.add("alice", keys["ed25519"][0], apps=["shop"], admin=False, by="root")
    expected = _lines(store)
    store.account.authorized_keys.write_text("ssh-ed25519 AAAAintruder evil\n")
    calls = ensured.calls
    store.sync()
    assert _lines(store) == expected
    assert ensured.calls == calls + 1
    moved = KeyStore(store.path, _account(tmp_path, gateway=Path("/usr/bin/corral-ssh")))
    moved.sync()
    assert _lines(moved) == [expected[0].replace("/opt/corral/bin/corral-ssh",
                                                 "/usr/bin/corral-ssh")]


def test_with_an_interpreter_the_gateway_runs_isolated(tmp_path: Path) -> None:
    """With ``python`` set (the kernel sets its own), the forced command and the push hook run
    the gateway through ``python -I``: no PYTHON* variable a client may send, no user site."""
    acct = _account(tmp_path, python=Path("/opt/corral/bin/python"))
    home = tmp_path / "home"
    assert acct.line(_key("alice")) == (
        f'command="/opt/corral/bin/python -I /opt/corral/bin/corral-ssh --bus {BUS} --events '
        f'{EVENTS} --home {home} alice",restrict,pty ssh-ed25519 AAAAbody corral:alice')
