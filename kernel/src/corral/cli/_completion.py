"""``corral completion bash|zsh|fish``: a completion script generated from the parser (shtab).

Install it as each shell expects, e.g. ``corral completion bash >
/etc/bash_completion.d/corral``, ``corral completion zsh > "${fpath[1]}/_corral"``,
``corral completion fish > ~/.config/fish/completions/corral.fish``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

SHELLS = ("bash", "zsh", "fish")


def add_parsers(sub: Any, parser: Callable[[], argparse.ArgumentParser]) -> None:
    """``corral completion SHELL``; ``parser`` builds the whole CLI's parser to describe."""
    s = sub.add_parser("completion", help="print a shell completion script (bash, zsh, fish)")
    s.add_argument("shell", choices=SHELLS)
    s.set_defaults(completion_parser=parser)


def cmd_completion(ns: argparse.Namespace) -> int:
    """Print the completion script for ``ns.shell``."""
    import shtab  # only this command needs it

    print(shtab.complete(ns.completion_parser(), shell=ns.shell), end="")
    return 0
