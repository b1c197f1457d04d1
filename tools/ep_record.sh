#!/bin/bash
# Expert parallelism on one host: EP = 1 and 2 with torchrun, qwen3-30b-a3b (EP_PRESETS adds others),
# T = 128 and 8192 tokens per rank, uniform and Zipf-skewed routing; per rank the phase breakdown of the
# exact layer, of the dedup layer (each token once per destination rank) and of the all-gather layer (no
# counts, no host sync), interleaved call by call in the same launch, the sync-free padded layer (T=128,
# launched and replayed from a CUDA graph), the gathered layer replayed from a CUDA graph (every T), each
# dispatch's all-to-all (all-gather) against NCCL's for the same bytes, and the whole layer on one GPU in the same launch
# (moe_lab/bench/expert_parallel.py); then one EP=2 forward of each layer under torch.profiler as text
# (moe_lab/bench/ep_profile.py: top kernels, GPU idle gaps, host runtime calls).
#
#   bash tools/ep_record.sh                      on nvidia-h200-x2 (2 GPUs): tables under 4 minutes, then up to
#                                                5 for the NCCL tests (EP_PYTEST=0: the tables alone)
#   MOE_LAB_EP_TINY=1 bash tools/ep_record.sh    the same launches on CPU with gloo and tiny shapes
#
# Writes under $OUT (default out/ep_record), at most 8 files: ep<N>.csv + ep<N>.json (provenance) per EP
# size, ep_summary.csv (one line per preset, T, routing, EP size and variant), ep_profile.txt, ep_record.log.
# Then tests/test_expert_parallel_gpu.py (NCCL on 2 GPUs) into the same log, in its own bounded step.
# Knobs: EP_BACKEND (grouped_mm: the backend of the local experts and of the one-GPU layer; triton times the fused
# kernels, whose partial forward the gathered layer uses), EP_SIZES ("1 2"), EP_PRESETS ("qwen3-30b-a3b"; "qwen3-30b-a3b deepseek-v3" adds deepseek), EP_CHUNKS
# ("2": the chunked, overlapped forward of every layer in 2 chunks; "" none, "2,4" more), EP_PROFILE (1; 0 skips
# the profile), EP_PYTEST (1; 0 skips the NCCL tests), EP_PYTEST_SECONDS (300).
# MOE_LAB_GIT_COMMIT = the commit measured (the device's copy of .git can lag behind its working tree).
# Every launch is bounded (EP_LAUNCH_SECONDS, default 90) and the measurements by EP_TOTAL_SECONDS
# (default 150): a launch that would start past it is skipped and says so in the log. The NCCL tests come
# after, bounded on their own by EP_PYTEST_SECONDS (default 300), so the tables never wait for them and they
# never lose their time to a slow table (the first 2-GPU recording's tests got 145 s of what was left, and timed
# out). They run in three launches and took 52 s on 2 H200s; their "slowness" before was a hang (a check failing
# on one rank only: the tests fail fast now, and a launch past its time names the check each rank was in).
set -u
export NCCL_NVLS_ENABLE=0                    # NVLink multicast stays off on the lent machines
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MOE_LAB_GIT_COMMIT=${MOE_LAB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-out/ep_record}
mkdir -p "$OUT"
LOG=$OUT/ep_record.log
PYTHON=${PYTHON:-python3}
LAUNCH_SECONDS=${EP_LAUNCH_SECONDS:-90}
TOTAL_SECONDS=${EP_TOTAL_SECONDS:-150}
PRESETS=""
BACKEND=${EP_BACKEND:-grouped_mm}
for PRESET in ${EP_PRESETS:-qwen3-30b-a3b}; do PRESETS="$PRESETS --preset $PRESET"; done

if [ -n "${MOE_LAB_EP_TINY:-}" ]; then
  SHAPE="$PRESETS --scale-down 32 --device cpu"
  TOKENS=8,32; PROFILE_TOKENS=32
  REPS="--ep-reps 2 --ep-warmup 1"
  GPUS=2
  if [ "$BACKEND" = triton ]; then  # triton's interpreter: ~1 s per layer call at these shapes; the least that runs
    TOKENS=4; PROFILE_TOKENS=4; REPS="--ep-reps 1 --ep-warmup 0"
  fi
  export OMP_NUM_THREADS=1
else
  SHAPE="$PRESETS --dtype bfloat16"
  TOKENS=128,8192; PROFILE_TOKENS=8192
  REPS="--ep-reps 10 --ep-warmup 3"
  GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
fi
EP_SIZES=${EP_SIZES:-1 2}

{
  echo "ep_record: commit $MOE_LAB_GIT_COMMIT, EP sizes $EP_SIZES, presets ${EP_PRESETS:-qwen3-30b-a3b}, backend $BACKEND, $GPUS devices, $(date -u +%FT%TZ)"
  [ -z "${MOE_LAB_EP_TINY:-}" ] && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$LOG" 2>&1

# bounded LIMIT_NAME MIN_SECONDS: sets LIMIT to what this step may use, or returns 1 (and logs) when too little is left
bounded() {
  local LEFT=$((TOTAL_SECONDS - SECONDS))
  if [ "$LEFT" -lt "$2" ]; then
    echo "$1 skipped: ${SECONDS}s used of ${TOTAL_SECONDS}s" | tee -a "$LOG"; return 1
  fi
  LIMIT=$(( LEFT < LAUNCH_SECONDS ? LEFT : LAUNCH_SECONDS ))
}

TABLES=()
for EP in $EP_SIZES; do
  if [ "$EP" -gt "$GPUS" ]; then
    echo "EP=$EP skipped: only $GPUS devices" | tee -a "$LOG"; continue
  fi
  bounded "EP=$EP" 30 || continue
  echo "=== EP=$EP (limit ${LIMIT}s, ${SECONDS}s so far)" | tee -a "$LOG"
  timeout --kill-after=10 "$LIMIT" $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$EP" \
    -m moe_lab.cli bench --ep $SHAPE --tokens $TOKENS $REPS --distribution uniform,zipf --skew 1.0 \
    --backends "$BACKEND" --ep-chunks "${EP_CHUNKS-2}" --output "$OUT/ep$EP" >> "$LOG" 2>&1
  echo "=== EP=$EP exit $? after ${SECONDS}s" | tee -a "$LOG"
  [ -f "$OUT/ep$EP.csv" ] && TABLES+=("$OUT/ep$EP")
done

# One EP=2 forward of each layer under the profiler (the first preset, the largest T, uniform routing).
if [ "${EP_PROFILE:-1}" = 1 ] && [ "$GPUS" -ge 2 ] && bounded "profile" 30; then
  echo "=== profile EP=2 (limit ${LIMIT}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$LIMIT" $PYTHON -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m moe_lab.cli bench --ep $SHAPE --tokens $PROFILE_TOKENS --distribution uniform --backends "$BACKEND" \
    --ep-profile "$OUT/ep_profile.txt" >> "$LOG" 2>&1
  echo "=== profile exit $? after ${SECONDS}s" | tee -a "$LOG"
fi

# The NCCL correctness tests (2 GPUs), last and bounded on their own: they cannot spoil the tables above.
if [ -z "${MOE_LAB_EP_TINY:-}" ] && [ "${EP_PYTEST:-1}" = 1 ] && [ "$GPUS" -ge 2 ]; then
  LIMIT=${EP_PYTEST_SECONDS:-300}
  echo "=== pytest tests/test_expert_parallel_gpu.py (limit ${LIMIT}s, ${SECONDS}s so far)" | tee -a "$LOG"
  timeout --kill-after=10 "$LIMIT" $PYTHON -m pytest tests/test_expert_parallel_gpu.py -v -p no:cacheprovider \
    >> "$LOG" 2>&1
  echo "=== pytest exit $? after ${SECONDS}s" | tee -a "$LOG"
fi

if [ ${#TABLES[@]} -gt 0 ]; then
  $PYTHON - "$OUT/ep_summary.csv" "${TABLES[@]}" >> "$LOG" 2>&1 <<'PY'
import sys
import pandas as pd
from moe_lab.bench.ep_summary import goal_status, summarize_tables, variants_against_exact
summary = summarize_tables(sys.argv[2:])
summary.to_csv(sys.argv[1], index=False)
pd.set_option("display.width", 250)
fmt = lambda v: f"{v:.4g}"  # noqa: E731
print(summary.to_string(index=False, float_format=fmt))
print(variants_against_exact(summary).to_string(index=False, float_format=fmt))
for variant in ("exact", "dedup", "gathered"):
    print(f"goals, {variant} layer:")
    print(goal_status(summary, variant=variant).to_string(index=False, float_format=fmt))
PY
fi
tail -n 80 "$LOG"
echo "ep_record: done in ${SECONDS}s; files in $OUT:"; ls "$OUT"
