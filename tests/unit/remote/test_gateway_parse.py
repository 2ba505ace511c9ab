"""What the SSH gateway makes of ``SSH_ORIGINAL_COMMAND`` before anything runs.

The text is the client's to choose: it is parsed without a shell into an allow-listed verb and
its arguments, and a git verb's one argument must name an app's repository. Everything else
is refused (``Refused``), and a refused command reaches neither the kernel nor git."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.client import KEY_ENV
from corral.remote import gateway
from corral.remote.gateway import MAX_COMMAND, VERBS, Refused, parse_command, repository

APP_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

# ---- refused commands ------------------------------------------------------------------------

HOSTILE = [
    pytest.param(None, id="no-command-login-shell"),
    pytest.param("", id="empty"),
    pytest.param("   \t  ", id="blank"),
    pytest.param("git-receive-pack '../etc'", id="dotdot"),
    pytest.param("git-receive-pack 'shop.git; id'", id="semicolon-inside-quotes"),
    pytest.param("git-receive-pack shop.git; id", id="semicolon-unquoted"),
    pytest.param("git-receive-pack 'shop' && id", id="and-and"),
    pytest.param("git-receive-pack 'shop' | sh", id="pipe"),
    pytest.param("git-receive-pack '$(id)'", id="command-substitution"),
    pytest.param("git-receive-pack '`id`'", id="backticks"),
    pytest.param("git-receive-pack 'shop' # comment", id="comment-is-words"),
    pytest.param("git-upload-pack --upload-pack=touch /tmp/x", id="option-two-words"),
    pytest.param("git-upload-pack '--upload-pack=touch /tmp/x'", id="option-one-word"),
    pytest.param("git-upload-pack --help", id="help-option"),
    pytest.param("git-upload-pack -c", id="short-option"),
    pytest.param("git-receive-pack 'shop'\nid", id="newline"),
    pytest.param("git-receive-pack 'shop'\rid", id="carriage-return"),
    pytest.param("git-receive-pack 'shop'\x00id", id="nul"),
    pytest.param("git-receive-pack\t'shop'", id="tab"),
    pytest.param("git-receive-pack 'shop'\x1b[2J", id="escape-sequence"),
    pytest.param("git-receive-pack 'shop\u2028'", id="unicode-line-separator"),
    pytest.param("git-receive-pack 'shop", id="unbalanced-single-quote"),
    pytest.param('git-receive-pack "shop', id="unbalanced-double-quote"),
    pytest.param("git-receive-pack shop\\", id="trailing-backslash"),
    pytest.param("corral ps " + "x" * 9000, id="9000-characters"),
    pytest.param("git-receive-pack '" + "a" * 5000 + "'", id="5000-character-app"),
    pytest.param("git-receive-pack " + "a" * 64, id="64-character-app"),
    pytest.param("sh", id="sh"),
    pytest.param("bash -c id", id="bash-c"),
    pytest.param("/bin/sh -c 'git-receive-pack shop'", id="bin-sh"),
    pytest.param("scp -t /", id="scp"),
    pytest.param("scp -f /etc/shadow", id="scp-from"),
    pytest.param("rsync --server -vlogDtpre.iLsfxC . /", id="rsync"),
    pytest.param("internal-sftp", id="sftp"),
    pytest.param("git-receive-pack2 'shop'", id="verb-prefix"),
    pytest.param("git receive-pack 'shop'", id="git-subcommand"),
    pytest.param("GIT-RECEIVE-PACK 'shop'", id="uppercase-verb"),
    pytest.param("env git-receive-pack 'shop'", id="env"),
    pytest.param("git-receive-pack '/etc/passwd'", id="etc-passwd"),
    pytest.param("git-receive-pack /etc/passwd", id="etc-passwd-unquoted"),
    pytest.param("git-receive-pack 'shop/../other'", id="dotdot-inside"),
    pytest.param("git-receive-pack '~root/shop'", id="other-users-home"),
    pytest.param("git-receive-pack '~/../shop'", id="home-dotdot"),
    pytest.param("git-receive-pack 'Shop'", id="uppercase-app"),
    pytest.param("git-receive-pack 'SHOP.git'", id="uppercase-app-git"),
    pytest.param("git-receive-pack 'shop.v2'", id="dot-in-name"),
    pytest.param("git-receive-pack 'shop.git.git'", id="double-git-suffix"),
    pytest.param("git-receive-pack '.git'", id="only-git-suffix"),
    pytest.param("git-receive-pack 'shop' 'other'", id="two-repositories"),
    pytest.param("git-receive-pack", id="no-repository"),
    pytest.param("git-upload-pack ''", id="empty-repository"),
    pytest.param("git-receive-pack '//shop'", id="double-slash"),
    pytest.param("git-receive-pack 'repos/shop.git'", id="subdirectory"),
    pytest.param("git-receive-pack '-shop'", id="leading-dash"),
    pytest.param("git-receive-pack 'shop-'", id="trailing-dash"),
    pytest.param("git-receive-pack '1shop'", id="leading-digit"),
    pytest.param("git-receive-pack 'sh op'", id="space-in-name"),
    pytest.param("git-receive-pack 'sh\u00f6p'", id="non-ascii-letter"),
    pytest.param("git-receive-pack '\uff53hop'", id="fullwidth-letter"),
]


def _refusal(text: str | None) -> Refused:
    """Whichever step refuses ``text``: the parser, or (for a git verb) the repository."""
    with pytest.raises(Refused) as caught:
        verb, args = parse_command(text)
        assert verb in VERBS  # parsed: then the repository must be what refuses it
        if verb == "corral":
            raise AssertionError(f"{text!r} parsed as a corral command: {args}")
        repository(args)
    return caught.value


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_commands_are_refused(text: str | None) -> None:
    """Every command of the corpus is refused, with a reason to show the client."""
    assert str(_refusal(text))


@pytest.mark.parametrize("text", [None, "", "  "])
def test_no_command_means_no_shell(text: str | None) -> None:
    """``ssh corral@HOST`` (a login shell request) is refused with a hint at what works."""
    with pytest.raises(Refused, match="no shell"):
        parse_command(text)


@pytest.mark.parametrize("text", ["sh", "bash -c id", "scp -t /", "rsync --server . /",
                                  "git-receive-pack2 'shop'"])
def test_unknown_verbs_are_refused_by_the_parser(text: str) -> None:
    """The verb is looked up in an allow-list (exact match): the parser itself refuses."""
    with pytest.raises(Refused, match="is not something this account does"):
        parse_command(text)


@pytest.mark.parametrize("ch", ["\n", "\r", "\x00", "\t", "\x7f", "\x1b"])
def test_control_characters_are_refused_by_the_parser(ch: str) -> None:
    """Control characters anywhere refuse the whole command, before any splitting."""
    with pytest.raises(Refused, match="control characters"):
        parse_command(f"git-receive-pack 'sh{ch}op'")


def test_the_length_limit_is_exact() -> None:
    """A command of MAX_COMMAND characters is read; one more is refused."""
    base = "corral ps "
    ok = base + "x" * (MAX_COMMAND - len(base))
    assert len(ok) == MAX_COMMAND
    assert parse_command(ok) == ("corral", ["ps", "x" * (MAX_COMMAND - len(base))])
    with pytest.raises(Refused, match="longer than"):
        parse_command(ok + "x")


def test_unbalanced_quotes_are_refused_as_unreadable() -> None:
    """shlex's errors become a refusal (never a traceback in the client's terminal)."""
    with pytest.raises(Refused, match="cannot be read"):
        parse_command("git-receive-pack 'shop")


@pytest.mark.parametrize("args", [[], ["shop", "other"], ["shop", "--upload-pack=x"]])
def test_a_git_verb_takes_exactly_one_repository(args: list[str]) -> None:
    """Zero or several arguments: refused."""
    with pytest.raises(Refused, match="exactly one repository"):
        repository(args)


def test_the_longest_app_name_is_accepted_and_one_more_is_not() -> None:
    """An app name is a DNS label: 63 characters at most."""
    assert repository(["a" * 63]) == "a" * 63
    assert repository(["a" * 62 + "9.git"]) == "a" * 62 + "9"
    with pytest.raises(Refused):
        repository(["a" * 64])


def test_repository_alone_refuses_a_trailing_newline() -> None:
    """repository() refuses what is not exactly an app's repository, also on its own."""
    with pytest.raises(Refused):
        repository(["shop\n"])


# ---- accepted commands -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "verb", "app"), [
    ("git-receive-pack 'shop'", "git-receive-pack", "shop"),
    ("git-receive-pack 'shop.git'", "git-receive-pack", "shop"),
    ("git-receive-pack '/shop.git'", "git-receive-pack", "shop"),
    ("git-receive-pack 'shop.git/'", "git-receive-pack", "shop"),
    ("git-upload-pack '~/shop'", "git-upload-pack", "shop"),
    ("git-upload-pack '/~/shop.git'", "git-upload-pack", "shop"),
    ("git-upload-pack shop", "git-upload-pack", "shop"),
    ('git-upload-pack "my-shop2"', "git-upload-pack", "my-shop2"),
    ("git-receive-pack 'a'", "git-receive-pack", "a"),
])
def test_git_commands_name_an_app(text: str, verb: str, app: str) -> None:
    """What git sends for ``corral@HOST:APP`` (in each of its spellings) names APP."""
    got_verb, args = parse_command(text)
    assert got_verb == verb
    assert args == [args[0]] and repository(args) == app


@pytest.mark.parametrize(("text", "args"), [
    ("corral ps --json", ["ps", "--json"]),
    ("corral", []),
    ("corral logs shop --since 1h", ["logs", "shop", "--since", "1h"]),
    ("corral config set shop 'GREETING=hello world'", ["config", "set", "shop",
                                                       "GREETING=hello world"]),
    ("corral run shop -- sh -c 'echo $HOME; id'", ["run", "shop", "--", "sh", "-c",
                                                   "echo $HOME; id"]),
])
def test_corral_commands_keep_their_words_unexpanded(text: str, args: list[str]) -> None:
    """``corral ...`` is split with POSIX quoting and nothing else: no expansion, and shell
    syntax inside quotes stays text (the CLI's parser reads the words next)."""
    assert parse_command(text) == ("corral", args)


# ---- a refused command does nothing ----------------------------------------------------------


class _Tripwire:
    """Stands in for everything the gateway could do after parsing; records any use."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def trip(self, what: str) -> Any:
        def record(*args: object, **kwargs: object) -> Any:
            self.calls.append(what)
            raise AssertionError(f"{what} called for a refused command")
        return record


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> _Tripwire:
    wire = _Tripwire()
    monkeypatch.setattr(gateway, "KernelClient", wire.trip("KernelClient"))
    monkeypatch.setattr(subprocess, "run", wire.trip("subprocess.run"))
    monkeypatch.setattr(subprocess, "Popen", wire.trip("subprocess.Popen"))
    monkeypatch.setattr(os, "execvp", wire.trip("os.execvp"))
    monkeypatch.setattr(os, "execvpe", wire.trip("os.execvpe"))
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    # main() exports these for the kernel client; monkeypatch puts them back afterwards
    for name in (KEY_ENV, "CORRAL_BUS", "CORRAL_EVENTS", "CORRAL_SSH_HOME"):
        monkeypatch.setenv(name, "unset-by-test")
    return wire


@pytest.mark.parametrize("text", HOSTILE)
def test_the_forced_command_refuses_without_calling_anything(
        text: str | None, tripwire: _Tripwire, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """corral-ssh exits 2 with ``corral: refused: ...`` on stderr, and neither asks the
    kernel nor runs git (nor anything else), nor writes in the account's home."""
    if text is None:
        monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    else:
        if "\x00" in text:  # an environment variable cannot hold NUL: test the rest of it
            text = text.replace("\x00", "\x01")
        monkeypatch.setenv("SSH_ORIGINAL_COMMAND", text)
    home = tmp_path / "home"
    home.mkdir()
    code = gateway.main(["--bus", "ipc:///run/x.sock", "--events", "ipc:///run/y.sock",
                         "--home", str(home), "alice"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("corral: refused: ")
    assert tripwire.calls == []
    assert list(home.iterdir()) == []
    assert os.environ[KEY_ENV] == "alice"  # it did get that far: the refusal is the parser's


# ---- properties ------------------------------------------------------------------------------

_words = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_commands = st.one_of(
    st.text(max_size=300),
    st.builds(lambda verb, rest: f"{verb} {rest}",
              st.sampled_from([*VERBS, "sh", "git", "scp", "corral2"]), st.text(max_size=200)),
    st.builds(lambda verb, words: " ".join([verb, *words]),
              st.sampled_from(VERBS),
              st.lists(st.one_of(_words, _words.map(repr), _words.map(lambda w: f'"{w}"')),
                       max_size=4)),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_commands)
def test_any_text_is_refused_or_parsed_into_an_allowed_verb(text: str) -> None:
    """For any text: Refused, or a verb of VERBS with arguments free of control characters
    (nothing else is raised)."""
    try:
        verb, args = parse_command(text)
    except Refused:
        return
    assert verb in VERBS
    assert all(a.isprintable() for a in args)
    assert len(text) <= MAX_COMMAND


_args = st.lists(st.one_of(
    st.text(max_size=80),
    st.from_regex(r"\A/?(~/)?[a-z][a-z0-9.~/-]{0,70}\Z"),
    st.text(alphabet="abc-./~", max_size=20)), max_size=3)


@settings(max_examples=600, deadline=None)
@given(_args)
def test_any_arguments_are_refused_or_name_an_app(args: list[str]) -> None:
    """For any arguments: Refused, or an app name (a DNS label) taken from the one
    argument with only ``/``, ``~/``, ``.git`` around it."""
    try:
        name = repository(args)
    except Refused:
        return
    assert APP_NAME.match(name) and "\n" not in name
    assert len(args) == 1
    stripped = args[0].rstrip("\n").removeprefix("/").removeprefix("~/").removesuffix("/")
    assert stripped.removesuffix(".git") == name


@settings(max_examples=300, deadline=None)
@given(st.from_regex(APP_NAME, fullmatch=True), st.sampled_from(["{}", "{}.git", "/{}.git",
                                                                  "~/{}", "/~/{}.git/"]))
def test_every_app_name_is_reachable(name: str, spelling: str) -> None:
    """Every valid app name, in each spelling git uses, names that app."""
    verb, args = parse_command(f"git-receive-pack '{spelling.format(name)}'")
    assert (verb, repository(args)) == ("git-receive-pack", name)
