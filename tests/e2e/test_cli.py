"""The CLI without a kernel: check, schema, run (the dev loop), exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import require
from corral.testing import free_port

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"
VENV_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / (
    "site-packages")


def corral(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """The CLI with no kernel to talk to (never the host's own, if one runs here)."""
    kw.setdefault("env", NO_KERNEL)
    return subprocess.run([sys.executable, "-m", "corral.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False, **kw)  # type: ignore[call-overload]


def test_check_prints_the_resolved_manifest_with_overrides() -> None:
    """`corral check` resolves --set, --offset and --env and prints JSON."""
    r = corral("check", str(HELLO), "--offset", "100", "--set", "limits.memory=128MiB",
               "--env", "GREETING=hi")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ports"]["http"] == 8180 and doc["lb"]["frontend"] == 8181
    assert doc["limits"]["memory"] == 128 * 2**20
    assert doc["resolved"]["env"] == {"GREETING": "hi"}


def test_check_errors_name_file_line_field_and_exit_2(public_dir: Path) -> None:
    """Bad input: one clear error per problem, file:line: field, exit code 2."""
    (public_dir / "corral.toml").write_text(
        '[app]\nname = "x"\n[ports]\nhttp = 8000\nmetrics = 8100\n[limits]\nmemory = "lots"\n')
    r = corral("check", str(public_dir), "--offset", "100", "--set", "ports.http=8100")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any("corral.toml" in line and "limits.memory" in line and ":7:" in line
               for line in lines), lines
    (public_dir / "corral.toml").write_text(
        '[app]\nname = "x"\n[ports]\nhttp = 8000\nmetrics = 8100\n')
    r = corral("check", str(public_dir), "--offset", "100", "--set", "ports.http=8100")
    assert r.returncode == 2
    assert "8200" in r.stderr and "http" in r.stderr and "metrics" in r.stderr, r.stderr
    missing = corral("check", str(public_dir / "nope"))
    assert missing.returncode == 2 and "corral.toml" in missing.stderr


def test_schema_is_a_json_schema_of_the_manifest() -> None:
    """`corral schema` prints the JSON Schema (every section present)."""
    r = corral("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert {"app", "processes", "ports", "paths", "network", "logs", "limits", "lb",
            "cron"} <= set(schema["properties"])


def _serve_and_stop(proc: subprocess.Popen[str], port: int) -> str:
    deadline = time.monotonic() + 20
    body = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                body = resp.read().decode()
            break
        except OSError:
            time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(15)
    return body


@pytest.mark.root
def test_corral_run_as_root_drops_to_nobody(public_dir: Path) -> None:
    """As root the dev loop runs the app as nobody, with the production environment."""
    app = public_dir / "hello"
    shutil.copytree(HELLO, app)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "dev", str(app), "--set",
                             f"ports.http={port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    body = _serve_and_stop(proc, port)
    err = proc.stderr.read() if proc.stderr else ""
    assert "hello from hello.web.1" in body
    assert "not enforced" in err and "nobody" in err
    assert proc.returncode == 0


@pytest.mark.root
def test_corral_run_unprivileged_confines_the_mount_view(public_dir: Path) -> None:
    """As a plain user, `corral run` builds the mount view in a user namespace and says what
    it cannot enforce, once."""
    py = Path("/usr/bin/python3")
    require(py.exists(), "/usr/bin/python3 (the venv's interpreter lives under /root)")
    app = public_dir / "probe"
    app.mkdir()
    secret = public_dir / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    port = free_port()
    (app / "corral.toml").write_text(
        f'[app]\nname = "probe"\n[ports]\nhttp = {port}\n'
        '[processes]\nweb = { command = "python3 app.py", port = "http" }\n')
    (app / "app.py").write_text(
        "import http.server, os\n"
        "seen = {p: os.path.exists(p) for p in ('" + str(secret) + "', '/root', '/usr/bin')}\n"
        "body = repr(seen).encode()\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n")
    os.chown(app, 65534, 65534)
    boot = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
            "from corral.cli import main; raise SystemExit(main())")
    proc = subprocess.Popen(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", str(py), "-c",
         boot, str(VENV_SITE), "dev", str(app)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": str(public_dir)})
    body = _serve_and_stop(proc, port)
    err = proc.stderr.read() if proc.stderr else ""
    require(body != "" or "user namespace" not in err, f"corral run failed: {err[-800:]}")
    assert body, err[-2000:]
    seen = eval(body)  # the app's own repr of a dict of booleans
    assert seen["/usr/bin"] is True
    assert seen[str(secret)] is False, "a host file outside the app's grants was visible"
    assert err.count("Network isolation") == 1


NO_KERNEL = {**os.environ, "CORRAL_BUS": "ipc:///nonexistent/corral-bus.sock"}


@pytest.mark.parametrize("schedule", ["*/30 * * * * *", "0 0 * * * 2027", "@reboot"])
def test_check_refuses_the_schedules_the_cron_driver_refuses(tmp_path: Path,
                                                             schedule: str) -> None:
    """With no kernel running, `corral check` asks the installed cron driver's section module:
    a schedule `corral up` would refuse exits 2 here, located file:line:field."""
    (tmp_path / "corral.toml").write_text(
        f'[app]\nname = "jobs"\n\n[cron.tick]\nschedule = "{schedule}"\ncommand = "true"\n')
    r = corral("check", str(tmp_path), env=NO_KERNEL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path.resolve() / 'corral.toml'}:5: cron.tick.schedule: " in r.stderr, r.stderr


def test_check_json_prints_problems_as_json(tmp_path: Path) -> None:
    """`corral check --json` prints {"problems": [...]} (exit 2), or the resolved manifest."""
    (tmp_path / "corral.toml").write_text('[app]\nname = "x"\n[lb]\nfrontend = 80\n'
                                          'policy = "fastest"\n')
    r = corral("check", str(tmp_path), "--json", env=NO_KERNEL)
    assert r.returncode == 2, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert any(":5: lb.policy: expected a policy name" in p for p in problems), problems
    r = corral("check", str(HELLO), "--json", env=NO_KERNEL)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["resolved"]["claims"][0] == {"kind": "lbname", "key": "hello.corral.test",
                                            "value": {"app": "hello"}}
