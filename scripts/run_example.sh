#!/usr/bin/env bash
# Set up (idempotent) and run the factory on the bundled example structures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/qe-factory run examples/structures.extxyz -c examples/config.yaml -o results.extxyz "$@"
