"""The relay's tests once more, against a build of _relay.c with AddressSanitizer and UBSan.

The relay is the one piece of C that handles bytes from the network; a use after free or an
overflow in it would not show in a passing test. This builds the extension with the
sanitizers into a copy of the package and runs tests/unit/lb/test_relay.py against it: any
memory or undefined-behaviour error aborts that run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import corral_lb

ROOT = Path(__file__).resolve().parents[3]
SOURCE = Path(corral_lb.__file__).parent


def runtime(lib: str) -> str:
    """Path of a sanitizer runtime as gcc knows it."""
    out = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert os.path.isabs(out), f"gcc has no {lib} (Debian: libasan8, libubsan1): {out}"
    return out


def test_relay_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    assert shutil.which("gcc"), "gcc is needed to build corral_lb._relay (scripts/setup.sh)"
    pkg = tmp_path / "corral_lb"
    shutil.copytree(SOURCE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    ext = pkg / f"_relay{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         f"-I{sysconfig.get_paths()['include']}", str(pkg / "_relay.c"), "-o", str(ext)],
        check=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",  # CPython itself "leaks" at exit
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
    probe = "import corral_lb._relay as r; print(r.__file__)"
    which = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, check=True)
    assert which.stdout.strip() == str(ext), which.stdout  # the sanitized build, not the usual
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/lb/test_relay.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "passed" in run.stdout and "failed" not in run.stdout
