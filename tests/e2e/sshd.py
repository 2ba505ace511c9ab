"""A real OpenSSH server for the remote-access tests: Debian's sshd on a loopback port.

``ssh_server(kernel)`` gives the kernel an SSH account of its own (``[ssh] user`` must be the
``user`` passed, unique per test), starts ``/usr/sbin/sshd`` with a config that only says
where to listen and that the account may log in by key (the account's authorized_keys is
the one ``corral keys add`` writes, read the stock way: ``.ssh/authorized_keys`` under its
home), and makes client keys with ``ssh-keygen``. On exit sshd is stopped and the account
deleted.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def require_sshd() -> None:
    """Fail under CI=true, skip elsewhere, when OpenSSH's server or git is missing."""
    missing = [p for p in (SSHD, shutil.which("ssh"), shutil.which("git"), shutil.which(
        "ssh-keygen")) if not p or not os.path.exists(p)]
    if missing or os.geteuid() != 0:
        why = "needs root, openssh-server, openssh-client and git"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def new_user() -> str:
    """A fresh account name for one test's kernel ([ssh] user)."""
    return f"crl{secrets.token_hex(3)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SshServer:
    """A running sshd and the client side of it."""

    user: str
    port: int
    directory: Path

    @property
    def target(self) -> str:
        """``user@127.0.0.1`` (the port goes in the ssh command, as ~/.ssh/config would)."""
        return f"{self.user}@127.0.0.1"

    def client_key(self, name: str) -> tuple[Path, str]:
        """A new ed25519 key pair: (private key path, public key line)."""
        path = self.directory / f"client-{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@laptop",
                        "-f", str(path)], check=True)
        return path, (path.with_suffix(".pub")).read_text()

    def ssh_command(self, key: Path) -> str:
        """An ssh command line for ``key`` (CORRAL_SSH_COMMAND, GIT_SSH_COMMAND)."""
        return shlex.join(["ssh", "-p", str(self.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "LogLevel=ERROR"])

    def ssh(self, key: Path, *args: str, input: bytes | None = None, timeout: float = 60,
            tty: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run ``ssh`` with ``key`` against the account, raw arguments after the target."""
        cmd = [*shlex.split(self.ssh_command(key)), "-tt" if tty else "-T", self.target, *args]
        return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def log(self) -> str:
        """What sshd printed."""
        path = self.directory / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def ssh_server(user: str) -> Iterator[SshServer]:
    """sshd on a free loopback port, letting ``user`` in by key; the account is deleted at
    the end (it is made by the kernel's first ``keys add``)."""
    require_sshd()
    directory = Path(tempfile.mkdtemp(prefix="corral-sshd-"))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    host_key = directory / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True)
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}", "AuthorizedKeysFile .ssh/authorized_keys",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes yes", f"AllowUsers {user}", "PermitRootLogin no", "LogLevel VERBOSE",
        "MaxStartups 100:30:200", ""]))
    log = open(directory / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"sshd did not start: {(directory / 'sshd.log').read_text()}") from None
                time.sleep(0.05)
        yield SshServer(user, port, directory)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)
