"""Fixtures for end-to-end tests: directories an unprivileged app uid can reach."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing import remove_tree


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory under /tmp with mode 0755 (pytest's tmp_path sits under a 0700 dir,
    which an app's dynamic uid cannot traverse)."""
    d = Path(tempfile.mkdtemp(prefix="corral-e2e-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    remove_tree(d)
