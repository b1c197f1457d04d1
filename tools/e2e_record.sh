#!/bin/bash
# End to end on one GPU: Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B at full size (bf16, random weights built on
# the GPU from moe_lab/hf/configs), through transformers' generate, every experts backend that matters:
#   prefill 1 x {512, 4096}; decode batch {1, 8, 64}, compiled with CUDA graphs (transformers'
#   CompileConfig: mode reduce-overhead, then backend cudagraphs) first, then uncompiled; batches 1 and 8
#   (the goals') before 64; logits/tokens checks; the experts' share (hooks, and by removal).
#
#   bash tools/e2e_record.sh                      both models, one device call (8 minutes at most)
#   bash tools/e2e_record.sh qwen3-30b-a3b        one model, with the whole budget
#   bash tools/e2e_record.sh --tiny               the same logic on CPU with two tiny models (a minute)
#
# Everything is bounded: each model gets a share of BUDGET_S (default 440 s) and runs under `timeout`;
# the table is rewritten after every case, so a model stopped by its timeout still returns its rows
# (what did not run says "skipped" or "warmed up, not timed yet"). Output in $OUT (at most 5 files):
#   <card>_<dtype>_e2e_<model>.csv / .json (provenance; the names data/ keeps), log.txt
# A newer transformers travels as a wheel in .whl/ (installed into /tmp/site, as tools/gpu_record.sh does);
# set MOE_LAB_GIT_COMMIT to the commit measured (the device's copy of .git can lag behind).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi

TINY=0
MODELS=()
for arg in "$@"; do
  case $arg in
    --tiny) TINY=1 ;;
    -*) echo "unknown option $arg (use --tiny, or model names)"; exit 2 ;;
    *) MODELS+=("$arg") ;;
  esac
done

if [ $TINY = 1 ]; then
  [ ${#MODELS[@]} -gt 0 ] || MODELS=(tiny:qwen3_moe tiny:qwen2_moe)
  BUDGET_S=${BUDGET_S:-240}
  DEVICE=cpu; CARD=cpu; DTYPE=fp32; PRIORITY=1,2
  ARGS="--device cpu --prefill 32,64 --batches 1,2,4 --context 16 --new-tokens 4 --rounds 2"
  EXECUTIONS=${E2E_EXECUTIONS:-compile:cudagraphs,compile:default,eager}
  BACKENDS="grouped_mm,batched_mm,grouped_mm:pinned,eager,moe_lab_grouped_mm,moe_lab_auto,moe_lab_batched_mm,no_experts"
  COMPILED="batched_mm,moe_lab_grouped_mm,no_experts"
  DECODE="grouped_mm,batched_mm,grouped_mm:pinned,moe_lab_grouped_mm,moe_lab_auto,moe_lab_batched_mm,no_experts"
else
  [ ${#MODELS[@]} -gt 0 ] || MODELS=(qwen3-30b-a3b qwen1.5-moe-a2.7b)
  BUDGET_S=${BUDGET_S:-440}
  DEVICE=cuda; DTYPE=bf16; PRIORITY=1,8  # the goals' batches: compiled, then uncompiled, before batch 64
  CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
  # moe_lab's batched_mm refuses gathers over 4 GiB by default; transformers' has no guard. Same room for both
  # (Qwen3-30B-A3B's decode at batch 64 gathers 4.8 GB; the weights take 57 GiB of the card).
  export MOE_LAB_BATCHED_MM_BUDGET=${MOE_LAB_BATCHED_MM_BUDGET:-48e9}
  ARGS="--device cuda --dtype bfloat16 --prefill 512,4096 --batches 1,8,64 --context 128 --new-tokens 16 --rounds 2"
  # reduce-overhead (transformers' default: Inductor + CUDA graphs) first: moe_lab_triton does not compile under
  # the cudagraphs backend with torch 2.11 (docs/errors.md), which cost the first H200 run its budget.
  EXECUTIONS=${E2E_EXECUTIONS:-compile:reduce-overhead,compile:cudagraphs,eager}
  # transformers' loop (eager) runs the prefills only: its decode at batch 64 loops over every expert of 48 layers.
  BACKENDS="grouped_mm,batched_mm,grouped_mm:pinned,eager,moe_lab_triton,moe_lab_grouped_mm,moe_lab_auto,moe_lab_batched_mm,no_experts"
  # Compiled: every backend x batch x execution is a compile of the whole model (tens of seconds at 48
  # layers), so only the goal's pair and the baseline of the experts' share: moe_lab's decode kernel and
  # transformers' best decode (batched_mm: what its generate switches grouped_mm to). COMPILED=... widens it.
  COMPILED=${COMPILED:-moe_lab_triton,batched_mm,no_experts}
  DECODE="batched_mm,grouped_mm,grouped_mm:pinned,moe_lab_triton,moe_lab_grouped_mm,moe_lab_auto,moe_lab_batched_mm,no_experts"
fi

{
[ $DEVICE = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null
# Share of the budget per model: by layer count x width (the 48-layer model compiles longest).
declare -A WEIGHT=([qwen3-30b-a3b]=55 [qwen1.5-moe-a2.7b]=45)
TOTAL=0; for m in "${MODELS[@]}"; do TOTAL=$((TOTAL + ${WEIGHT[$m]:-50})); done
for m in "${MODELS[@]}"; do
  share=$((BUDGET_S * ${WEIGHT[$m]:-50} / TOTAL))
  # moe-lab's own budget stops starting new cases; what is in flight (a compile) needs the margin
  # before `timeout` stops the process, keeping the rows written so far.
  inner=$((share * 70 / 100))
  name=${m#tiny:}
  echo "== $m: budget ${share}s (new cases until ${inner}s) $(date -u +%T)"
  timeout -k 5 $share python3 -m moe_lab.cli e2e --model "$m" $ARGS --executions "$EXECUTIONS" \
      --backends "$BACKENDS" --compiled-backends "$COMPILED" --decode-backends "$DECODE" --compiled-first \
      --priority-batches $PRIORITY \
      --budget-s $inner --output "$OUT/${CARD}_${DTYPE}_e2e_${name}"
  echo "== $m: exit $? $(date -u +%T)"
done
} 2>&1 | grep --line-buffered -v "Warning: \|warnings.warn" | tee "$OUT/log.txt"
