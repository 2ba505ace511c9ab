"""Release phase: print "release <VERSION> <CORRAL_RELEASE>" (and append it to $RELEASE_LOG
when set), then exit with $RELEASE_EXIT (default 0)."""

import os
import sys
from pathlib import Path

version = (Path(__file__).resolve().parent / "VERSION").read_text(encoding="utf-8").strip()
line = f"release {version} {os.environ.get('CORRAL_RELEASE', '?')}"
print(line, flush=True)
log = os.environ.get("RELEASE_LOG")
if log:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
sys.exit(int(os.environ.get("RELEASE_EXIT", "0")))
