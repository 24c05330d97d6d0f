#!/usr/bin/env bash
# Stages what benchmarks/gpu.sh needs on an offline GPU machine, from the project root here
# (after `bash scripts/setup.sh`):
#   bash benchmarks/gpu_stage.sh
# 1. ../shared/device/stage.sh (or $QUIVER_STAGE) with every BIG-bench task of zero_shot.py's
#    `gpu` budget: TASK_LISTS["gpu"] and HELD_OUT (read by importing the module), which writes
#    .device/a (the GGUF's first half, the task files, setup.sh, env.sh) and .device/b (its
#    second half, the gguf / transformers / peft wheels);
# 2. the wheels `quiver serve` needs beyond what the device is known to have (fastapi,
#    starlette, pydantic, uvicorn and theirs, this venv's versions) into .device/a/serve-whl
#    (.device/b is full: the GGUF's half and the transformers wheel): gpu.sh installs them (into a folder of their own, for the serving stage only) if
#    `quiver.serving.server` does not import there as it is;
# 3. checks that each carry (the folder plus the working tree that travels with it) is under
#    64 MiB.
# Then: first device call carrying .device/a, second carrying .device/b running
# `bash benchmarks/gpu.sh` (benchmarks/README.md, "The one-script GPU run: gpu.sh").
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
stage="${QUIVER_STAGE:-../shared/device/stage.sh}"

tasks="$($py - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import zero_shot
names = dict.fromkeys(t.removeprefix("bigbench:")
                      for t in zero_shot.TASK_LISTS["gpu"] + zero_shot.HELD_OUT)
print(" ".join(names))
EOF
)"
echo "staging $(wc -w <<< "$tasks") BIG-bench tasks: $tasks"
# shellcheck disable=SC2086  # one word per task
bash "$stage" $tasks
# the commit gpu.sh names where the tree arrives without its .git
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- quiver benchmarks || echo +changes)" \
  > .device/b/commit

serve="fastapi starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc
       uvicorn h11 anyio idna sniffio typing-extensions"
pins="$($py - $serve <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)"
mkdir -p .device/a/serve-whl
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
   --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
   -d .device/a/serve-whl $pins
echo "serving wheels: $(ls .device/a/serve-whl | tr '\n' ' ')"

# What travels with each carry: the folder and the working tree (tracked files and untracked
# ones git does not ignore).
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
status=0
for part in a b; do
  bytes=$(du -sb ".device/$part" | cut -f1)
  total=$((bytes + tree))
  mib() { awk -v n="$1" 'BEGIN {printf "%.1f", n / 1048576}'; }
  echo ".device/$part: $(mib "$bytes") MiB, with the working tree $(mib "$total") MiB (limit 64)"
  if [ "$total" -ge $((64 * 1048576)) ]; then echo "  too big for one transfer" >&2; status=1; fi
done
exit $status
