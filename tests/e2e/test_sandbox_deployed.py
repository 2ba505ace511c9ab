"""The sandbox through the deployed path: a real kernel with the fs driver, real `corral up`.

Each app's process runs the escape probes of tests/integration/fs/probes from INSIDE the
deployed instance, writes the results as JSON into its rw grant, then serves its port (so the
deploy's readiness check passes only after the probes ran). The direct tests
(tests/integration/fs) cover the full SECURITY.md list; these cover a representative subset
of items 1-4, 8-14 and 16 as an app deployed by `corral up` meets them, plus teardown and the
kill -9 faults of the kernel and of the fs driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import require
from corral.testing import KernelProcess, free_port, leftover_apps, running_kernel, wait_for
from corral_fs._cgroups import Limits, detect
from corral_fs._root import mount_points
from corral_fs.sandbox import cgroup_base

pytestmark = pytest.mark.root

FS_ONLY = "[drivers.fs]\n"
PROBES = Path(__file__).resolve().parents[1] / "integration" / "fs" / "probes"
UID_RANGE = range(61000, 62000)

# The app's process: run the probes named in its arguments, report, then serve $PORT.
PROBE_APP = textwrap.dedent('''
    import http.server, json, os, subprocess, sys
    data = os.environ["CORRAL_PATH_DATA"]
    env = dict(os.environ, DATA=data, RO=os.environ["CORRAL_PATH_RO"], APP=os.getcwd())
    report = {"probes": {}}
    for probe in sys.argv[1:]:
        run = subprocess.run([sys.executable, probe], env=env, capture_output=True, text=True,
                             timeout=120)
        lines = run.stdout.strip().splitlines()
        report["probes"][probe] = {"rc": run.returncode, "stderr": run.stderr[-3000:],
                                   "result": json.loads(lines[-1]) if lines else None}
    report["uid"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
    report["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    report["instances_seen"] = sorted({
        e.split("=", 1)[1] for p in report["proc_pids"]
        for e in open(f"/proc/{p}/environ", "rb").read().decode(errors="replace").split("\\0")
        if e.startswith("CORRAL_INSTANCE=")})
    report["manifest_app"] = json.load(open(os.environ["CORRAL_MANIFEST"]))["app"]["name"]
    for name in filter(None, os.environ.get("OTHER_PATHS", "").split(",")):
        report.setdefault("other_paths", {})[name] = os.path.exists(name)
    tmp = os.path.join(data, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, os.path.join(data, "result.json"))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ["CORRAL_INSTANCE"] + "\\n").encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
''')



def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode())


def fs_driver(k: KernelProcess) -> dict[str, Any]:
    r = k.cli("drivers", "--json")
    assert r.returncode == 0, r.stderr
    drivers = json.loads(r.stdout)
    if isinstance(drivers, dict):
        drivers = drivers.get("drivers", [])
    return next(d for d in drivers if d["name"] == "fs")


def fork_servers(kernel_pid: int) -> list[psutil.Process]:
    """The launch fork servers the kernel started (children running `python -I -S`)."""
    found = []
    for child in psutil.Process(kernel_pid).children():
        try:
            if child.cmdline()[1:3] == ["-I", "-S"]:
                found.append(child)
        except psutil.Error:
            continue
    return found


def probe_app(d: Path, name: str, port: int, probes: str = "", limits: str = "") -> Path:
    """An app whose process runs ``probes`` (comma-separated), reports, then serves ``port``."""
    d.mkdir(parents=True)
    for probe in PROBES.iterdir():
        shutil.copy(probe, d / probe.name)
    (d / "probe_app.py").write_text(PROBE_APP)
    data, ro = d / "data", d / "ro"
    data.mkdir()
    data.chmod(0o1777)  # the app's uid is known only once deployed
    ro.mkdir()
    (ro / "given").write_text("read me\n")
    (d / "corral.toml").write_text(textwrap.dedent(f'''
        [app]
        name = "{name}"
        [ports]
        http = {port}
        [processes]
        web = {{ command = "python3 probe_app.py {probes.replace(',', ' ')}", port = "http" }}
        [paths]
        data = {{ path = "data", mode = "rw" }}
        ro = {{ path = "ro", mode = "ro" }}
        [limits]
        {limits or "processes = 64"}
    ''').lstrip())
    for path in (d, *d.iterdir()):
        if path.is_file():
            path.chmod(0o644)
    d.chmod(0o755)
    return d


def up(k: KernelProcess, d: Path, *env: str) -> dict[str, Any]:
    args = ["up", str(d), "--json"]
    for e in env:
        args += ["--env", e]
    r = k.cli(*args, timeout=180)
    assert r.returncode == 0, f"{r.stderr}\n{k.log()}"
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def report(d: Path) -> dict[str, Any]:
    return json.loads((d / "data" / "result.json").read_text())  # type: ignore[no-any-return]


def probe(rep: dict[str, Any], name: str) -> dict[str, Any]:
    entry = rep["probes"][name]
    assert entry["rc"] == 0 and entry["result"] is not None, entry["stderr"]
    return entry["result"]  # type: ignore[no-any-return]


def host_mounts(ours: Path) -> list[str]:
    """The host's mounts, less what other kernels on this shared machine do meanwhile
    (network namespaces, sandbox roots under other runtime dirs); ours stay in."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith("/run/netns"):
                continue
            if "/roots" in point and not point.startswith(str(ours)):
                continue
            found.append(" ".join(line.split()[3:5]))
    return sorted(found)


def corral_cgroups(k: KernelProcess) -> set[str]:
    """The kernel's cgroup base directories and everything under them, every hierarchy."""
    base = cgroup_base(k.runtime)
    found = set()
    for top in Path("/sys/fs/cgroup").iterdir():
        for dirpath, _, _ in os.walk(top / base):
            found.add(dirpath)
    return found


def instance_tree(pid: int) -> list[psutil.Process]:
    """An instance's processes as the host sees them: its init (tini) and descendants."""
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def app_processes(k: KernelProcess, tracked: list[psutil.Process]) -> list[int]:
    """Live (non-zombie) processes of the kernel's apps: by their CORRAL_MANIFEST under its
    home, and the ``tracked`` ones (same pid and start time). Not by uid: other kernels on
    this shared machine hand out the same dynamic uids."""
    found = {p.pid for p in leftover_apps(k.home)}
    for proc in tracked:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return sorted(found)


@pytest.fixture
def kernel(public_dir: Path) -> Iterator[KernelProcess]:
    """A real kernel whose only driver is fs."""
    require(os.path.exists("/usr/bin/tini-static"), "Debian package tini")
    require(os.path.exists("/usr/bin/python3"), "/usr/bin/python3 (the probes run on it)")
    require(shutil.which("su") is not None and os.path.exists("/usr/bin/mount"),
            "su and mount (setuid probes)")
    with running_kernel(public_dir / "k", FS_ONLY, drivers=("fs",)) as k:
        yield k


def instance_pid(res: dict[str, Any]) -> int:
    return int(res["instances"][0]["pid"])


def test_escape_probes_inside_deployed_apps(kernel: KernelProcess, public_dir: Path) -> None:
    """A neighbour app and a victim app deployed with `corral up`; the victim's probes fail
    every escape (items 1-4, 10-14, 16), it runs as a dynamic uid, and neither app sees the
    other's paths or processes."""
    k = kernel
    n_port, v_port = free_port(), free_port()
    neighbour_dir = probe_app(public_dir / "neighbour", "neighbour", n_port)
    secret = neighbour_dir / "data" / "secret"
    secret.write_text("the neighbour's secret\n")
    n_res = up(k, neighbour_dir)
    n_pid = instance_pid(n_res)
    tree = detect(cgroup_base(k.runtime))
    cgroup = tree.directories(n_res["instances"][0]["id"])[0] / "pids.max"
    assert cgroup.exists()
    victim_dir = probe_app(public_dir / "victim", "victim", v_port, probes="escape.py")
    os.symlink(secret, victim_dir / "data" / "to-secret")
    v_res = up(k, victim_dir, f"SECRET={secret}", f"NEIGHBOUR={n_pid}", f"CGROUP={cgroup}",
               f"OTHER_PATHS={neighbour_dir},{neighbour_dir / 'data'},"
               f"{k.home / 'apps' / 'neighbour'},{k.home / 'drivers'},{k.runtime}")
    assert get(v_port) == "victim.web.1\n" and get(n_port) == "neighbour.web.1\n"
    rep = report(victim_dir)
    esc = probe(rep, "escape.py")

    # 1. writes, renames, links outside the grants; symlinks and /proc/self/root lead nowhere
    for name in ("write_root", "write_etc", "write_usr", "write_proc_root"):
        assert esc[name] == "EROFS", (name, esc[name])
    # the data grant's parent is the source directory, which a release does not mount: only
    # the root's own (root-owned, read-only) directory leading to the grant is there
    assert esc["write_dotdot"] in ("EROFS", "EACCES"), esc["write_dotdot"]
    assert esc["rename_out"] in ("EXDEV", "EROFS") and esc["link_out"] in ("EXDEV", "EROFS")
    for name in ("symlink_read", "read_secret", "read_secret_proc_root", "proc1_root_secret"):
        assert esc[name] == "ENOENT", (name, esc[name])
    assert not (victim_dir / "escape").exists() and not Path("/etc/escape").exists()
    # 2. the ro grant and the app directory are read-only
    assert esc["write_ro_grant"] == "EROFS" and esc["write_app_dir"] == "EROFS"
    # 3. host secrets; pid 1 is the app's own tini; the neighbour's /proc entries do not exist
    assert esc["read_shadow"] == "EACCES" and esc["proc1_cmdline"] == "tini"
    assert esc["neighbour_mem"] == "ENOENT" and esc["neighbour_environ"] == "ENOENT"
    # 4. ptrace, process_vm_readv, signals outside the sandbox
    assert esc["ptrace_attach"] == "EPERM" and esc["process_vm_readv"] == "EPERM"
    assert esc["kill_neighbour"] == "ESRCH"
    # 10. setuid binaries gain nothing; no capabilities, no_new_privs, seccomp
    assert esc["su"] != "0" and esc["mount_binary_rc"] != 0
    status = esc["status"]
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    # 11.-13. mount-namespace operations, kernel attack surface, TIOCSTI
    for name in ("mount", "umount", "pivot_root", "chroot", "unshare_user", "clone_newuser",
                 "propagation", "setns", "keyctl", "add_key", "bpf", "perf_event_open",
                 "userfaultfd", "open_by_handle_at", "tiocsti"):
        assert esc[name] == "EPERM", (name, esc[name])
    # 14. the cgroup filesystem is not there
    for name in ("cgroup_pids_max", "cgroup_release_agent", "cgroup_dir"):
        assert esc[name] == "ENOENT", (name, esc[name])
    assert cgroup.read_text().strip() == "64"
    # 16. exactly stdin, stdout, stderr
    assert esc["fds"] == [0, 1, 2]

    # a dynamic, unprivileged uid, inside and as the host sees it
    uid = rep["uid"][0]
    assert uid in UID_RANGE and rep["uid"][:4] == [uid] * 4 and rep["uid"][4] == []
    assert esc["uid"][0] == uid
    for pid in (instance_pid(v_res), n_pid):
        host_view = psutil.Process(pid)
        assert host_view.uids().real in UID_RANGE and host_view.uids().effective != 0
    assert psutil.Process(n_pid).uids().real != uid  # one uid per app
    # the other app: neither its paths nor the kernel's nor its processes are visible
    assert rep["other_paths"] == {
        str(p): False for p in (neighbour_dir, neighbour_dir / "data",
                                k.home / "apps" / "neighbour", k.home / "drivers", k.runtime)}
    assert rep["instances_seen"] == ["victim.web.1"]
    assert max(rep["proc_pids"]) < 100  # pids of its own namespace, not the host's
    n_rep = report(neighbour_dir)
    assert n_rep["instances_seen"] == ["neighbour.web.1"]
    # the app's contract holds inside the sandbox: it reads its resolved manifest
    assert rep["manifest_app"] == "victim" and n_rep["manifest_app"] == "neighbour"


def test_limits_hold_in_a_deployed_app(kernel: KernelProcess, public_dir: Path) -> None:
    """Items 8 and 9: a fork bomb stops at [limits] processes, a memory hog is killed inside
    its cgroup; the app itself serves afterwards and the host can still fork."""
    k = kernel
    port = free_port()
    d = probe_app(public_dir / "greedy", "greedy", port, probes="forkbomb.py,memhog.py",
                  limits='processes = 24\nmemory = "64MiB"')
    up(k, d)
    rep = report(d)
    bomb = probe(rep, "forkbomb.py")
    assert bomb["failure"] == "EAGAIN"
    # tini, the app's python (sh exec'd it) and the probe count too
    assert 10 <= bomb["forked"] <= 24 - 3
    assert bomb["alive"] == bomb["forked"]
    hog = probe(rep, "memhog.py")
    assert hog["child_signal"] == signal.SIGKILL
    assert get(port) == "greedy.web.1\n"
    assert subprocess.run(["true"]).returncode == 0


def test_down_leaves_no_mount_cgroup_or_process(kernel: KernelProcess, public_dir: Path
                                                ) -> None:
    """`corral down` of two sandboxed apps restores mounts, corral cgroups and processes."""
    k = kernel
    before = (host_mounts(public_dir), corral_cgroups(k))
    dirs, tracked = [], []
    for name in ("first", "second"):
        d = probe_app(public_dir / name, name, free_port())
        res = up(k, d)
        tracked += instance_tree(instance_pid(res))
        dirs.append((name, res))
    assert host_mounts(public_dir) != before[0] and corral_cgroups(k) != before[1]
    assert app_processes(k, tracked)
    for name, _ in dirs:
        r = k.cli("down", name)
        assert r.returncode == 0, r.stderr
    assert host_mounts(public_dir) == before[0]
    assert corral_cgroups(k) == before[1] == set()  # the kernel's base went with its last group
    assert app_processes(k, tracked) == []
    assert not (k.runtime / "roots").exists()


def test_fs_driver_kill9_keeps_apps_serving_and_sync_readopts(
    kernel: KernelProcess, public_dir: Path
) -> None:
    """kill -9 of the fs driver: the app keeps serving; the driver comes back; its state.sync
    rebuilds a root lost meanwhile and collects a stale cgroup; `down` still cleans up."""
    k = kernel
    before = (host_mounts(public_dir), corral_cgroups(k))
    port = free_port()
    d = probe_app(public_dir / "steady", "steady", port)
    res = up(k, d)
    pid, iid = instance_pid(res), res["instances"][0]["id"]
    tracked = instance_tree(pid)
    root = k.runtime / "roots" / iid
    tree = detect(cgroup_base(k.runtime))
    old = fs_driver(k)
    os.kill(old["pid"], signal.SIGKILL)
    # while the driver is down: the host side of the instance's root vanishes, and a cgroup
    # of an instance nobody runs appears; the app must not notice either
    subprocess.run(["umount", "-R", "-l", str(root)], check=True)
    stale = "steady.web.99"
    tree.create(stale, Limits())
    assert get(port) == "steady.web.1\n"
    back = wait_for(lambda: (lambda d: d if d["state"] == "running" and d["pid"] != old["pid"]
                             else None)(fs_driver(k)))
    assert back["restarts"] >= 1
    wait_for(lambda: str(root) in mount_points() and not tree.exists(stale))
    assert get(port) == "steady.web.1\n"
    assert psutil.Process(pid).is_running()
    r = k.cli("down", "steady")
    assert r.returncode == 0, r.stderr
    assert host_mounts(public_dir) == before[0]
    assert corral_cgroups(k) == before[1]
    assert app_processes(k, tracked) == []


def test_kernel_kill9_leaves_the_sandboxed_app_serving(kernel: KernelProcess,
                                                       public_dir: Path) -> None:
    """kill -9 of the kernel: the app serves on, the fork server does not outlive its kernel,
    a new kernel adopts the app (same pid) and takes it down cleanly; a fork server killed
    with -9 is replaced by the next launch."""
    k = kernel
    before = (host_mounts(public_dir), corral_cgroups(k))
    port = free_port()
    d = probe_app(public_dir / "durable", "durable", port)
    res = up(k, d)
    pid = instance_pid(res)
    tracked = instance_tree(pid)
    assert k.proc is not None
    servers = fork_servers(k.proc.pid)
    assert len(servers) == 1
    k.kill9()
    wait_for(lambda: not servers[0].is_running()
             or servers[0].status() == psutil.STATUS_ZOMBIE)
    assert get(port) == "durable.web.1\n"
    k.start()
    wait_for(lambda: fs_driver(k)["state"] == "running")
    ps = json.loads(k.cli("ps", "--json").stdout)
    assert [i["pid"] for a in ps for i in a["instances"]] == [pid]
    assert get(port) == "durable.web.1\n"
    # the new kernel starts its own fork server on its first launch; kill -9 it, launch again
    other = probe_app(public_dir / "later", "later", free_port())
    up(k, other)
    assert k.proc is not None
    (server,) = fork_servers(k.proc.pid)
    server.kill()
    # a zombie until the kernel's next launch collects it
    wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE)
    third = probe_app(public_dir / "third", "third", free_port())
    up(k, third)
    assert [s.pid for s in fork_servers(k.proc.pid)] != [server.pid]
    for name in ("durable", "later", "third"):
        r = k.cli("down", name)
        assert r.returncode == 0, r.stderr
    assert host_mounts(public_dir) == before[0]
    assert corral_cgroups(k) == before[1]
    assert app_processes(k, tracked) == []


def test_notify_readiness_inside_the_sandbox(kernel: KernelProcess, public_dir: Path) -> None:
    """A portless process signals READY=1 on NOTIFY_SOCKET from inside its sandbox."""
    d = public_dir / "notifier"
    d.mkdir()
    (d / "w.py").write_text(
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "time.sleep(600)\n")
    (d / "corral.toml").write_text('[app]\nname = "notifier"\n[processes]\n'
                                   'work = { command = "python3 w.py", ready = "notify" }\n')
    for p in (d, d / "w.py", d / "corral.toml"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    r = kernel.cli("up", str(d), "--json", "--wait", "10")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["instances"][0]["state"] == "ready"
