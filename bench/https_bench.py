"""HTTPS benchmark: the lb's shared HTTPS frontend against HAProxy 2.6, in one run.

The corral side is the edge as the lb driver builds it (``corral_lb.edge.Edge`` on a
``Balancer``, TLS from a ``corral_lb.tls.SniRouter`` holding the certificate of
``bench.test``), in its own process on uvloop; one app with ``domains = ["bench.test"]``
whose backend is an nginx on loopback answering "ok\\n" (as in lb_bench.py). HAProxy 2.6 runs
one thread with the same ECDSA P-256 certificate and the same TLS policy (TLS 1.2 minimum,
Mozilla intermediate ciphers, the client's cipher order, X25519/P-256/P-384, ALPN http/1.1,
strict SNI) and does the same header work (drops a client's forwarding headers, adds
X-Forwarded-For/-Proto/-Host), reusing backend connections as corral does.

Contestants, interleaved round by round (the order rotates):
  https      HTTPS keep-alive: wrk -t1 -c50 --latency (req/s and p99).
  handshake  a new connection and a full TLS handshake per request: wrk -t1 -c50 with
             "Connection: close", and a preloaded shim that drops the client's TLS session
             before each handshake. Without it wrk (and h2load alike) keeps the session of
             the connection it closed and resumes it on the next: the script shows that
             once, and counts the resumed handshakes of every measured run on both servers
             (HAProxy's SSL stats, OpenSSL's session counters in corral), which must be 0.
  https-varied  HTTPS keep-alive as above, but a new path in every request: wrk's heads are
             otherwise byte-identical, and corral forwards a head that repeats the previous
             one on its connection without parsing it again; this is the goal's case with
             every head parsed, routed and rewritten, as real traffic has them.
  http       plain HTTP keep-alive through the same corral edge (its HTTP frontend), for
             context: wrk as above.
Each ratio is the median of the per-round ratios (both sides measured in the same round),
printed with its spread. Each run also records the server process's CPU time per request
(user and kernel) and the load generator's CPU: the client's side of a full handshake costs
more than the server's (it verifies the ECDSA signature), so on a 2-core machine one wrk
thread may run out of CPU before the server does, and a machine shared with other work
leaves neither a whole core; so every comparison is also printed per server CPU-second,
what each server would do with a whole core.

Then "what bounds it": more HTTPS runs with each server sampled by perf (CPU by shared
object: kernel, OpenSSL, interpreter, uvloop; syscalls per request), where perf works, and
corral by py-spy (by frame; from PATH, or installed from PyPI into a temporary venv); and
whether the kernel could take TLS records over (kTLS).

Needs root (apt-get for nginx-light haproxy wrk gcc when missing; perf). Prints one line per
ratio: `name: value (goal ...)`; exits non-zero only if it could not measure.
Usage: sudo .venv/bin/python bench/https_bench.py [--duration 3] [--rounds 4] [--no-profile]
       [--only https,handshake]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lb_bench import wait_port

from corral_lb.tls import GROUPS, INTERMEDIATE_CIPHERS

BACKEND, HA_HTTPS, HA_HTTP, PX_HTTPS, PX_HTTP = 18481, 18482, 18483, 18492, 18493
DOMAIN = "bench.test"
NEEDS = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "gcc": "gcc"}
# HAProxy gets corral's policy: Mozilla intermediate for TLS 1.2, OpenSSL's three TLS 1.3
# suites, and the groups corral uses with an OpenSSL before 3.5 (no post-quantum hybrid)
CIPHERS = INTERMEDIATE_CIPHERS
SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
CURVES = GROUPS[-1]
# wrk resolves the URL's host first; bench.test is in no resolver, so this resolve() sends
# it to loopback (the name stays the SNI and the Host header).
WRK_RESOLVE = ('wrk.resolve = function(host, service)\n'
               '  wrk.addrs = wrk.lookup("127.0.0.1", service)\nend\n')
# wrk sends one byte-identical head over and over, and corral forwards a head that repeats
# the previous one on its connection without parsing it again (proxy_http.py, _repeat): a new
# path per request makes it parse, route and rewrite every head, as real traffic does.
WRK_VARIED = WRK_RESOLVE + ('local n = 0\n'
                            'request = function()\n'
                            '  n = n + 1\n'
                            '  return wrk.format(nil, "/item/" .. n)\n'
                            'end\n')
CONTESTANTS = ("haproxy-https", "corral-https", "haproxy-handshake", "corral-handshake",
               "haproxy-https-varied", "corral-https-varied", "haproxy-http", "corral-http")
TICK = os.sysconf("SC_CLK_TCK")

# wrk and h2load keep the TLS session of a connection they close (SSL_shutdown, then
# SSL_clear, which keeps it) and resume it on the next connection: with "Connection: close"
# they measure resumptions, not handshakes. Preloaded, this starts every handshake without a
# session (the servers' counters check it: 0 resumed).
NO_RESUME_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *s, SSL_SESSION *session);
int SSL_in_before(const SSL *s);

static void forget(SSL *s) { if (SSL_in_before(s)) SSL_set_session(s, NULL); }

int SSL_connect(SSL *s) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    forget(s);
    return real(s);
}

int SSL_do_handshake(SSL *s) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_do_handshake");
    forget(s);
    return real(s);
}
"""


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in NEEDS.items() if shutil.which(tool) is None]
    if missing:
        print(f"installing {' '.join(missing)}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True,
                       stdout=subprocess.DEVNULL)


def make_certificate(d: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 leaf for bench.test (signed by a throwaway P-256 CA): cert, key, and
    both in one file for HAProxy."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = d / "cert.pem", d / "key.pem", d / "combined.pem"
    for path, data in zip(paths, (cert_pem, key_pem, cert_pem + key_pem), strict=True):
        path.write_bytes(data)
        path.chmod(0o600)
    return paths


def build_no_resume(d: Path) -> Path:
    """The preload library above, compiled (no OpenSSL headers needed)."""
    src, lib = d / "noresume.c", d / "noresume.so"
    src.write_text(NO_RESUME_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"],
                   check=True)
    return lib


# -- the corral side ------------------------------------------------------------------------

def serve_edge(cert: Path, key: Path) -> None:
    """--serve: corral's shared frontends (HTTPS on PX_HTTPS, HTTP on PX_HTTP) for one app
    with domains = [bench.test], backend the nginx. Answers each line on stdin with a JSON
    line: connections accepted and OpenSSL's session counters."""
    import logging

    import structlog
    import uvloop

    from corral_lb.balancer import Balancer
    from corral_lb.config import load_lb_config
    from corral_lb.driver import freeze_startup_heap
    from corral_lb.edge import Edge, EdgeSettings
    from corral_lb.tls import SniRouter, server_context

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    freeze_startup_heap()  # as the driver's main() does before it serves

    async def main() -> None:
        router = SniRouter()
        router.set([DOMAIN], server_context(cert.read_bytes(), key.read_bytes()))
        lb = Balancer()
        edge = lb.edge = Edge(EdgeSettings(address="127.0.0.1", http_port=PX_HTTP,
                                           https_port=PX_HTTPS),
                              challenge=lambda token: None, new_frontend=lb.http_frontend,
                              start_frontend=lb.start_frontend,
                              ssl_context=lambda: router.context)
        # redirect_https off: the plain HTTP frontend serves the app too (the context run)
        cfg = load_lb_config({"mode": "http", "domains": [DOMAIN], "redirect_https": False,
                              "tls": {"cert": str(cert), "key": str(key)}}, app="bench")
        await lb.attach("bench", cfg)
        edge.set_secure("bench", True)  # as the driver does once the certificate serves
        if not await lb.add_backend("bench", "nginx", "127.0.0.1", BACKEND, wait=5):
            raise SystemExit("the nginx backend never turned healthy")
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_stdin() -> None:
            if not sys.stdin.readline():
                done.set()
                return
            assert edge.https is not None and edge.http is not None
            # OpenSSL counts a resumption on the accepting context (its session cache), a
            # completed handshake on the context the SNI switched to (the domain's)
            contexts = [router.context, *{id(c): c for c in router.names.values()}.values()]
            stats = Counter[str]()
            for c in contexts:
                stats.update(c.session_stats())
            print(json.dumps({"https_accepted": edge.https.listener.accepted,
                              "http_accepted": edge.http.listener.accepted,
                              "handshakes": stats["accept_good"], "resumed": stats["hits"]}),
                  flush=True)

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        print("ready", flush=True)
        await done.wait()
        await lb.close()

    uvloop.run(main())


class Corral:
    """The --serve process, and its counters."""

    def __init__(self, cert: Path, key: Path) -> None:
        # A session of its own, as corrald starts every driver and as `haproxy -D` runs (see
        # lb_bench.py: with autogroup scheduling it would share wrk's CPU share otherwise).
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(cert), str(key)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the corral edge did not start ({line!r})")
        self.pid = self.proc.pid

    def counters(self) -> tuple[int, int]:
        """(TLS handshakes completed, of which resumed) on the HTTPS frontend so far."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        stats = json.loads(self.proc.stdout.readline())
        return stats["handshakes"], stats["resumed"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # a clean close
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the HAProxy side -----------------------------------------------------------------------

def haproxy_config(d: Path, combined: Path) -> str:
    headers = """  http-request del-header x-forwarded-for
  http-request del-header forwarded
  http-request set-header X-Forwarded-Proto {proto}
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  option forwardfor
  default_backend bk
"""
    return f"""
global
  maxconn 4000
  nbthread 1
  stats socket {d}/haproxy.sock level admin
  ssl-default-bind-ciphers {CIPHERS}
  ssl-default-bind-ciphersuites {SUITES}
  ssl-default-bind-curves {CURVES}
  ssl-default-bind-options prefer-client-ciphers ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend ft_https
  bind 127.0.0.1:{HA_HTTPS} ssl crt {combined} alpn http/1.1 strict-sni
{headers.format(proto="https")}
frontend ft_http
  bind 127.0.0.1:{HA_HTTP}
{headers.format(proto="http")}
backend bk
  http-reuse always
  server s1 127.0.0.1:{BACKEND}
"""


def haproxy_counters(sock_path: Path) -> tuple[int, int]:
    """(TLS handshakes completed, of which resumed) on ft_https, from HAProxy's SSL stats
    (ssl_sess counts the new sessions, ssl_reused_sess the resumed ones)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    names = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(names, line.split(","), strict=False))
        if row.get("pxname") == "ft_https" and row.get("svname") == "FRONTEND":
            new, reused = int(row["ssl_sess"] or 0), int(row["ssl_reused_sess"] or 0)
            return new + reused, reused
    raise RuntimeError("no ft_https line in HAProxy's stats")


def negotiated(port: int) -> str:
    """What a TLS client gets from the server on ``port``: version, suite, group, signature."""
    out = subprocess.run(["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}",
                          "-servername", DOMAIN, "-alpn", "http/1.1"],
                         input="", capture_output=True, text=True, timeout=10).stderr
    fields = dict(re.findall(r"^(Protocol version|Ciphersuite|Signature type|"
                             r"Server Temp Key|Peer Temp Key): (.*)$", out, re.M))
    return " ".join(v.split(",")[0] for v in fields.values()) or out.strip()[:120]


# -- load and its cost ----------------------------------------------------------------------

def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, duration: float, script: Path, *extra: str,
            env: dict[str, str] | None = None) -> tuple[float, float]:
    """(requests/s, p99 in ms) of wrk -t1 -c50 against url."""
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{duration:g}s", "--latency", "-s", str(script), *extra, url],
        capture_output=True, text=True, check=True, env=env).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert m, out
    if "Socket errors" in out or "Non-2xx" in out:
        print(f"  warning: errors from {url}:\n{out}", file=sys.stderr)
    return rps, _ms(m.group(1), m.group(2))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Run:
    rps: float
    latency: float  # p99, ms
    user_us: float  # server CPU per request
    kernel_us: float
    client: float  # load generator CPU, % of a core

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.kernel_us

    @property
    def cores(self) -> float:
        """Cores the server kept busy."""
        return self.rps * self.cpu_us / 1e6


# -- what bounds it -------------------------------------------------------------------------

def ktls_report() -> str:
    """Whether this kernel can take TLS records over (kTLS), and whether anything here would."""
    with contextlib.suppress(FileNotFoundError):  # a module: load it; built in or none: no-op
        subprocess.run(["modprobe", "tls"], capture_output=True, check=False)
    with socket.socket() as srv, socket.socket() as cli:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli.connect(srv.getsockname())
        try:
            cli.setsockopt(socket.IPPROTO_TCP, 31, b"tls")  # TCP_ULP: what kTLS starts with
            kernel = "yes"
        except OSError as e:
            kernel = f'no (setsockopt TCP_ULP "tls": {e.strerror})'
    notes = [f"kernel: {kernel}", "/proc/net/tls_stat "
             + ("present" if Path("/proc/net/tls_stat").exists() else "absent")]
    config = Path("/proc/config.gz")
    if config.exists():
        text = gzip.decompress(config.read_bytes()).decode(errors="replace")
        m = re.search(r"^(CONFIG_TLS=.|# CONFIG_TLS is not set)", text, re.M)
        if m:
            notes.append(m.group(1))
    notes.append(f"Python {sys.version.split()[0]}: ssl.OP_ENABLE_KTLS "
                 + ("present" if hasattr(ssl, "OP_ENABLE_KTLS") else "absent (3.12+)"))
    notes.append("and uvloop/asyncio drive OpenSSL through memory BIOs, which OpenSSL never "
                 "hands to the kernel; HAProxy 2.6 has no kTLS either")
    return "; ".join(notes)


class Background:
    """A load generator running while something samples the server; ``rps`` once it ended."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.cmd, self.env = cmd, env
        self.rps = 0.0

    def __enter__(self) -> Background:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=self.env)
        time.sleep(0.5)  # connections up, steady state
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        m = re.search(r"Requests/sec:\s+([\d.]+)", out or "")
        self.rps = float(m.group(1)) if m else 0.0


def dso_name(dso: str) -> str:
    for pattern, name in ((r"kernel", "kernel"), (r"libpython|python3", "libpython"),
                          (r"^loop\.cpython", "uvloop"), (r"^_ssl\.cpython", "_ssl module"),
                          (r"^parser\.cpython", "httptools"), (r"^libc\.", "libc")):
        if re.search(pattern, dso):
            return name
    return dso


def perf_profile(pid: int, seconds: float, d: Path, tag: str
                 ) -> tuple[str, str, float] | None:
    """(CPU samples by shared object, top symbols, syscalls/s) of the process over
    ``seconds``, or None where perf does not work."""
    if shutil.which("perf") is None:
        return None
    data = d / f"perf-{tag}.data"
    with subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                           str(pid), "--", "sleep", f"{seconds:g}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as stat:
        rec = subprocess.run(["perf", "record", "-q", "-F", "999", "-p", str(pid), "-o",
                              str(data), "--", "sleep", f"{seconds:g}"],
                             capture_output=True, text=True)
        counted = stat.communicate()[1]
    if rec.returncode != 0 or not data.exists():
        print(f"  note: perf record failed: {rec.stderr.strip()[:200]}", file=sys.stderr)
        return None
    m = re.search(r"^(\d+),", counted, re.M)
    syscalls = int(m.group(1)) / seconds if m else float("nan")
    by_dso = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                             "--sort", "dso"], capture_output=True, text=True).stdout
    shares = [(float(m.group(1)), dso_name(m.group(2).strip()))
              for m in re.finditer(r"^\s*([\d.]+)%\s+(\S.*)$", by_dso, re.M)]
    by_sym = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                             "--sort", "dso,sym"], capture_output=True, text=True).stdout
    syms = [(float(m.group(1)), f"{m.group(3).strip()} [{dso_name(m.group(2))}]")
            for m in re.finditer(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$", by_sym, re.M)]
    if not shares:
        return None
    return (", ".join(f"{name} {pct:.1f}%" for pct, name in shares[:8]),
            ", ".join(f"{sym} {pct:.1f}%" for pct, sym in syms[:10]), syscalls)


def py_spy(d: Path) -> str | None:
    """A py-spy binary: on PATH, or installed from PyPI into a temporary venv."""
    found = shutil.which("py-spy")
    if found:
        return found
    venv = d / "py-spy-venv"
    uv = shutil.which("uv")
    try:
        if uv:
            subprocess.run([uv, "venv", "-q", str(venv)], check=True, capture_output=True)
            subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin/python"),
                            "py-spy"], check=True, capture_output=True)
        else:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin/pip"), "install", "-q", "py-spy"], check=True,
                           capture_output=True)
    except subprocess.CalledProcessError as e:
        print(f"  note: could not install py-spy: {e.stderr!r:.200}", file=sys.stderr)
        return None
    binary = venv / "bin" / "py-spy"
    return str(binary) if binary.exists() else None


SYSCALLS = re.compile(r"^(read|write|writev|readv|send\w*|recv\w*|connect|accept4?|close|"
                      r"shutdown|setsockopt|getsockopt|getpeername|getsockname|epoll_ctl) \(libc")
# (marker in a frame, category): the first frame from the leaf up that has a marker decides
MARKERS = (("libcrypto", "OpenSSL (libssl/libcrypto)"), ("libssl", "OpenSSL (libssl/libcrypto)"),
           ("_ssl", "ssl module glue (ssl.py, _ssl, corral_lb/tls.py)"),
           ("(ssl.py", "ssl module glue (ssl.py, _ssl, corral_lb/tls.py)"),
           ("corral_lb/tls.py", "ssl module glue (ssl.py, _ssl, corral_lb/tls.py)"),
           ("corral_lb/", "proxy Python (corral_lb)"), ("httptools", "proxy Python (corral_lb)"),
           ("SSLProtocol", "uvloop SSLProtocol"), ("sslproto", "uvloop SSLProtocol"),
           ("(loop.c", "event loop (uvloop/libuv)"), ("uv__", "event loop (uvloop/libuv)"),
           ("uv_", "event loop (uvloop/libuv)"))


def categorize(frames: list[str]) -> str:
    """A py-spy sample's category, from its stack (root first)."""
    leaf = frames[-1] if frames else ""
    if leaf.startswith("epoll_pwait") or leaf.startswith("epoll_wait"):
        return "waiting in epoll_pwait"
    if SYSCALLS.match(leaf):
        return "in socket syscalls (kernel time)"
    for frame in reversed(frames):
        for marker, category in MARKERS:
            if marker in frame:
                return category
    return "other (interpreter, allocator)"


def py_spy_profile(binary: str, pid: int, seconds: float, d: Path
                   ) -> tuple[Counter[str], Counter[str], int] | None:
    """(samples by category, by innermost Python function, total) of the process."""
    out = d / "py-spy.txt"
    rec = subprocess.run([binary, "record", "--native", "-r", "250", "-d", f"{seconds:g}",
                          "-p", str(pid), "-f", "raw", "-o", str(out)],
                         capture_output=True, text=True)
    if rec.returncode != 0 or not out.exists():
        print(f"  note: py-spy failed: {rec.stderr.strip()[:300]}", file=sys.stderr)
        return None
    cats: Counter[str] = Counter()
    python: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        total += n
        cats[categorize(frames)] += n
        inner = next((f for f in reversed(frames) if ".py:" in f), "")
        if inner.startswith(("Runner.run ", "run ")):  # the loop's own C code, no callback
            inner = "(none: uvloop/libuv itself)"
        python[re.sub(r":\d+\)$", ")", inner)] += n
    return cats, python, total


def profile(pids: dict[str, int], dur: float, d: Path, resolve: Path, no_resume: Path
            ) -> list[str]:
    """Sample both servers under HTTPS keep-alive and new-handshake load (perf), and corral
    under both (py-spy). Lines for the report."""
    lines: list[str] = []
    no_resume_env = {**os.environ, "LD_PRELOAD": str(no_resume)}
    for tag, extra, env in (("HTTPS keep-alive", [], None),
                            ("new handshakes", ["-H", "Connection: close"], no_resume_env)):
        for side, port in (("corral", PX_HTTPS), ("haproxy", HA_HTTPS)):
            pid = pids[side]
            cmd = ["wrk", "-t1", "-c50", f"-d{dur + 1:g}s", "-s", str(resolve), *extra,
                   f"https://{DOMAIN}:{port}/"]
            with Background(cmd, env) as load:
                u0, k0 = cpu_split(pid)
                t0 = time.monotonic()
                result = perf_profile(pid, dur, d, f"{side}-{tag.split()[0].lower()}")
                wall = time.monotonic() - t0
                u1, k1 = cpu_split(pid)
            user, kernel = u1 - u0, k1 - k0
            line = (f"profile, {tag}, {side}: {load.rps:.0f} req/s, {(user + kernel) / wall:.0%}"
                    f" of a core, user {user / max(user + kernel, 1e-9):.0%} / kernel "
                    f"{kernel / max(user + kernel, 1e-9):.0%}")
            if result is None:
                lines.append(line + " (perf unavailable)")
                continue
            by_dso, top, syscalls = result
            lines.append(f"{line}, {syscalls / max(load.rps, 1):.1f} syscalls/req; perf, "
                         f"samples by shared object: {by_dso}")
            if side == "corral":
                lines.append(f"profile, {tag}, {side}: perf, top symbols: {top}")
    binary = py_spy(d)
    if binary is None:
        lines.append("profile (py-spy): not available")
        return lines
    for tag, extra, env in (("HTTPS keep-alive", [], None),
                            ("new handshakes", ["-H", "Connection: close"], no_resume_env)):
        with Background(["wrk", "-t1", "-c50", f"-d{dur + 1:g}s", "-s", str(resolve), *extra,
                         f"https://{DOMAIN}:{PX_HTTPS}/"], env):
            sampled = py_spy_profile(binary, pids["corral"], dur, d)
        if sampled is None:
            lines.append(f"profile (py-spy), {tag}: failed")
            continue
        cats, python, total = sampled
        lines.append(f"profile, {tag}, corral: py-spy --native, {total} samples, by what the "
                     "loop thread was doing: "
                     + ", ".join(f"{c} {n / total:.0%}" for c, n in cats.most_common()))
        lines.append(f"profile, {tag}, corral: py-spy, by innermost Python function (with the "
                     "C and syscalls under it): " + ", ".join(
                         f"{f} {n / total:.1%}" for f, n in python.most_common(10)))
    return lines


# -- the run --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-profile", action="store_true", help="skip the perf/py-spy runs")
    ap.add_argument("--only", default="", metavar="KINDS",
                    help="measure only these kinds (comma-separated: https, handshake, "
                         "https-varied, http); the others' lines are left out")
    ap.add_argument("--serve", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_edge(Path(args.serve[0]), Path(args.serve[1]))
        return 0
    if os.geteuid() != 0:
        print("https_bench: needs root (apt-get, perf)", file=sys.stderr)
        return 2
    ensure_tools()
    t_start = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="corral-https-bench-"))
    corral: Corral | None = None
    dur = args.duration
    kinds = {k.strip() for k in args.only.split(",") if k.strip()}
    contestants = tuple(n for n in CONTESTANTS if not kinds or n.split("-", 1)[1] in kinds)
    if not contestants:
        print(f"https_bench: --only {args.only!r} names no kind", file=sys.stderr)
        return 2
    runs: dict[str, list[Run]] = {n: [] for n in contestants}
    handshakes = {"haproxy-handshake": [0, 0], "corral-handshake": [0, 0]}
    wrk_close: dict[str, tuple[int, int]] = {}
    tls_seen: dict[str, str] = {}
    profile_lines: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cert, key, combined = make_certificate(d)
        resolve = d / "resolve.lua"
        resolve.write_text(WRK_RESOLVE)
        varied = d / "varied.lua"
        varied.write_text(WRK_VARIED)
        no_resume = build_no_resume(d)
        (d / "nginx.conf").write_text(f"""
worker_processes 1; pid {d}/nginx.pid; error_log {d}/ngerr.log; daemon on;
events {{ worker_connections 4096; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{BACKEND}; location / {{ return 200 "ok\\n"; }} }} }}
""")
        (d / "haproxy.cfg").write_text(haproxy_config(d, combined))
        subprocess.run(["nginx", "-c", str(d / "nginx.conf")], check=True)
        subprocess.run(["haproxy", "-D", "-p", str(d / "haproxy.pid"), "-f",
                        str(d / "haproxy.cfg")], check=True)
        corral = Corral(cert, key)
        for port in (BACKEND, HA_HTTPS, HA_HTTP, PX_HTTPS, PX_HTTP):
            wait_port(port)
        haproxy_pid = int((d / "haproxy.pid").read_text().split()[0])
        pids = {"haproxy": haproxy_pid, "corral": corral.pid}
        counters: dict[str, Callable[[], tuple[int, int]]] = {
            "haproxy": lambda: haproxy_counters(d / "haproxy.sock"),
            "corral": corral.counters}
        ports = {"haproxy-https": HA_HTTPS, "corral-https": PX_HTTPS,
                 "haproxy-handshake": HA_HTTPS, "corral-handshake": PX_HTTPS,
                 "haproxy-https-varied": HA_HTTPS, "corral-https-varied": PX_HTTPS,
                 "haproxy-http": HA_HTTP, "corral-http": PX_HTTP}
        tls_seen = {"haproxy": negotiated(HA_HTTPS), "corral": negotiated(PX_HTTPS)}

        def measure(name: str, seconds: float) -> tuple[float, float]:
            port = ports[name]
            if name.endswith("-http"):
                return run_wrk(f"http://{DOMAIN}:{port}/", seconds, resolve)
            url = f"https://{DOMAIN}:{port}/"
            if name.endswith("-https"):
                return run_wrk(url, seconds, resolve)
            if name.endswith("-varied"):
                return run_wrk(url, seconds, varied)
            # one full handshake, one request, a close, per request (wrk's latency runs
            # from the request's write to its response: the handshake is not in it)
            return run_wrk(url, seconds, resolve, "-H", "Connection: close",
                           env={**os.environ, "LD_PRELOAD": str(no_resume)})

        for name in contestants:  # warm up: first connections, caches, page faults
            measure(name, 1)
        for side in ("haproxy", "corral"):  # what plain wrk does with "Connection: close"
            port = HA_HTTPS if side == "haproxy" else PX_HTTPS
            before = counters[side]()
            run_wrk(f"https://{DOMAIN}:{port}/", 1, resolve, "-H", "Connection: close")
            after = counters[side]()
            wrk_close[side] = (after[0] - before[0], after[1] - before[1])

        for r in range(args.rounds):
            k = r % len(contestants)
            for name in contestants[k:] + contestants[:k]:
                side = name.split("-")[0]
                pid = pids[side]
                hs_before = counters[side]() if name.endswith("handshake") else (0, 0)
                (u0, k0), c0, t0 = cpu_split(pid), children_cpu(), time.monotonic()
                rps, lat = measure(name, dur)
                wall = time.monotonic() - t0
                (u1, k1), c1 = cpu_split(pid), children_cpu()
                n = rps * dur
                run = Run(rps, lat, (u1 - u0) * 1e6 / n, (k1 - k0) * 1e6 / n,
                          (c1 - c0) / wall * 100)
                runs[name].append(run)
                extra = ""
                if name.endswith("handshake"):
                    hs_after = counters[side]()
                    new, resumed = hs_after[0] - hs_before[0], hs_after[1] - hs_before[1]
                    handshakes[name][0] += new
                    handshakes[name][1] += resumed
                    extra = f"  {new} handshakes, {resumed} resumed"
                print(f"  round {r + 1} {name:20s} {rps:8.0f} req/s  p99 {lat:6.2f} ms  server "
                      f"{run.cpu_us:5.1f} us/req ({run.cores:.2f} core)  wrk {run.client:3.0f}%"
                      f"{extra}", file=sys.stderr)

        if not args.no_profile:
            profile_lines = profile(pids, min(dur, 2.0), d, resolve, no_resume)
    except KeyboardInterrupt:
        print("https_bench: interrupted", file=sys.stderr)
        return 1
    finally:
        if corral is not None:
            corral.stop()
        for pidfile in ("haproxy.pid", "nginx.pid"):
            p = d / pidfile
            if p.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(p.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(d, ignore_errors=True)

    def med(name: str, f: Callable[[Run], float]) -> float:
        return statistics.median(f(x) for x in runs[name])

    def ratio(a: str, b: str, f: Callable[[Run], float], label: str, goal: str) -> None:
        """Median of the per-round ratios f(a)/f(b), with its spread (nothing if not run)."""
        if a not in runs:
            return
        per_round = [f(x) / f(y) for x, y in zip(runs[a], runs[b], strict=True)]
        print(f"{label}: {statistics.median(per_round):.2f} (median of {len(per_round)} "
              f"rounds, min {min(per_round):.2f}, max {max(per_round):.2f}; goal {goal})")

    for name in contestants:
        p99 = "p99 after the handshake" if name.endswith("handshake") else "p99"
        print(f"{name}: median {med(name, lambda x: x.rps):.0f} req/s, {p99} "
              f"{med(name, lambda x: x.latency):.2f} ms; server CPU "
              f"{med(name, lambda x: x.cpu_us):.1f} us/req (user "
              f"{med(name, lambda x: x.user_us):.1f} + kernel "
              f"{med(name, lambda x: x.kernel_us):.1f}), {med(name, lambda x: x.cores):.2f} core "
              f"busy; wrk at {med(name, lambda x: x.client):.0f}% of a core "
              f"({len(runs[name])} rounds)")
    print(f"TLS negotiated: haproxy {tls_seen.get('haproxy')}; corral {tls_seen.get('corral')}")
    for name, (new, resumed) in handshakes.items():
        if name not in runs:
            continue
        print(f"{name}: {new} TLS handshakes counted by the server over the rounds, "
              f"{resumed} resumed")
    for side, (new, resumed) in wrk_close.items():
        print(f"(plain wrk -H 'Connection: close' against {side}, 1 s: {new} handshakes, "
              f"{resumed} of them resumed: why the handshake runs preload the no-resume shim)")
    per_cpu = "requests per server CPU-second"
    ratio("corral-https", "haproxy-https", lambda x: x.rps,
          "HTTPS keep-alive req/s, corral / HAProxy", ">= 0.8")
    ratio("corral-https", "haproxy-https", lambda x: x.latency,
          "HTTPS keep-alive p99, corral / HAProxy", "<= 1.2")
    ratio("corral-https", "haproxy-https", lambda x: 1 / x.cpu_us,
          f"HTTPS keep-alive {per_cpu}, corral / HAProxy", "none: context")
    ratio("corral-https-varied", "haproxy-https-varied", lambda x: x.rps,
          "HTTPS keep-alive req/s, a new path per request (every head parsed), corral / HAProxy",
          ">= 0.8")
    ratio("corral-https-varied", "haproxy-https-varied", lambda x: x.latency,
          "HTTPS keep-alive p99, a new path per request, corral / HAProxy", "<= 1.2")
    ratio("corral-https-varied", "haproxy-https-varied", lambda x: 1 / x.cpu_us,
          f"HTTPS keep-alive {per_cpu}, a new path per request, corral / HAProxy",
          "none: context")
    bound = ("; wrk was at >= 95% of a core: client-bound, see the CPU-second line"
             if "haproxy-handshake" in runs
             and med("haproxy-handshake", lambda x: x.client) >= 95 else "")
    ratio("corral-handshake", "haproxy-handshake", lambda x: x.rps,
          "new TLS handshakes/s (no resumption, 1 request each), corral / HAProxy",
          ">= 0.9" + bound)
    ratio("corral-handshake", "haproxy-handshake", lambda x: 1 / x.cpu_us,
          "new TLS handshakes (1 request each) per server CPU-second, corral / HAProxy",
          ">= 0.9 as capacity: what each server does with a whole core")
    ratio("corral-http", "haproxy-http", lambda x: x.rps,
          "plain HTTP keep-alive req/s through the edge, corral / HAProxy",
          "none: context (lb_bench's proxy-http goal is >= 0.8)")
    ratio("corral-http", "haproxy-http", lambda x: x.latency,
          "plain HTTP keep-alive p99 through the edge, corral / HAProxy",
          "none: context (lb_bench's is <= 1.2)")
    ratio("corral-http", "haproxy-http", lambda x: 1 / x.cpu_us,
          f"plain HTTP keep-alive {per_cpu} through the edge, corral / HAProxy",
          "none: context")
    for line in profile_lines:
        print(line)
    print(f"kTLS: {ktls_report()}")
    print(f"(took {time.monotonic() - t_start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
