#!/usr/bin/env bash
# Installs what is needed (idempotent), then runs the main job on the embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
.venv/bin/quiver demo "$@"
