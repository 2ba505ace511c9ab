"""The system-call filter as an app deployed by `corral up` meets it (SECURITY.md promise 6,
escape item 17): io_uring and an unlisted call are refused inside, real programs still run.

The app runs the probes of tests/integration/fs/probes (syscalls.py, programs.py) from INSIDE
its instance, then serves its port; tests/integration/fs/test_syscall_filter.py holds the
full set of checks against the same sandbox without the filter.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

from conftest import require
from corral.testing import KernelProcess, free_port
from e2e.test_sandbox_deployed import (  # noqa: F401 (kernel is a fixture)
    PROBES,
    get,
    kernel,
    probe,
    probe_app,
    report,
    up,
)

NOBODY = 65534


def test_filter_inside_a_deployed_app(kernel: KernelProcess, public_dir: Path) -> None:  # noqa: F811
    """Inside a deployed app io_uring_setup/enter/register and get_mempolicy (which an
    unprivileged process outside the filter may call: checked here on the host as nobody)
    fail with EPERM, clone3 with ENOSYS; Python, a shell pipeline, gcc and a C program,
    Node serving HTTP and Java all work; the app then serves its port."""
    for tool in ("gcc", "node", "java"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/setup.sh installs it)")
    bare = subprocess.run(["/usr/bin/python3", str(PROBES / "syscalls.py")], user=NOBODY,
                          group=NOBODY, extra_groups=[], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert bare.returncode == 0, bare.stderr
    unfiltered = json.loads(bare.stdout)
    port = free_port()
    d = probe_app(public_dir / "filtered", "filtered", port, probes="syscalls.py,programs.py",
                  limits="processes = 256")
    up(kernel, d)
    assert get(port) == "filtered.web.1\n"
    rep = report(d)
    inside = probe(rep, "syscalls.py")
    if platform.machine() == "x86_64":
        for name in ("io_uring_setup", "io_uring_enter", "io_uring_register", "get_mempolicy",
                     "personality_no_aslr", "i386_getpid", "x32_getpid"):
            assert inside[name] == "EPERM", (name, inside[name])
        assert inside["clone3"] == "ENOSYS" and inside["personality_query"] == "ok"
        # the same calls, outside the filter, as an unprivileged process
        assert unfiltered["get_mempolicy"] == "ok"
        assert unfiltered["io_uring_enter"] == "EBADF"
        assert unfiltered["personality_no_aslr"] == "ok"
        assert unfiltered["clone3"] == "EINVAL"
    assert inside["socket_vsock"] == "EPERM" and inside["socket_inet"] == "ok"
    programs = probe(rep, "programs.py")
    failed = {k: v for k, v in programs.items() if not k.endswith("_seconds") and v != "ok"}
    assert not failed, failed
    assert {"python_threads", "python_subprocess", "python_asyncio", "shell_pipeline",
            "c_program", "node_http", "java"} <= set(programs)
    r = kernel.cli("down", "filtered")
    assert r.returncode == 0, r.stderr
