"""Traceback recognition and grouping on the real stderr of failing programs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from corral_log.tracebacks import Trace, TraceCollector


def traces_of(stderr: str, noise: bool = True) -> list[Trace]:
    """Run the collector over stderr, surrounded by ordinary log lines."""
    c = TraceCollector()
    lines = (["starting up", "INFO ready"] if noise else []) + stderr.splitlines()
    lines += ["INFO next request"] if noise else []
    out: list[Trace] = []
    for ln in lines:
        out += c.feed(ln)
    return out + c.flush()


def run_stderr(argv: list[str], cwd: Path) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout
    return p.stderr


PY = """
import sys
def parse(v):
    return int(v)
def handler(v):
    return parse(v)
if sys.argv[1] == "chain":
    try:
        handler(sys.argv[2])
    except ValueError as e:
        raise RuntimeError("wrapped " + sys.argv[2]) from e
elif sys.argv[1] == "key":
    {}[sys.argv[2]]
handler(sys.argv[2])
"""


def test_python_same_bug_groups_different_bug_does_not(tmp_path: Path) -> None:
    """Two ValueErrors with different messages share a fingerprint; a KeyError does not;
    a chained exception is one trace typed by its last exception."""
    (tmp_path / "app.py").write_text(PY)
    a = traces_of(run_stderr([sys.executable, "app.py", "plain", "abc"], tmp_path))
    b = traces_of(run_stderr([sys.executable, "app.py", "plain", "xyz-123"], tmp_path))
    k = traces_of(run_stderr([sys.executable, "app.py", "key", "nope"], tmp_path))
    ch = traces_of(run_stderr([sys.executable, "app.py", "chain", "q"], tmp_path))
    assert len(a) == len(b) == len(k) == len(ch) == 1
    assert a[0].language == "python" and a[0].type == "ValueError"
    assert "abc" in a[0].message and "xyz-123" in b[0].message
    assert a[0].fingerprint == b[0].fingerprint
    assert k[0].type == "KeyError" and k[0].fingerprint != a[0].fingerprint
    assert ch[0].type == "RuntimeError" and "During handling" not in ch[0].text
    assert "direct cause" in ch[0].text and ch[0].fingerprint != a[0].fingerprint
    assert any("parse" in f for f in a[0].frames)


def test_python_fingerprint_ignores_line_numbers(tmp_path: Path) -> None:
    """Moving the code down (new line numbers) keeps the fingerprint."""
    (tmp_path / "app.py").write_text(PY)
    a = traces_of(run_stderr([sys.executable, "app.py", "plain", "abc"], tmp_path))
    (tmp_path / "app.py").write_text("\n\n\n# moved\n" + PY)
    b = traces_of(run_stderr([sys.executable, "app.py", "plain", "abc"], tmp_path))
    assert a[0].text != b[0].text and a[0].fingerprint == b[0].fingerprint


NODE = """
function parse(v) { if (v.length > 2) { throw new TypeError("bad value " + v); } return v; }
function handler(v) { return parse(v); }
if (process.argv[2] === "range") { new Array(-1 - process.argv[3].length); }
handler(process.argv[3]);
"""


def test_node_errors(tmp_path: Path) -> None:
    """Node's uncaught errors are recognised; messages do not split groups, types do."""
    require(shutil.which("node") is not None, "needs node")
    (tmp_path / "app.js").write_text(NODE)
    a = traces_of(run_stderr(["node", "app.js", "plain", "abcd"], tmp_path))
    b = traces_of(run_stderr(["node", "app.js", "plain", "zzzzzz"], tmp_path))
    r = traces_of(run_stderr(["node", "app.js", "range", "x"], tmp_path))
    assert len(a) == len(b) == len(r) == 1
    assert a[0].language == "node" and a[0].type == "TypeError"
    assert a[0].fingerprint == b[0].fingerprint
    assert r[0].type == "RangeError" and r[0].fingerprint != a[0].fingerprint
    assert any(f.startswith("parse@") for f in a[0].frames)


JAVA = """
public class App {
    static int parse(String v) { return Integer.parseInt(v); }
    static int handler(String v) { return parse(v); }
    static void wrap(String v) {
        try { handler(v); }
        catch (NumberFormatException e) { throw new IllegalStateException("wrap " + v, e); }
    }
    public static void main(String[] a) {
        if (a[0].equals("wrap")) { wrap(a[1]); }
        if (a[0].equals("npe")) { String s = null; s.length(); }
        handler(a[1]);
    }
}
"""


def test_java_stack_traces(tmp_path: Path) -> None:
    """Java traces (with ``Caused by`` and ``... N more``) group by type and frames."""
    require(
        shutil.which("javac") is not None and shutil.which("java") is not None,
        "needs a JDK (javac, java)",
    )
    (tmp_path / "App.java").write_text(JAVA)
    subprocess.run(["javac", "App.java"], cwd=tmp_path, check=True, timeout=120)
    a = traces_of(run_stderr(["java", "-cp", ".", "App", "plain", "abc"], tmp_path))
    b = traces_of(run_stderr(["java", "-cp", ".", "App", "plain", "q9"], tmp_path))
    w = traces_of(run_stderr(["java", "-cp", ".", "App", "wrap", "zz"], tmp_path))
    n = traces_of(run_stderr(["java", "-cp", ".", "App", "npe", "x"], tmp_path))
    assert len(a) == len(b) == len(w) == len(n) == 1
    assert a[0].language == "java" and a[0].type == "java.lang.NumberFormatException"
    assert a[0].fingerprint == b[0].fingerprint
    assert w[0].type.startswith("java.lang.IllegalStateException <- ")
    assert "more" in w[0].text or "Caused by" in w[0].text
    assert n[0].type == "java.lang.NullPointerException"
    assert len({a[0].fingerprint, w[0].fingerprint, n[0].fingerprint}) == 3
    assert any(f == "App.parse" for f in a[0].frames)


GO = """package main

import "os"

func parse(v string) int { xs := []int{1, 2, 3}; return xs[len(v)] }
func handler(v string) int { return parse(v) }
func main() { handler(os.Args[1]) }
"""


def test_go_panics(tmp_path: Path) -> None:
    """Go panics (when a Go toolchain is present) group regardless of index values."""
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain on this host (Go is optional for this test)")
    (tmp_path / "main.go").write_text(GO)
    a = traces_of(run_stderr(["go", "run", "main.go", "abcd"], tmp_path))
    b = traces_of(run_stderr(["go", "run", "main.go", "abcdefg"], tmp_path))
    assert len(a) == len(b) == 1
    assert a[0].language == "go" and a[0].type.startswith("panic: runtime error: index out of")
    assert a[0].fingerprint == b[0].fingerprint


GO_SAMPLE = """panic: runtime error: index out of range [4] with length 3

goroutine 1 [running]:
main.parse(...)
\t/tmp/x/main.go:5
main.handler(...)
\t/tmp/x/main.go:6
main.main()
\t/tmp/x/main.go:7 +0x1d
exit status 2"""


def test_go_panic_format() -> None:
    """The Go panic format (as go1.2x prints it) is parsed into type and function frames."""
    t = traces_of(GO_SAMPLE)
    assert len(t) == 1
    assert t[0].type == "panic: runtime error: index out of range"
    assert t[0].frames == ["main.parse", "main.handler", "main.main"]
    other = traces_of(GO_SAMPLE.replace("[4] with length 3", "[9] with length 2"))
    assert other[0].fingerprint == t[0].fingerprint


def test_ordinary_lines_are_not_traces() -> None:
    """Lines that merely mention errors are not traces."""
    text = "Error: config missing\nValueError: something\njava.io.IOException: x\nok"
    assert traces_of(text) == []
