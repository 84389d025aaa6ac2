#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite with real pw.x, plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
