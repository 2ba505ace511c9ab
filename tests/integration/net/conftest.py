"""Fixtures of the net driver's real-network tests (the lab itself lives in netlab.py)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).parent))  # after tests/, whose conftest has require()

from netlab import host_service, lab

__all__ = ["host_service", "lab"]
