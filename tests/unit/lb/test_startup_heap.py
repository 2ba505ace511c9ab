"""The lb driver takes its startup heap out of the garbage collector's passes before serving."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_main_freezes_what_the_imports_made_before_it_runs_the_driver() -> None:
    """``main()`` collects, then freezes the objects alive at that moment (more than a
    thousand: the imports), before the driver runs; garbage cycles made before are
    collected, not frozen. In a child process: a frozen heap stays frozen."""
    code = textwrap.dedent("""
        import gc, weakref
        import corral_lb.driver as d

        class Cycle:
            pass

        c = Cycle(); c.me = c
        gone = weakref.ref(c)
        del c
        seen = {}
        d.run = lambda *a, **kw: seen.update(frozen=gc.get_freeze_count())
        assert gc.get_freeze_count() == 0
        d.main()
        assert seen["frozen"] > 1000, seen
        assert gone() is None, "a garbage cycle was frozen instead of collected"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
