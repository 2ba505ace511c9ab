"""The ``corral`` command line."""

from corral.cli._main import main

__all__ = ["main"]
