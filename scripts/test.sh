#!/usr/bin/env bash
# Installs what is needed (idempotent), then runs ruff and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
.venv/bin/ruff check quiver tests benchmarks
.venv/bin/python -m pytest -q "$@"
