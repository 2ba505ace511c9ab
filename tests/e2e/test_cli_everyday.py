"""The CLI as an operator meets it on day one: --version, shell completion generated from
the parser, `down --all` (and --json), and an rw grant the app could not write refused at
`up` with the fix, rather than a crash on EACCES."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import __version__
from corral.testing import KernelProcess, running_kernel
from e2e.apps import free_port, write_app

# no drivers, so no sandbox: said on purpose (these tests are about the CLI and the kernel)
BARE = 'disabled = ["net", "fs", "log", "lb", "cron"]\nunconfined = true\n'


def corral(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    with running_kernel(public_dir / "k", BARE) as k:
        yield k


def test_version() -> None:
    """`corral --version` prints the version and exits 0."""
    r = corral("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"corral {__version__}", r


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_generated_from_the_parser(shell: str) -> None:
    """Each script names every sub-command and a sub-command's own flags; bash's is valid
    bash (`bash -n`); an unknown shell is refused with exit 2."""
    r = corral("completion", shell)
    assert r.returncode == 0, r.stderr
    for word in ("up", "down", "scale", "logs", "cron", "drivers",
                 "completion", "--all", "--offset"):
        assert word in r.stdout, (shell, word)
    if shell == "bash" and shutil.which("bash"):
        with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
            f.write(r.stdout)
            f.flush()
            assert subprocess.run(["bash", "-n", f.name], check=False).returncode == 0
    assert corral("completion", "cmd.exe").returncode == 2


@pytest.mark.root
def test_down_all_takes_every_app_down_and_says_so_in_json(kernel: KernelProcess,
                                                            public_dir: Path) -> None:
    """Two apps up; `corral down --all --json` stops both and lists what it did; the ledger
    holds nothing of them; `down` with neither an app nor --all is refused (exit 2)."""
    for name in ("one", "two"):
        d = write_app(public_dir / name, name, {"http": free_port()},
                      {"web": '{ command = "python3 server.py", port = "http" }'})
        r = kernel.cli("up", str(d), "-q")
        assert r.returncode == 0, r.stderr
    assert kernel.cli("down").returncode == 2
    r = kernel.cli("down", "--all", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert sorted(d["app"] for d in done) == ["one", "two"]
    assert all(d["stopped"] == 1 for d in done)
    assert kernel.call("app.ps")["apps"] == []
    owners = {r["owner"] for r in kernel.call("ledger.list")["records"]}
    assert not owners & {"one", "two"}
    r = kernel.cli("down", "one", "--json")
    assert r.returncode == 1 and "no app named 'one'" in r.stderr


@pytest.mark.root
def test_an_rw_grant_the_app_cannot_write_is_refused_at_up(kernel: KernelProcess,
                                                            public_dir: Path) -> None:
    """`[paths] data = { mode = "rw" }` on an existing root-owned 0755 directory: `corral up`
    is refused (exit 2, nothing claimed) naming the path, its owner and mode, and the fix;
    a path that does not exist yet with create = true deploys."""
    assert os.geteuid() == 0
    locked = public_dir / "locked"
    locked.mkdir(mode=0o755)
    os.chmod(locked, 0o755)
    port = free_port()
    d = write_app(public_dir / "grant", "grant", {"http": port},
                  {"web": '{ command = "python3 server.py", port = "http" }'},
                  extra=f'[paths]\ndata = {{ path = "{locked}", mode = "rw" }}\n')
    r = kernel.cli("up", str(d))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"[paths] data: {locked} is mode 755, owner uid 0" in r.stderr, r.stderr
    assert "chown -R 61" in r.stderr and "create = true" in r.stderr, r.stderr
    assert kernel.call("ledger.list", {"owner": "grant"})["records"] == []
    fresh = public_dir / "fresh"
    (d / "corral.toml").write_text((d / "corral.toml").read_text().replace(
        f'path = "{locked}", mode = "rw"', f'path = "{fresh}", mode = "rw", create = true'))
    r = kernel.cli("up", str(d))
    assert r.returncode == 0, r.stderr
