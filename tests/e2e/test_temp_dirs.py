"""Nothing of corral's outlives what it belongs to: temporary directories go when it is done.

Each test points the temporary directory (TMPDIR, ``tempfile.tempdir``) at a private one, so
what other processes on this machine do in /tmp cannot make it pass or fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import require
from corral.conformance import run_kit
from corral.testing import KernelProcess, wait_for


def _drivers(k: KernelProcess) -> dict[str, str]:
    import json

    r = k.cli("drivers", "--json")
    return {d["name"]: d["state"] for d in json.loads(r.stdout)} if r.returncode == 0 else {}


@pytest.mark.root
def test_lb_driver_start_and_stop_leave_no_temporary_directory(tmp_path: Path) -> None:
    """A kernel with the lb driver, started and stopped (drivers too), leaves the driver's
    TMPDIR empty: the lb keeps its sockets under the runtime dir, not in a corral-lb-*
    directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    base = tmp_path / "k"
    base.mkdir()
    # the kernel hands drivers a filtered environment: the driver's own env sets TMPDIR
    k = KernelProcess(base, 'unconfined = true\n[drivers.lb]\nconfig = { nft_table = "zlbtmp" }\n'
                      f'env = {{ TMPDIR = "{tmp}" }}\n')
    with k:
        wait_for(lambda: _drivers(k).get("lb") == "running", 20, what="lb running")
        lb_pid = k.call("drivers.list")["drivers"][0]["pid"]
        assert Path(f"/proc/{lb_pid}/environ").read_bytes().count(f"TMPDIR={tmp}".encode()) == 1
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_balancer_without_runtime_dir_removes_its_own_on_close(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A Balancer given no runtime dir makes a private one only when it needs one, and
    close() removes it; one it was given is left alone."""
    import asyncio

    from corral_lb.balancer import Balancer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    b = Balancer()
    assert list(tmp_path.iterdir()) == []  # nothing made before it is needed
    made = b.runtime_dir
    assert made.parent == tmp_path and made.name.startswith("corral-lb-") and made.is_dir()
    asyncio.run(b.close())
    assert list(tmp_path.iterdir()) == []

    given = tmp_path / "given"
    given.mkdir()
    b = Balancer(runtime_dir=given)
    assert b.runtime_dir == given
    asyncio.run(b.close())
    assert given.is_dir()


def test_conformance_kit_removes_its_directory(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A conformance run (here of a process that never says HELLO) leaves no corral-cdp-*."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_kit([sys.executable, "-c", "import time; time.sleep(60)"])
    assert not result.passed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.root
def test_corral_run_removes_its_manifest_directory(public_dir: Path) -> None:
    """`corral run` writes the resolved manifest into a corral-run-* directory; it is gone
    once the app's instances have exited."""
    require(Path("/bin/sh").exists(), "/bin/sh")
    tmp = public_dir / "tmp"
    tmp.mkdir()
    tmp.chmod(0o755)
    app = public_dir / "once"
    app.mkdir()
    (app / "corral.toml").write_text('[app]\nname = "once"\n[processes]\n'
                                     'job = { command = "test -r \\"$CORRAL_MANIFEST\\"" }\n')
    done = subprocess.run([sys.executable, "-m", "corral.cli", "dev", str(app)],
                          env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "exited" in done.stderr, done.stderr
    assert list(tmp.iterdir()) == []
