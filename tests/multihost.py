"""Several corral hosts on one machine, for tests: network namespaces, a bridge, etcd.

ARCHITECTURE.md §9 asks for one harness that runs several hosts on one machine; this is it.
``multihost(n)`` (default 3) builds a ``Cluster`` of ``n`` test hosts ``h1``..``hn``, yields
it, and always takes all of it down afterwards::

    from multihost import multihost, require_multihost

    @pytest.mark.root
    def test_something() -> None:
        require_multihost()
        with multihost(3) as cluster:
            h1, h2 = cluster.host(1), cluster.host(2)   # 1-based, named h1, h2, ...
            h1.start_kernel()                            # corrald inside h1, on the etcd ledger
            print(h1.cli("hosts", "--json").stdout)      # the corral CLI inside h1
            h1.kill9()                                   # a crash: kernel and children, -9
            h2.cut()                                     # h2 partitioned off the bridge
            h2.heal()

**What each host has.** ``host(i)`` (a ``Host``) is:

- a network namespace ``crlmh<tag>-h<i>`` (``netns``; ``<tag>`` is 6 hex digits drawn for
  the run) with loopback up and ``eth0``, one end of a veth pair whose other end
  (``crlmh<tag>v<i>``) is a port of the run's bridge ``crlmh<tag>`` in the root namespace;
  ``eth0`` holds ``address``, ``10.A.B.<i>/24``, on a /24 drawn at random in 10.32-149.x
  (clear of corral's own pools, 10.231/16 and the 10.150-199 test pools, and of every route
  on the machine). The bridge holds ``10.A.B.254`` so that the test itself (in the root
  namespace) reaches the members, as an operator's machine would;
- its own mount namespace with a private tmpfs on ``/run`` (a host's processes see only
  their own ``/run``; ``run_dir`` is that /run seen from outside), a sysfs of its own on
  ``/sys`` with the machine's cgroup hierarchies under it, and its own UTS namespace
  (``hostname`` says ``h<i>``). A long-lived holder process (``sleep infinity``) keeps the
  namespaces; everything of the host runs through ``nsenter`` into its net, mount and UTS
  namespaces (``host.run(*argv)`` runs any command there);
- a directory ``<base>/h<i>`` (``dir``, mode 0755, base under /tmp) with the kernel's home,
  runtime dir (its bus socket), ``host.toml`` and ``corrald.log``, and ``etcd.log``;
- an etcd member named ``h<i>``, client ``http://<address>:2379`` and peer
  ``http://<address>:2380``, data in ``/dev/shm`` when it has room (else /tmp), heartbeat
  50 ms, election timeout 500 ms, periodic auto-compaction (1 h); the members form one
  cluster across the bridge (a token unique to the run);
- a kernel, when the test asks: ``start_kernel(extra_toml="")`` writes ``host.toml``
  (no drivers, ``unconfined``, ``ledger = "etcd://<own member>,<the others>"``,
  ``[host] name = "h<i>"``, ``address``, ``ttl_s`` = ``cluster.ttl_s``, 3 s by default;
  ``extra_toml`` goes before ``[host]``; ``keyed=True`` adds the cluster key, one per run,
  in ``<dir>/cluster.key``; ``drivers`` names the drivers it runs, none by default,
  ``DRIVERS`` for all five: with net and fs the host's apps are confined, in the host's
  own nftables, network namespaces and cgroups; ``labels`` are the host's
  ``[host] labels``), starts
  ``corrald --stop-drivers`` in the host's namespaces and waits until it answers
  ``kernel.status`` (``RuntimeError`` with its log when it exits, e.g. refused because
  another host is alive on the ledger). ``kernel`` is a
  ``corral.testing.KernelProcess``; ``cli(*argv)`` runs the corral CLI in the host's
  namespaces against it; ``call(op, args)`` speaks to it from the test process (its bus is a
  unix socket under ``dir``), e.g. ``ledger.claim``, which the CLI does not offer.

**Faults.** ``kill9()``: SIGKILL the kernel, every process it started (drivers, apps) and
anything else of corral in the host's network namespace and in its instances' (the
namespaces its net driver made; not the holder, not the member);
``stop_kernel()``: SIGTERM (drivers stopped too). ``stop_member()`` (SIGTERM),
``kill_member()`` (SIGKILL) and ``start_member()`` (with its data, state ``existing``).
``cut()``: an nftables table ``inet crlmh<tag>`` in the host's namespace drops every packet
in or out of ``eth0`` (the host is partitioned from the others and from the root namespace:
connections time out, nothing is refused); ``heal()`` deletes it. ``cluster.wait_healthy()``
waits until every running member of a host not cut answers ``/health`` (which needs a
leader); ``host.etcdctl(...)`` runs etcdctl inside the host against every member.

**Clean-up.** ``multihost()`` tears everything down in ``finally``, whatever happened, each
step on its own: kernels and their children (-9), members, every process left in each
namespace (instances' included), the hosts' cgroups, the nft tables, the namespaces, the
veths, the bridge, and the run's directories; then checks that no namespace or link of the
run is left (and raises if the test passed).
The bridge's alias records the owning pid and directories: a run killed before it could
clean up (SIGKILL of pytest) is swept by the next ``multihost()`` (``sweep_stale()``, also
``python tests/multihost.py sweep``), which removes what belongs to runs whose pid is gone.

``require_multihost()`` skips the test when it cannot run here (not root; ``ip``, ``nft``,
``nsenter``, ``unshare``, etcd missing), and fails it instead under ``CI=true``.
Used by ``tests/e2e/test_multihost.py``; docs/etcd.md ("Testing on several hosts").
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from corral.testing import KernelProcess
from etcdcluster import (
    ETCD,
    ETCDCTL,
    SHM,
    SHM_MIN_FREE,
    end_member,
    member_argv,
)

PREFIX = "crlmh"
"""Every netns, link and nft table of a run is named ``crlmh<tag>...``."""
ALIAS = "corral-multihost"
CLIENT_PORT = 2379
PEER_PORT = 2380
TTL_S = 3.0
IFACE = "eth0"
MARKER = "corral-multihost"
"""A file in each host's private /run holding the host's name."""
DRIVERS = ("net", "fs", "log", "lb", "cron")


def bare(drivers: Sequence[str] = (), *, confined: bool = False) -> str:
    """host.toml's start: every driver disabled but ``drivers``; ``unconfined`` unless
    ``confined`` (which needs the net and fs drivers)."""
    off = ", ".join(f'"{d}"' for d in DRIVERS if d not in drivers)
    return f"disabled = [{off}]\n" + ("" if confined else "unconfined = true\n")

AVOID = tuple(ipaddress.IPv4Network(n) for n in ("10.231.0.0/16", "10.150.0.0/15",
                                                 "10.152.0.0/13", "10.160.0.0/11",
                                                 "10.192.0.0/13"))
"""corral's default pool and the 10.150-199 pools of corral.testing.new_net_host (the draw
is in 10.32-149 anyway)."""
TOOLS = ("ip", "nft", "nsenter", "unshare")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ENV_ECHO = Path(__file__).resolve().parent / "apps" / "env-echo" / "server.py"


def env_echo_toml(name: str, *, port: int = 8080, frontend: int = 8081, instances: int = 1,
                  extra: str = "") -> str:
    """corral.toml of an env-echo app ``name``: its ``web`` process on ``port`` behind the
    lb name ``<name>.corral.test`` on ``frontend``; ``extra`` ends the ``[lb]`` section (or
    adds sections)."""
    return (f'[app]\nname = "{name}"\n[processes]\nweb = {{ command = "python3 server.py '
            f'{port}", instances = {instances}, port = "http" }}\n[ports]\nhttp = {port}\n'
            f'[lb]\nname = "{name}.corral.test"\nfrontend = {frontend}\n{extra}')


def require_multihost() -> None:
    """Skip the running test when this machine cannot build hosts; under CI=true, fail it."""
    import pytest

    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    why = ""
    if os.geteuid() != 0:
        why = "needs root (network namespaces, a bridge, nftables, mounts)"
    elif missing:
        why = f"needs {', '.join(missing)} (apt-get install iproute2 nftables util-linux " \
              "etcd-server etcd-client)"
    if not why:
        return
    if IN_CI:
        pytest.fail(f"cannot run under CI=true: {why}", pytrace=False)
    pytest.skip(why)


# -- small helpers -------------------------------------------------------------------------------

def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[:500]}")
    return res


def _netns_names() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    try:
        return [str(e["name"]) for e in json.loads(out or "[]")]
    except (ValueError, KeyError, TypeError):
        return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[dict[str, Any]]:
    out = _run(["ip", "-j", "link", "show"], check=False).stdout
    try:
        return list(json.loads(out or "[]"))
    except ValueError:
        return []


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _netns_inode(path: Path | str) -> int | None:
    """The inode of the network namespace a ``/run/netns`` file (or ``/proc/PID/ns/net``)
    is, or None."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in(inodes: set[int]) -> list[int]:
    """Every process whose network namespace is one of ``inodes``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _netns_inode(f"/proc/{entry.name}/ns/net") in inodes:
            out.append(int(entry.name))
    return out


def _kill_netns_processes(netns: str, keep: Sequence[int] = (), timeout: float = 5.0,
                          also: Sequence[Path] = ()) -> None:
    """SIGKILL every process in ``netns`` (and in the namespaces of ``also``: netns files,
    e.g. a test host's instances') except ``keep``; wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        inodes = {i for i in (_netns_inode(p) for p in also) if i is not None}
        pids = [p for p in [*_netns_pids(netns), *_pids_in(inodes)] if p not in keep]
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in netns {netns} survive SIGKILL")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it only waits to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _pick_network() -> ipaddress.IPv4Network:
    """A random 10.A.B.0/24 that meets no route or address of the machine and none of AVOID."""
    taken: list[ipaddress.IPv4Network] = list(AVOID)
    out = _run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout
    with contextlib.suppress(ValueError):
        for route in json.loads(out or "[]"):
            dst = str(route.get("dst", ""))
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    taken.append(ipaddress.IPv4Network(dst, strict=False))
    out = _run(["ip", "-j", "-4", "addr", "show"], check=False).stdout
    with contextlib.suppress(ValueError):
        for link in json.loads(out or "[]"):
            for addr in link.get("addr_info", []):
                with contextlib.suppress(ValueError, KeyError):
                    taken.append(ipaddress.IPv4Network(
                        f"{addr['local']}/{addr['prefixlen']}", strict=False))
    draw = secrets.SystemRandom()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{draw.randint(32, 149)}.{draw.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 found for the test hosts")


def _data_parent() -> str | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(SHM)
        if os.access(SHM, os.W_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE:
            return str(SHM)
    return None


def _no_proxy(env: dict[str, str]) -> dict[str, str]:
    """``env`` without HTTP proxies: the hosts reach etcd directly, never through a proxy."""
    return {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- one host ------------------------------------------------------------------------------------

class HostKernel(KernelProcess):
    """A ``KernelProcess`` whose corrald and CLI run inside a test host's namespaces."""

    def __init__(self, host: Host) -> None:
        super().__init__(host.dir)
        self.host = host
        self.env = _no_proxy(self.env)

    def start(self, timeout: float = 20.0, *, stop_drivers: bool = True) -> HostKernel:
        """Start corrald in the host and wait until it answers ``kernel.status``; raise
        RuntimeError with its log when it exits first or does not answer in ``timeout``."""
        from corral.errors import CorralError

        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.host.name}: its kernel is already running")
        args = [sys.executable, "-m", "corral.daemon", *(["--stop-drivers"] if stop_drivers
                                                          else [])]
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.host.enter(args), env=self.env, stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.host.name}: corrald exited {self.proc.returncode}: "
                                   f"{self.log()}")
            try:
                self.call("kernel.status", timeout=1.0)
                return self
            except CorralError:
                time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"{self.host.name}: corrald did not become ready: {self.log()}")

    def cli(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``corral`` CLI inside the host against this kernel."""
        return subprocess.run(self.host.enter([sys.executable, "-m", "corral.cli", *argv]),
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def kill9(self) -> None:
        """SIGKILL the kernel, every process below it, and whatever else of corral runs in
        the host's network namespace (the holder and the etcd member excepted)."""
        proc = self.proc
        if proc is None:
            return
        below: list[psutil.Process] = []
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                below = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        for child in below:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.wait(10)
        psutil.wait_procs(below, timeout=5)
        _kill_netns_processes(self.host.netns, keep=self.host.spared(),
                              also=self.host.instance_netns())


class Host:
    """One test host of a ``Cluster`` (see the module's docstring)."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"h{index}"
        self.address = str(cluster.network.network_address + index)
        self.netns = f"{PREFIX}{cluster.tag}-{self.name}"
        self.veth = f"{PREFIX}{cluster.tag}v{index}"
        self.dir = cluster.base / self.name
        self.dir.mkdir(mode=0o755)
        self.dir.chmod(0o755)
        self.data = cluster.data / f"{self.name}.etcd"
        self.holder: subprocess.Popen[bytes] | None = None
        self.member: subprocess.Popen[bytes] | None = None
        self.is_cut = False
        self.kernel = HostKernel(self)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} netns={self.netns}>"

    # -- namespaces ------------------------------------------------------------------------------

    def _create(self) -> None:
        """The netns, its veth to the bridge, its address, and the holder of its mount and
        UTS namespaces (a private tmpfs on /run, hostname h<i>)."""
        c = self.cluster
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", IFACE,
              "netns", self.netns])
        _run(["ip", "link", "set", self.veth, "master", c.bridge, "up"])
        _run(["ip", "-n", self.netns, "addr", "add", f"{self.address}/{c.network.prefixlen}",
              "dev", IFACE])
        _run(["ip", "-n", self.netns, "link", "set", IFACE, "up"])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        # A sysfs of the host's own netns on /sys (as ``ip netns exec`` gives), with the
        # machine's cgroup hierarchies moved back under it: the fs driver confines the
        # host's instances in cgroups (under a base named after the kernel's runtime dir,
        # so hosts never share one).
        script = ('mount -t tmpfs -o mode=0755,size=64m "$1" /run && mkdir /run/.cgroup && '
                  'mount --rbind /sys/fs/cgroup /run/.cgroup && '
                  'mount -t sysfs "$1-sys" /sys && mount --move /run/.cgroup /sys/fs/cgroup && '
                  'rmdir /run/.cgroup 2>/dev/null; hostname "$2" && '
                  f'printf %s "$2" > /run/{MARKER} && exec sleep infinity')
        self.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts",
             "--propagation", "private", "--", "sh", "-c", script, "sh",
             f"{self.netns}-run", self.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while not (self.run_dir / MARKER).exists():
            if self.holder.poll() is not None:
                err = self.holder.stderr.read().decode() if self.holder.stderr else ""
                raise RuntimeError(f"{self.name}: namespace holder exited: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: namespace holder not ready in 10 s")
            time.sleep(0.02)

    @property
    def run_dir(self) -> Path:
        """The host's private /run, seen from the root mount namespace."""
        pid = self.holder.pid if self.holder is not None else 0
        return Path(f"/proc/{pid}/root/run")

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's network, mount and UTS namespaces."""
        if self.holder is None or self.holder.poll() is not None:
            raise RuntimeError(f"{self.name}: its namespaces are gone")
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "-u", "-F",
                "-W", str(self.dir), "--", *argv]

    def run(self, *argv: str, input: str | None = None, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host (its output captured; the caller checks it)."""
        return subprocess.run(self.enter(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False, env=_no_proxy(dict(os.environ)))

    def instance_netns(self) -> list[Path]:
        """The network namespaces the host's net driver made for its instances (their files
        in the host's own /run/netns): a host's loss kills its instances too, wherever
        they run."""
        d = self.run_dir / "netns"
        try:
            return sorted(d.iterdir())
        except OSError:
            return []

    def spared(self) -> list[int]:
        """The host's own processes that a kill of its kernel leaves: holder and member."""
        return [p.pid for p in (self.holder, self.member) if p is not None]

    # -- kernel ----------------------------------------------------------------------------------

    def host_toml(self, extra_toml: str = "", *, keyed: bool = False,
                  drivers: Sequence[str] = (), labels: Sequence[str] = ()) -> str:
        """This host's host.toml: no drivers (but ``drivers``), the etcd ledger, ``[host]``
        (with ``keyed``, the cluster's key: releases copied between hosts, lost hosts' apps
        re-placed)."""
        extra = extra_toml if not extra_toml or extra_toml.endswith("\n") else extra_toml + "\n"
        key = f'cluster_key = "{self.key_file()}"\n' if keyed else ""
        if labels:
            key += f"labels = {json.dumps(list(labels))}\n"
        return (bare(drivers, confined="net" in drivers and "fs" in drivers)
                + f'ledger = "{self.cluster.url_from(self.index)}"\n' + extra
                + f'\n[host]\nname = "{self.name}"\naddress = "{self.address}"\n'
                f"ttl_s = {self.cluster.ttl_s}\n" + key)

    def key_file(self) -> Path:
        """``<dir>/cluster.key`` (0600): the cluster's key, the same on every host."""
        path = self.dir / "cluster.key"
        if not path.exists():
            path.write_text(self.cluster.key)
            path.chmod(0o600)
        return path

    def start_kernel(self, extra_toml: str = "", *, keyed: bool = False,
                     drivers: Sequence[str] = (), labels: Sequence[str] = (),
                     timeout: float = 20.0) -> HostKernel:
        """Write host.toml and start this host's kernel; wait until it answers."""
        self.kernel.config.write_text(self.host_toml(extra_toml, keyed=keyed, drivers=drivers,
                                                     labels=labels))
        return self.kernel.start(timeout)

    def stop_kernel(self) -> None:
        """Stop the kernel cleanly (SIGTERM; it stops its drivers and revokes its lease)."""
        self.kernel.stop()

    def kill9(self) -> None:
        """SIGKILL the kernel and every driver or other process of it (a crash)."""
        self.kernel.kill9()

    def cli(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """The corral CLI inside this host against its kernel."""
        return self.kernel.cli(*argv, timeout=timeout)

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0
             ) -> dict[str, Any]:
        """One request to this host's kernel (from the test process, over its unix socket)."""
        return self.kernel.call(op, args, timeout=timeout)

    # -- etcd member -----------------------------------------------------------------------------

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{PEER_PORT}"

    @property
    def member_log_path(self) -> Path:
        return self.dir / "etcd.log"

    def start_member(self, state: str = "existing") -> None:
        """Start this host's etcd member (``existing``: back with its data)."""
        if self.member_running():
            raise RuntimeError(f"{self.name}: its etcd member is already running")
        c = self.cluster
        argv = member_argv(ETCD, self.name, self.data, self.client_url, self.peer_url,
                           ",".join(f"{h.name}={h.peer_url}" for h in c.hosts), state,
                           f"corral-mh-{c.tag}")
        with open(self.member_log_path, "ab") as log:
            self.member = subprocess.Popen(self.enter(argv), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def stop_member(self, timeout: float = 10.0) -> None:
        """Stop the member cleanly (SIGTERM, then SIGKILL after ``timeout``)."""
        self._end_member(signal.SIGTERM, timeout)

    def kill_member(self) -> None:
        """SIGKILL the member, as a crash would."""
        self._end_member(signal.SIGKILL, 10.0)

    def _end_member(self, sig: signal.Signals, timeout: float) -> None:
        end_member(self.member, sig, timeout)
        self.member = None

    def member_running(self) -> bool:
        """Whether the member's process is alive (not whether it is healthy)."""
        return self.member is not None and self.member.poll() is None

    def member_healthy(self, timeout: float = 1.0) -> bool:
        """Whether the member answers ``/health`` true (from the root namespace, across the
        bridge: a member of a cut host never does)."""
        try:
            with _DIRECT.open(self.client_url + "/health", timeout=timeout) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return bool(body.get("health") == "true")

    def member_log(self, tail: int = 4000) -> str:
        try:
            return self.member_log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def etcdctl(self, *args: str, endpoints: Sequence[Host] | None = None,
                command_timeout: float = 5.0, timeout: float = 30.0
                ) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` (v3) inside this host against ``endpoints`` (default: every member);
        the caller checks ``returncode``."""
        targets = self.cluster.hosts if endpoints is None else endpoints
        env = {**_no_proxy(dict(os.environ)), "ETCDCTL_API": "3"}
        argv = [ETCDCTL, "--endpoints", ",".join(h.client_url for h in targets),
                "--dial-timeout", "1s", "--command-timeout", f"{command_timeout:g}s", *args]
        return subprocess.run(self.enter(argv), capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)

    # -- partition -------------------------------------------------------------------------------

    def cut(self) -> None:
        """Partition the host: drop every packet in or out of its bridge side (eth0)."""
        if self.is_cut:
            return
        table = self.cluster.table
        rules = (f"table inet {table} {{\n"
                 f"  chain input {{ type filter hook input priority -300; policy accept; "
                 f'iifname "{IFACE}" drop; }}\n'
                 f"  chain output {{ type filter hook output priority -300; policy accept; "
                 f'oifname "{IFACE}" drop; }}\n'
                 "}\n")
        _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=rules)
        self.is_cut = True

    def heal(self) -> None:
        """Undo ``cut()``."""
        if not self.is_cut:
            return
        _run(["ip", "netns", "exec", self.netns, "nft", "delete", "table", "inet",
              self.cluster.table])
        self.is_cut = False

    # -- teardown --------------------------------------------------------------------------------

    def _teardown(self, problems: list[str]) -> None:
        def step(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                problems.append(f"{self.name}: {what}: {exc}")

        step("kill the kernel", self.kernel.kill9)
        step("kill the member", self.kill_member)
        if self.is_cut:
            step("heal", self.heal)
        step("kill what is left", lambda: _kill_netns_processes(
            self.netns, also=self.instance_netns()))
        step("remove the cgroups", self._remove_cgroups)
        if self.holder is not None:
            step("reap the holder", self._reap_holder)
        if _link_exists(self.veth):  # both ends go at once (a netns is deleted lazily)
            step("delete the veth", _run, ["ip", "link", "del", self.veth])
        if self.netns in _netns_names():
            step("delete the netns", _run, ["ip", "netns", "del", self.netns])

    def _remove_cgroups(self) -> None:
        """The cgroups the host's fs driver made for its instances (under a base named
        after its kernel's runtime dir), their processes killed first."""
        from corral_fs._cgroups import detect
        from corral_fs.sandbox import cgroup_base

        try:
            tree = detect(cgroup_base(self.kernel.runtime))
        except RuntimeError:
            return  # no cgroup hierarchy here: nothing was made
        for name in sorted(tree.names()):
            tree.remove(name)
        tree.release_base()

    def _reap_holder(self) -> None:
        holder = self.holder
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
            holder.wait(10)
            if holder.stderr is not None:
                holder.stderr.close()


# -- the cluster ---------------------------------------------------------------------------------

class Cluster:
    """``n`` test hosts joined by a bridge, one etcd member each (see the module docstring).

    ``build()`` makes everything; ``close()`` takes it all down and returns what it could not
    remove. Use ``multihost()``, which does both.
    """

    def __init__(self, n: int = 3, *, ttl_s: float = TTL_S) -> None:
        if not 1 <= n <= 99:
            raise ValueError(f"a test cluster has 1 to 99 hosts, got {n}")
        self.n = n
        self.ttl_s = ttl_s
        self.tag = secrets.token_hex(3)
        from corral.replication import new_cluster_key

        self.key = new_cluster_key()
        self.bridge = f"{PREFIX}{self.tag}"
        self.table = f"{PREFIX}{self.tag}"
        self.network = _pick_network()
        self.gateway = str(self.network.network_address + 254)
        self.base = Path(tempfile.mkdtemp(prefix=f"corral-mh-{self.tag}-", dir="/tmp"))
        self.base.chmod(0o755)
        self.data = Path(tempfile.mkdtemp(prefix=f"corral-mh-{self.tag}-etcd-",
                                          dir=_data_parent()))
        self.hosts = [Host(self, i) for i in range(1, n + 1)]

    def env_echo_app(self, directory: str, corral_toml: str) -> Path:
        """An app directory ``<base>/<directory>`` (0755; files 0644, readable by an app's
        uid) with ``corral_toml`` and the env-echo server (tests/apps/env-echo: ``python3
        server.py PORT`` answers "$APP $TOKEN" and its instance in X-Instance); made again
        (the toml rewritten) when it exists."""
        d = self.base / directory
        d.mkdir(mode=0o755, exist_ok=True)
        d.chmod(0o755)
        (d / "corral.toml").write_text(corral_toml)
        (d / "server.py").write_text(ENV_ECHO.read_text())
        for f in d.iterdir():
            f.chmod(0o644)
        return d

    def host(self, i: int) -> Host:
        """Host ``h<i>`` (1-based)."""
        if not 1 <= i <= self.n:
            raise IndexError(f"no host h{i} in a cluster of {self.n}")
        return self.hosts[i - 1]

    @property
    def url(self) -> str:
        """The ledger URL naming every member: ``etcd://A1:2379,A2:2379,...``."""
        return self.url_from(1)

    def url_from(self, first: int) -> str:
        """The ledger URL listing host ``first``'s member first, then the others in a ring."""
        order = [self.hosts[(first - 1 + k) % self.n] for k in range(self.n)]
        return "etcd://" + ",".join(f"{h.address}:{CLIENT_PORT}" for h in order)

    def build(self, timeout: float = 30.0) -> Cluster:
        """The bridge, every host, every member; return when all members are healthy."""
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", "dev", self.bridge, "alias",
              f"{ALIAS} pid={os.getpid()} base={self.base} data={self.data}"])
        _run(["ip", "addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev",
              self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for h in self.hosts:
            h._create()
        for h in self.hosts:
            h.start_member("new")
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0, hosts: Sequence[Host] | None = None) -> None:
        """Wait until the members of ``hosts`` (default: every running member of a host not
        cut) answer healthy; raise with their logs after ``timeout`` seconds, or at once when a
        member's process died."""
        deadline = time.monotonic() + timeout
        while True:
            wanted = list(hosts) if hosts is not None else [
                h for h in self.hosts if h.member_running() and not h.is_cut]
            for h in wanted:
                if h.member is None or h.member.poll() is not None:
                    code = None if h.member is None else h.member.returncode
                    raise RuntimeError(f"{h.name}: etcd member is not running ({code}):\n"
                                       f"{h.member_log()}")
            sick = [h for h in wanted if not h.member_healthy()]
            if not sick:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {h.name} ---\n{h.member_log(1500)}" for h in sick)
                raise RuntimeError(f"etcd members {[h.name for h in sick]} not healthy after "
                                   f"{timeout} s:\n{logs}")
            time.sleep(0.05)

    def close(self) -> list[str]:
        """Take everything down (each step attempted whatever failed before); return what
        could not be done or is still there."""
        problems: list[str] = []
        for h in self.hosts:
            h._teardown(problems)
        if _link_exists(self.bridge):
            try:
                _run(["ip", "link", "del", self.bridge])
            except Exception as exc:
                problems.append(f"delete the bridge: {exc}")
        for path in (self.base, self.data):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"{path} is left")
        deadline = time.monotonic() + 5  # the kernel dismantles a namespace in the background
        while (left := _leftovers(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return problems + left

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _leftovers(tag: str) -> list[str]:
    """Namespaces and links of run ``tag`` still on the machine."""
    mine = f"{PREFIX}{tag}"
    left = [f"netns {n}" for n in _netns_names() if n.startswith(mine)]
    left += [f"link {link.get('ifname')}" for link in _links()
             if str(link.get("ifname", "")).startswith(mine)]
    return left


def sweep_stale() -> list[str]:
    """Remove what runs that died without cleaning up left (their owner pid is gone, or
    their bridge is: a namespace of a run outlives its bridge only when the run was killed);
    return what was removed."""
    removed: list[str] = []
    owners: dict[str, str] = {}  # tag -> alias
    for link in _links():
        name = str(link.get("ifname", ""))
        if name.startswith(PREFIX) and len(name) == len(PREFIX) + 6:
            owners[name[len(PREFIX):]] = str(link.get("ifalias", ""))
    stale: set[str] = set()
    for tag, alias in owners.items():
        pid = next((w[4:] for w in alias.split() if w.startswith("pid=")), "")
        if alias.startswith(ALIAS) and pid.isdigit() and not _alive(int(pid)):
            stale.add(tag)  # (no alias yet: a run between creating its bridge and naming it)
    for ns in _netns_names():
        if ns.startswith(PREFIX):
            tag = ns[len(PREFIX):].split("-")[0]
            if tag not in owners:
                stale.add(tag)
    for tag in sorted(stale):
        mine = f"{PREFIX}{tag}"
        for ns in _netns_names():
            if ns.startswith(mine + "-"):
                with contextlib.suppress(Exception):
                    _kill_netns_processes(ns)
                _run(["ip", "netns", "del", ns], check=False)
                removed.append(f"netns {ns}")
        links = sorted((str(link.get("ifname", "")) for link in _links()
                        if str(link.get("ifname", "")).startswith(mine)),
                       key=lambda n: n == mine)  # the bridge last
        for name in links:
            _run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
        for word in owners.get(tag, "").split():
            key, _, path = word.partition("=")
            if key in ("base", "data") and Path(path).name.startswith(f"corral-mh-{tag}-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def multihost(n: int = 3, *, ttl_s: float = TTL_S, timeout: float = 30.0) -> Iterator[Cluster]:
    """A new cluster of ``n`` test hosts with healthy etcd members (no kernel yet) for the
    block; everything taken down afterwards, whatever happened (see the module docstring)."""
    swept = sweep_stale()
    if swept:
        print(f"multihost: removed leftovers of dead runs: {', '.join(swept)}")
    cluster: Cluster | None = None
    ok = False
    try:
        cluster = Cluster(n, ttl_s=ttl_s)
        cluster.build(timeout)
        yield cluster
        ok = True
    finally:
        problems = cluster.close() if cluster is not None else []
        if problems:
            text = "multihost teardown left: " + "; ".join(problems)
            if ok:
                raise RuntimeError(text)
            print(text, file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["sweep"]:
        print("\n".join(sweep_stale()) or "nothing to sweep")
    else:
        print("usage: python tests/multihost.py sweep", file=sys.stderr)
        raise SystemExit(2)
