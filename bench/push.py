"""`git push` of a one-line change to a hello-sized app, until the new release serves
(goal <= 3 s, warm cache, 0 failed requests under load during the switch); reference: the
same change deployed on the host with `corral up DIR`, in the same run, and their ratio.

A real kernel with the net, fs, lb and log drivers, Debian's sshd on a loopback port letting
the kernel's SSH account in by key (tests/e2e/sshd.py), and real git and ssh clients. The app
is rollback.py's: two instances of a standard-library HTTP/1.1 server answering
"<instance> <VERSION>", behind the lb's HTTP proxy. The app directory is a git work tree
with the remote `prod` = the host; v1 is pushed first (its first release), then rounds
alternate: a one-line change of VERSION committed and pushed (`git push prod main`), and a
one-line change deployed with `corral up DIR` on the host. Each is timed from the command's
start until the frontend answers the new version (new connections polled every 5 ms); when
the command returns is printed beside it. Keep-alive clients load the frontend at 1,000
requests/s meanwhile (a process of their own); failed requests are counted over the load and
the polls.

BENCH_ROUNDS (default 5 of each).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _kernel import exit_on_sigterm, kernel, scoped_host_toml
from rollback import (
    CannotMeasure,
    Load,
    check_host,
    cli_ok,
    corral_cli,
    until_serving,
    version_at,
    write_app,
)

from corral.testing import free_port
from e2e.sshd import new_user, ssh_server

DRIVERS = ("net", "fs", "lb", "log")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
RATE = 1000.0


def main() -> int:
    exit_on_sigterm()
    try:
        check_host()
        with tempfile.TemporaryDirectory(prefix="corral-bench-push-", dir="/tmp") as tmp:
            work = Path(tmp)
            work.chmod(0o755)
            return measure(work)
    except CannotMeasure as exc:
        print(f"push: could not measure: {exc}", file=sys.stderr)
        return 1


def measure(work: Path) -> int:
    user = new_user()
    front = free_port()
    app = write_app(work / "rolly", front)
    toml = scoped_host_toml(DRIVERS) + f'[ssh]\nuser = "{user}"\n'
    pushes: list[tuple[float, float]] = []
    ups: list[tuple[float, float]] = []
    polls: list[str] = []
    with ssh_server(user) as srv, kernel(toml, drivers=DRIVERS) as k:
        key, _ = srv.client_key("bench")
        cli_ok(k, "keys", "add", "bench", str(key.with_suffix(".pub")), "--admin")
        env = {**os.environ, "GIT_SSH_COMMAND": srv.ssh_command(key),
               "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
               "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}

        def git(*argv: str) -> None:
            r = subprocess.run(["git", *argv], cwd=app, env=env, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                raise CannotMeasure(f"git {' '.join(argv)}: {r.stderr[-3000:]}")

        for argv in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "v1"),
                     ("remote", "add", "prod", f"{srv.target}:rolly"), ("push", "-q", "prod",
                                                                         "main")):
            git(*argv)
        if version_at(front) != "1":
            raise CannotMeasure("v1 is not what the frontend answers after the first push")
        load = Load(front, RATE).start()
        try:
            deadline = time.monotonic() + 20
            while load.ok < 100:
                if time.monotonic() > deadline or not load.alive():
                    raise CannotMeasure(f"the load gets no answers ({load.failed} failed)")
                time.sleep(0.05)
            version = 1
            for i in range(ROUNDS):
                version += 1
                (app / "VERSION").write_text(f"{version}\n")
                git("commit", "-qam", f"v{version}")
                serving, done = until_serving(["git", "push", "-q", "prod", "main"], env,
                                              front, str(version), polls, cwd=app)
                pushes.append((serving, done))
                print(f"round {i + 1}: git push serving v{version} after {serving:.3f} s, "
                      f"push done after {done:.3f} s; load {load.ok} answers, {load.failed} "
                      "failed", file=sys.stderr)
                time.sleep(1.0)
                version += 1
                (app / "VERSION").write_text(f"{version}\n")
                git("commit", "-qam", f"v{version}")
                serving, done = until_serving([*corral_cli(), "up", str(app)], k.env, front,
                                              str(version), polls, cwd=app)
                ups.append((serving, done))
                print(f"round {i + 1}: corral up serving v{version} after {serving:.3f} s, "
                      f"done after {done:.3f} s", file=sys.stderr)
                time.sleep(1.0)
        finally:
            load.stop()
    failures = [p for p in polls if p] + load.failures
    for line in failures[:10]:
        print(f"failed request: {line}", file=sys.stderr)
    push_serving = statistics.median(s for s, _ in pushes)
    up_serving = statistics.median(s for s, _ in ups)
    print(f"push_until_serving_median: {push_serving:.3f} s (goal <= 3.0)")
    print(f"push_until_serving_max: {max(s for s, _ in pushes):.3f} s (goal <= 3.0)")
    print(f"push_done_median: {statistics.median(d for _, d in pushes):.3f} s "
          "(git push returns once the release is live)")
    print(f"reference_up_until_serving_median: {up_serving:.3f} s (corral up DIR on the host)")
    print(f"push_vs_up_ratio: {push_serving / up_serving:.2f}x (the cost of git and ssh)")
    print(f"push_failed_requests: {load.failed + len([p for p in polls if p])} of "
          f"{load.ok + load.failed + len(polls)} (keep-alive load at {RATE:.0f} req/s, and "
          "polls; goal 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
