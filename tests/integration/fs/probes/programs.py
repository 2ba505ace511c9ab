"""Real programs that must keep working under the system-call filter; prints JSON.

Run by the system python3 inside a sandboxed instance: Python (threads, subprocess, asyncio),
a shell pipeline, a C program compiled here with gcc (a build) using threads, fork/exec,
mmap and sockets, Node serving HTTP, and Java (its source launcher compiles in memory, then
threads, a child process and an HTTP exchange). Each entry is "ok" or what went wrong.
Environment: JOBS (comma-separated subset of the entries; all when unset).
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor

R: dict[str, str] = {}
WORK = tempfile.mkdtemp(prefix="programs-")  # the instance's private /tmp


def run(argv, timeout=120, **kw):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def python_threads():
    barrier = threading.Barrier(4, timeout=30)  # passes only with 4 threads alive at once

    def work(n):
        barrier.wait()
        return sum(i * i for i in range(n)), threading.get_ident()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, [20000] * 4))
    assert {total for total, _ in results} == {sum(i * i for i in range(20000))}
    assert len({ident for _, ident in results}) == 4


def python_subprocess():
    assert run([sys.executable, "-c", "print(6 * 7)"]).strip() == "42"
    # posix_spawn (clone3 -> ENOSYS -> clone) and the vfork path of subprocess
    pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
    assert os.waitpid(pid, 0)[1] == 0
    assert run(["/bin/echo", "hi"], close_fds=True).strip() == "hi"


def python_asyncio():
    async def main():
        async def echo(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        await writer.drain()
        line = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "print('child')", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        await asyncio.sleep(0.01)
        return line, out
    line, out = asyncio.run(main())
    assert line == b"PING\n" and out == b"child\n", (line, out)


def shell_pipeline():
    out = run(["/bin/sh", "-c", "seq 1 1000 | sort -rn | head -n 3 | tr '\\n' ' '; "
                                "x=$(echo sub | cat); echo \"$x\" > \"$0\"/f && cat \"$0\"/f",
               WORK])
    assert out == "1000 999 998 sub\n", repr(out)


C_SOURCE = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void *worker(void *arg) { *(long *)arg *= 2; return NULL; }

int main(void) {
    long values[4] = {1, 2, 3, 4};
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) pthread_create(&threads[i], NULL, worker, &values[i]);
    for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
    char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return 2;
    strcpy(page, "mapped");
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) return 3;
    pid_t child = fork();
    if (child == 0) {
        dup2(pair[1], 1);
        execl("/bin/echo", "echo", "from-child", (char *)NULL);
        _exit(127);
    }
    int status;
    waitpid(child, &status, 0);
    char buf[64] = {0};
    read(pair[0], buf, sizeof buf - 1);
    printf("%ld %s %s", values[0] + values[1] + values[2] + values[3], page, buf);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 4;
}
"""


def c_program():
    source = os.path.join(WORK, "prog.c")
    binary = os.path.join(WORK, "prog")
    with open(source, "w") as f:
        f.write(C_SOURCE)
    run(["gcc", "-O2", "-pthread", "-o", binary, source])
    assert run([binary]) == "20 mapped from-child\n"


NODE_SERVER = r"""
const http = require('http');
const server = http.createServer((req, res) => {
  res.end('node says ' + req.url);
});
server.listen(0, '127.0.0.1', () => { console.log(server.address().port); });
"""


def node_http():
    script = os.path.join(WORK, "server.js")
    with open(script, "w") as f:
        f.write(NODE_SERVER)
    proc = subprocess.Popen(["node", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node exited {proc.wait(10)}: {proc.stderr.read()[-2000:]}")
        port = int(line)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=10) as reply:
            body = reply.read().decode()
        assert body == "node says /hello", body
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "Error" not in err, err


JAVA_SOURCE = r"""
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.concurrent.Executors;
import java.util.stream.LongStream;

public class Probe {
    public static void main(String[] args) throws Exception {
        long sum = LongStream.range(0, 2_000_000).parallel().map(i -> i % 7).sum();
        Process child = new ProcessBuilder("/bin/echo", "child").start();
        String out = new String(child.getInputStream().readAllBytes()).trim();
        child.waitFor();
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        server.setExecutor(Executors.newFixedThreadPool(2));
        server.createContext("/", exchange -> {
            byte[] body = "java says hi".getBytes();
            exchange.sendResponseHeaders(200, body.length);
            try (OutputStream os = exchange.getResponseBody()) { os.write(body); }
        });
        server.start();
        int port = server.getAddress().getPort();
        HttpResponse<String> reply = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + port + "/")).build(),
            HttpResponse.BodyHandlers.ofString());
        server.stop(0);
        System.out.println(sum + " " + out + " " + reply.body());
        System.exit(0);
    }
}
"""


def java():
    source = os.path.join(WORK, "Probe.java")
    with open(source, "w") as f:
        f.write(JAVA_SOURCE)
    out = run(["java", "-Xmx256m", source], timeout=240)
    assert out.strip() == f"{sum(i % 7 for i in range(2_000_000))} child java says hi", out


JOBS = {"python_threads": python_threads, "python_subprocess": python_subprocess,
        "python_asyncio": python_asyncio, "shell_pipeline": shell_pipeline,
        "c_program": c_program, "node_http": node_http, "java": java}
wanted = [j for j in os.environ.get("JOBS", ",".join(JOBS)).split(",") if j]
for name in wanted:
    began = time.monotonic()
    try:
        JOBS[name]()
        R[name] = "ok"
    except Exception:
        R[name] = traceback.format_exc()[-3000:]
    R[name + "_seconds"] = f"{time.monotonic() - began:.1f}"
print(json.dumps(R))
