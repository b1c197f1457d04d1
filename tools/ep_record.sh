#!/bin/bash
# Expert parallelism on one host: EP = 1, 2, 4 with torchrun, qwen3-30b-a3b and deepseek-v3 layers,
# T = 128 and 8192 tokens per rank, uniform and Zipf-skewed routing; per rank the phase breakdown,
# the overlapped (chunked) and sync-free padded variants, the all-to-all bandwidth against NCCL's for
# the same bytes, and the whole layer on one GPU in the same launch (moe_lab/bench/expert_parallel.py).
#
#   bash tools/ep_record.sh                      on a 4-GPU machine (nvidia-h200-x4), about 2-3 minutes
#   MOE_LAB_EP_TINY=1 bash tools/ep_record.sh    the same launches on CPU with gloo and tiny shapes
#
# Writes under $OUT (default out/ep_record): ep<N>.csv + ep<N>.json (provenance) per EP size,
# ep_summary.csv (one line per preset, T, routing, EP size and variant) and ep_record.log: 8 files.
# Then, in the time left, tests/test_expert_parallel_gpu.py (NCCL on 2 GPUs) into the same log.
# MOE_LAB_GIT_COMMIT = the commit measured (the device's copy of .git can lag behind its working tree).
# Every launch is bounded (EP_LAUNCH_SECONDS, default 100) and the whole script by EP_TOTAL_SECONDS
# (default 330): a launch that would start past it is skipped and says so in the log.
set -u
export NCCL_NVLS_ENABLE=0                    # NVLink multicast stays off on the lent machines
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MOE_LAB_GIT_COMMIT=${MOE_LAB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-out/ep_record}
mkdir -p "$OUT"
LOG=$OUT/ep_record.log
PYTHON=${PYTHON:-python3}
LAUNCH_SECONDS=${EP_LAUNCH_SECONDS:-100}
TOTAL_SECONDS=${EP_TOTAL_SECONDS:-330}

if [ -n "${MOE_LAB_EP_TINY:-}" ]; then
  SHAPE="--preset qwen3-30b-a3b --preset deepseek-v3 --scale-down 32 --device cpu --tokens 8,32"
  REPS="--ep-reps 2 --ep-warmup 1"
  GPUS=4
  export OMP_NUM_THREADS=1
else
  SHAPE="--preset qwen3-30b-a3b --preset deepseek-v3 --dtype bfloat16 --tokens 128,8192"
  REPS="--ep-reps 10 --ep-warmup 3"
  GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
fi
EP_SIZES=${EP_SIZES:-1 2 4}

{
  echo "ep_record: commit $MOE_LAB_GIT_COMMIT, EP sizes $EP_SIZES, $GPUS devices, $(date -u +%FT%TZ)"
  [ -z "${MOE_LAB_EP_TINY:-}" ] && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$LOG" 2>&1

TABLES=()
for EP in $EP_SIZES; do
  if [ "$EP" -gt "$GPUS" ]; then
    echo "EP=$EP skipped: only $GPUS devices" | tee -a "$LOG"; continue
  fi
  LEFT=$((TOTAL_SECONDS - SECONDS))
  if [ "$LEFT" -lt 30 ]; then
    echo "EP=$EP skipped: ${SECONDS}s used of ${TOTAL_SECONDS}s" | tee -a "$LOG"; continue
  fi
  LIMIT=$(( LEFT < LAUNCH_SECONDS ? LEFT : LAUNCH_SECONDS ))
  echo "=== EP=$EP (limit ${LIMIT}s, ${SECONDS}s so far)" | tee -a "$LOG"
  timeout --kill-after=10 "$LIMIT" $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$EP" \
    -m moe_lab.cli bench --ep $SHAPE $REPS --distribution uniform,zipf --skew 1.0 --ep-chunks 2,4 \
    --output "$OUT/ep$EP" >> "$LOG" 2>&1
  STATUS=$?
  echo "=== EP=$EP exit $STATUS after ${SECONDS}s" | tee -a "$LOG"
  [ -f "$OUT/ep$EP.csv" ] && TABLES+=("$OUT/ep$EP")
done

# The NCCL correctness tests (2 GPUs), in what time is left: they cannot spoil the tables above.
LEFT=$((TOTAL_SECONDS - SECONDS))
if [ -z "${MOE_LAB_EP_TINY:-}" ] && [ "$GPUS" -ge 2 ] && [ "$LEFT" -ge 45 ]; then
  echo "=== pytest tests/test_expert_parallel_gpu.py (limit ${LEFT}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$LEFT" $PYTHON -m pytest tests/test_expert_parallel_gpu.py -q -p no:cacheprovider -x \
    >> "$LOG" 2>&1
  echo "=== pytest exit $? after ${SECONDS}s" | tee -a "$LOG"
fi

if [ ${#TABLES[@]} -gt 0 ]; then
  $PYTHON - "$OUT/ep_summary.csv" "${TABLES[@]}" >> "$LOG" 2>&1 <<'PY'
import sys
import pandas as pd
from moe_lab.bench.ep_summary import summarize_tables
summary = summarize_tables(sys.argv[2:])
summary.to_csv(sys.argv[1], index=False)
pd.set_option("display.width", 250)
print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
PY
fi
tail -n 60 "$LOG"
echo "ep_record: done in ${SECONDS}s; files in $OUT:"; ls "$OUT"
