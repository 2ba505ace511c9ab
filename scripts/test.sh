#!/usr/bin/env bash
# The whole test suite: setup, lint, type check, tests (root tests run for real as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy kernel/src drivers/*/src
.venv/bin/lint-imports
.venv/bin/pytest -q "$@"
