#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite with real pw.x, plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests only: headless Chromium looks at the generated pages (tests/browser.py)
if ! command -v chromium >/dev/null 2>&1; then
    echo "test: installing chromium with apt (for the browser tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
# two workers (the CI machine's 2 cores); the SLURM tests stay together on one of them (tests/conftest.py)
.venv/bin/python -m pytest -q --numprocesses=2 --dist=loadgroup "$@"
