"""The app's side of the contract: app_environment(), corral.app, and the hello example."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from manifest_support import load_ok, write_app

from corral import app
from corral.errors import CorralError, NotFoundError
from corral.manifest import app_environment
from corral.testing import free_port

REPO = Path(__file__).resolve().parents[3]

SHOP = """\
[app]
name = "shop"

[processes]
web = { command = "serve", instances = 2, port = "http" }
worker = { command = "work" }

[ports]
http = 8000
admin-ui = 8001

[paths]
data = { path = "data", mode = "rw" }
static-files = { path = "/srv/static" }

[cron.cleanup]
schedule = "@daily"
command = "clean"
"""


def test_environment_of_a_web_instance(tmp_path: Path) -> None:
    """PORT, CORRAL_* and a sane base; the caller's secrets do not leak."""
    resolved = load_ok(write_app(tmp_path, SHOP), offset=10, env=["DATABASE_URL=pg://db"])
    env = app_environment(
        resolved,
        process="web",
        index=2,
        manifest_path=Path("/run/corral/shop.json"),
        base_env={"PATH": "/opt/bin:/usr/bin", "SECRET": "x", "LC_ALL": "C", "SSH_AUTH_SOCK": "s"},
    )
    assert env == {
        "PATH": "/opt/bin:/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "HOME": str(tmp_path.resolve()),
        "DATABASE_URL": "pg://db",
        "PORT": "8010",
        "CORRAL_PORT_HTTP": "8010",
        "CORRAL_PORT_ADMIN_UI": "8011",
        "CORRAL_PATH_DATA": str(tmp_path.resolve() / "data"),
        "CORRAL_PATH_STATIC_FILES": "/srv/static",
        "CORRAL_APP": "shop",
        "CORRAL_INSTANCE": "shop.web.2",
        "CORRAL_MANIFEST": "/run/corral/shop.json",
    }


def test_environment_without_base_env(tmp_path: Path) -> None:
    """Without base_env nothing is inherited: a default PATH, LANG and HOME."""
    resolved = load_ok(write_app(tmp_path, SHOP))
    os.environ.setdefault("TERM", "xterm")
    env = app_environment(resolved, process="worker", index=1, manifest_path=Path("/m.json"))
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "TERM" not in env
    assert "PORT" not in env  # worker has no port
    assert env["CORRAL_PORT_HTTP"] == "8000"
    assert env["CORRAL_INSTANCE"] == "shop.worker.1"


def test_env_override_may_replace_path_but_not_the_contract(tmp_path: Path) -> None:
    """--env PATH=... wins over the default; CORRAL_* cannot be set with --env at all."""
    resolved = load_ok(write_app(tmp_path, SHOP), env=["PATH=/app/bin"])
    env = app_environment(resolved, process="web", index=1, manifest_path=Path("/m.json"))
    assert env["PATH"] == "/app/bin"


def test_environment_of_a_cron_run(tmp_path: Path) -> None:
    """A job (a cron run) runs with the app's environment under the id its spawner gave it,
    without a port; the kernel reads no driver's section to build it."""
    resolved = load_ok(write_app(tmp_path, SHOP))
    env = app_environment(resolved, process="cleanup", index=7, manifest_path=Path("/m"),
                          job="shop.cron.cleanup.7")
    assert env["CORRAL_INSTANCE"] == "shop.cron.cleanup.7"
    assert "PORT" not in env and env["CORRAL_PATH_DATA"].endswith("/data")
    web = app_environment(resolved, process="web", index=1, manifest_path=Path("/m"))
    assert {k: v for k, v in env.items() if k not in ("CORRAL_INSTANCE",)} == {
        k: v for k, v in web.items() if k not in ("CORRAL_INSTANCE", "PORT")}


def test_environment_unknown_process(tmp_path: Path) -> None:
    """An unknown process or a bad index is refused with the known names."""
    resolved = load_ok(write_app(tmp_path, SHOP))
    with pytest.raises(NotFoundError, match=r"has: web, worker\)"):
        app_environment(resolved, process="api", index=1, manifest_path=Path("/m"))
    with pytest.raises(CorralError, match="index must be 0 or more"):
        app_environment(resolved, process="web", index=-1, manifest_path=Path("/m"))


@pytest.fixture
def contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put a real contract environment (from app_environment) into os.environ."""
    resolved = load_ok(write_app(tmp_path / "app", SHOP))
    manifest = resolved.write_json(tmp_path / "manifest.json")
    env: dict[str, str] = app_environment(resolved, process="web", index=1, manifest_path=manifest)
    for key in [k for k in os.environ if k.startswith("CORRAL_") or k == "PORT"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_app_helper_reads_the_contract(contract: dict[str, str], tmp_path: Path) -> None:
    """corral.app reads ports, paths, name, instance and the manifest from the environment."""
    assert app.port() == 8000
    assert app.port("http") == 8000
    assert app.port("admin-ui") == 8001
    assert app.path("data") == tmp_path.resolve() / "app" / "data"
    assert app.path("static-files") == Path("/srv/static")
    assert app.name() == "shop"
    assert app.instance() == "shop.web.1"
    assert app.manifest()["ports"] == {"http": 8000, "admin-ui": 8001}


def test_app_helper_names_the_missing_variable(
    contract: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing or bad variable is a ContractError naming it."""
    with pytest.raises(app.ContractError, match=r"\$CORRAL_PORT_METRICS is not set"):
        app.port("metrics")
    with pytest.raises(app.ContractError, match=r"\$CORRAL_PATH_LOGS is not set"):
        app.path("logs")
    monkeypatch.setenv("PORT", "http")
    with pytest.raises(app.ContractError, match=r"\$PORT is 'http', expected a port"):
        app.port()
    monkeypatch.setenv("CORRAL_MANIFEST", "/nonexistent/manifest.json")
    with pytest.raises(app.ContractError, match=r"\$CORRAL_MANIFEST names /nonexistent"):
        app.manifest()
    monkeypatch.delenv("CORRAL_APP")
    with pytest.raises(app.ContractError, match=r"\$CORRAL_APP is not set"):
        app.name()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A real abstract-namespace datagram socket, named in NOTIFY_SOCKET as @name."""
    name = f"corral-test-notify-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_notify_ready_abstract_socket(notify_socket: socket.socket) -> None:
    """notify_ready() sends READY=1 (and STATUS=) to an abstract NOTIFY_SOCKET."""
    assert app.notify_ready("serving") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_ready_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem NOTIFY_SOCKET works too; without one, notify_ready() is a no-op."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert app.notify_ready() is True
        assert sock.recv(4096) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert app.notify_ready() is False


def test_listen_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Socket activation: fds from 3 when LISTEN_PID is this process, else none."""
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert app.listen_fds() == [3, 4]
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert app.listen_fds() == []


@pytest.mark.parametrize("plain", [False, True], ids=["with-corral", "plain-python"])
def test_hello_example_runs(tmp_path: Path, notify_socket: socket.socket, plain: bool) -> None:
    """examples/hello serves / and /healthz, notifies READY=1 and exits 0 on SIGTERM.

    The plain variant runs without site-packages (no corral importable) and without $PORT,
    so it must find its port in $CORRAL_MANIFEST.
    """
    hello = REPO / "examples" / "hello"
    resolved = load_ok(hello, set_=[f"ports.http={free_port()}"])
    manifest = resolved.write_json(tmp_path / "manifest.json")
    env = app_environment(resolved, process="web", index=1, manifest_path=manifest)
    env["NOTIFY_SOCKET"] = os.environ["NOTIFY_SOCKET"]
    if plain:
        del env["PORT"]
    argv = [sys.executable, *(["-S"] if plain else []), str(hello / "app.py")]
    child = subprocess.Popen(argv, env=env, cwd=hello, stderr=subprocess.PIPE)
    try:
        assert notify_socket.recv(4096) == b"READY=1"
        port = resolved.manifest.ports["http"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
            assert reply.read() == b"hello from hello.web.1\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            assert reply.read() == b"ok"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stderr is not None
        child.stderr.close()


def test_hello_plain_python_cannot_import_corral() -> None:
    """The plain variant above really runs without corral importable."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import corral"], capture_output=True, check=False, timeout=30
    )
    assert out.returncode != 0 and b"ModuleNotFoundError" in out.stderr
