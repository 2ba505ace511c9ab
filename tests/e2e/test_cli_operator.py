"""The operator's everyday with the CLI, through a real kernel with the log and fs drivers.

What users of heroku, journalctl and systemctl expect: `corral logs -n N` prints the last N
lines whatever their size (paged under the bus limit), a closed pipe ends any command
quietly, a user error is a message and an exit code (never a traceback), `corral top` piped
writes no terminal escapes, and a deploy whose instance dies at once shows its traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing import KernelProcess, remove_tree, running_kernel, wait_for

pytestmark = pytest.mark.root

HOST = "[drivers.log]\nconfig = { metrics = false }\n[drivers.fs]\n"
TOTAL = 20_000

# 20,000 numbered lines of ~120 bytes (2.4 MB of text, ~5 MB as JSON records), then idle
LOUD = f'''
    import os, sys, time
    out = sys.stdout.buffer
    for i in range({TOTAL}):
        out.write(b"seq %06d " % i + b"y" * 100 + b"\\n")
    out.flush()
    open(os.path.join(os.environ["CORRAL_PATH_DATA"], "done"), "w").close()
    time.sleep(3600)
'''

# a crash at start: a traceback on stderr, exit 1, before the instance is ever ready
CRASH = '''
    def load_settings():
        raise RuntimeError("settings.toml: no [database] table")
    load_settings()
'''


def make_app(d: Path, name: str, script: str, ready: str = "started") -> Path:
    d.mkdir(parents=True)
    (d / "app.py").write_text(textwrap.dedent(script))
    data = d / "data"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is chosen at deploy
    (d / "corral.toml").write_text(
        f'[app]\nname = "{name}"\n[processes]\n'
        f'main = {{ command = "python3 -u app.py", ready = "{ready}" }}\n'
        '[paths]\ndata = { path = "data", mode = "rw" }\n')
    d.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="corral-e2e-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    remove_tree(d)


@pytest.fixture(scope="module")
def kernel(base: Path) -> Iterator[KernelProcess]:
    with running_kernel(base / "k", HOST, drivers=("log", "fs")) as k:
        yield k


@pytest.fixture(scope="module")
def loud(kernel: KernelProcess, base: Path) -> str:
    """An app that has written 20,000 lines, all stored."""
    app = make_app(base / "loud", "loud", LOUD)
    r = kernel.cli("up", str(app))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: (app / "data" / "done").exists(), timeout=60)
    stored = kernel.home / "logs" / "loud" / "app.log"
    wait_for(lambda: stored.exists() and stored.read_bytes().count(b" seq ") == TOTAL,
             timeout=60)
    return "loud"


def corral(k: KernelProcess, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "corral.cli", *argv], env=k.env,
                            **kw)  # type: ignore[call-overload]


def test_logs_n_prints_every_line_of_a_long_history_in_order(kernel: KernelProcess,
                                                             loud: str) -> None:
    """`corral logs APP -n 100000` prints all 20,000 lines (four bus replies' worth) in
    order, with nothing left out; `-n 5` the last five; --json the same records; --since in
    every notation of the manifest's durations."""
    r = kernel.cli("logs", loud, "-n", "100000")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    nums = [int(ln.split("| seq ")[1].split()[0]) for ln in r.stdout.splitlines()]
    assert nums == list(range(TOTAL))
    r = kernel.cli("logs", loud, "-n", "100000", "--json")
    assert r.returncode == 0 and r.stdout.count('"message": "seq ') == TOTAL
    r = kernel.cli("logs", loud, "-n", "5")
    assert [ln.split("| ")[1][:10] for ln in r.stdout.splitlines()] == [
        f"seq {i:06d}" for i in range(TOTAL - 5, TOTAL)]
    for since in ("1h", "90m", "1h30m", "1h 30m", "5400s", "3600000ms", "1d", "1.5h"):
        r = kernel.cli("logs", loud, "-n", "100000", "--since", since, "--grep", "^seq 01999")
        assert r.returncode == 0, (since, r.stderr)
        assert len(r.stdout.splitlines()) == 10, since
    r = kernel.cli("logs", loud, "--since", "2999-01-01T00:00:00Z")
    assert r.returncode == 0 and r.stdout == ""


def test_a_closed_pipe_ends_a_command_quietly(kernel: KernelProcess, loud: str) -> None:
    """`corral logs APP | head -3`, and any command whose stdout is closed: exit 141 (128 +
    SIGPIPE, as git or seq), nothing on stderr."""
    p = corral(kernel, "logs", loud, "-n", "100000", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    head = [p.stdout.readline() for _ in range(3)]
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(30) == 141, err
    assert err == b"", err
    assert all(b"| seq 00000" in ln for ln in head), head
    for argv in (("logs", loud, "-n", "3"), ("ps",), ("drivers",), ("query", "log", "stats"),
                 ("top", "--once"), ("errors", loud, "--json"), ("schema",)):
        rd, wr = os.pipe()
        os.close(rd)  # the reader is gone before the command writes
        p = corral(kernel, *argv, stdout=wr, stderr=subprocess.PIPE)
        os.close(wr)
        assert p.stderr is not None
        err = p.stderr.read()
        assert p.wait(30) == 141, (argv, err)
        assert err == b"", (argv, err)


def test_user_errors_are_messages_not_tracebacks(kernel: KernelProcess, loud: str) -> None:
    """Bad JSON, an unknown app, bad flags, a bad --since, -n or --grep, an unknown query, an
    unreachable kernel: a one-line reason and the documented exit code, never a traceback."""
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("query", "log", "read", "{bad"), 2, "not JSON"),
        (("query", "log", "read", "[1]"), 2, "JSON object"),
        (("query", "log", "read", "{}"), 2, "app"),
        (("query", "log", "read", '{"app": "loud", "cursor": "junk"}'), 2, "cursor"),
        (("query", "log", "no_such_query"), 1, "query"),
        (("down", "no-such-app"), 1, "no-such-app"),
        (("scale", "no-such-app", "web=2"), 1, "no-such-app"),
        (("logs", loud, "--since", "yesterday-ish"), 2, "since"),
        (("logs", loud, "-n", "many"), 2, "-n"),
        (("logs", loud, "-n", "0"), 2, "-n"),
        (("logs", loud, "--grep", "(unclosed"), 2, "regular expression"),
        (("logs",), 2, "app"),
        (("logs", loud, "--no-such-flag"), 2, "--no-such-flag"),
        (("no-such-command",), 2, "no-such-command"),
        (("top", "--interval", "soon"), 2, "interval"),
        (("up", "/nonexistent/app"), 2, "corral.toml"),
    ]
    for argv, code, says in cases:
        r = kernel.cli(*argv)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
        assert r.returncode == code, (argv, r.returncode, r.stderr)
        assert says in r.stderr, (argv, r.stderr)
    r = subprocess.run([sys.executable, "-m", "corral.cli", "logs", loud], capture_output=True,
                       text=True, timeout=60, check=False,
                       env={**kernel.env, "CORRAL_BUS": "ipc:///nonexistent/bus.sock"})
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr


def test_top_writes_no_escapes_into_a_pipe(kernel: KernelProcess, loud: str) -> None:
    """`corral top` refreshing into a pipe appends plain tables (one per refresh, each
    flushed when made): no screen-clearing escape sequences."""
    p = corral(kernel, "top", "--interval", "0.2", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    assert p.stdout is not None
    headers = [p.stdout.readline() for _ in range(3) if True]
    out = b"".join(headers)
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=30)
    out += rest
    assert b"\x1b" not in out, out[:200]
    assert out.count(b"INSTANCE") >= 2, out
    assert b"loud.main.1" in out and b"Traceback" not in err


def test_an_instance_dying_at_start_shows_its_traceback(kernel: KernelProcess,
                                                        base: Path) -> None:
    """A deploy whose instance prints a traceback and exits before it is ready fails (exit 1)
    and says why with the app's own last line, read back from the log driver (the kernel
    keeps no copy of output a driver captures)."""
    app = make_app(base / "crash", "crash", CRASH)
    r = kernel.cli("up", str(app), "--wait", "20")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exited before it was ready" in r.stderr, r.stderr
    assert "RuntimeError: settings.toml: no [database] table" in r.stderr, r.stderr
    assert "no output captured" not in r.stderr
    assert "it wrote nothing" not in r.stderr
