"""Make manifest_support importable by the manifest tests (import-mode=importlib)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).parent))  # after tests/, whose conftest has require()
