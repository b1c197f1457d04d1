#!/bin/bash
# The recorded GPU runs behind data/<card>_bf16_*, on one card, in parts that each fit the
# device's 10-minute limit; several parts may share one call:
#   bash tools/gpu_record.sh tests compile              (about 6 minutes on an H100)
#   bash tools/gpu_record.sh finegrained coarse anchor  (about 5 minutes)
#   bash tools/gpu_record.sh backward-finegrained       (forward + backward, transformers and Liger beside)
#   bash tools/gpu_record.sh ab-forward                 (this tree's forward against the commit in .ab_old/)
#   bash tools/gpu_record.sh backward:qwen3-30b-a3b     (one preset's forward + backward table, one process per
#                                                        token count; backward:<preset>:8192,1024 some counts;
#                                                        backward-hf:<preset> without Liger)
# tools/gpu_parallel.sh runs several parts' lists at once, one GPU each, on a machine of several GPUs.
# Liger-Kernel, where wanted, travels as a wheel in .whl/ (installed into /tmp/site below).
# Every table is measured in interleaved rounds (ROUNDS, default 3: moe_lab.bench.rounds),
# transformers beside moe_lab.
# $OUT must be set, and MOE_LAB_GIT_COMMIT = the commit measured, written into the command from the
# local checkout (the device's copy of .git can lag behind the working tree it measures).
# Output: $OUT/record.tar.gz (the tables) + $OUT/log.txt.
# BENCH_ARGS (optional) is added to every bench command: "--device cpu --scale-down 64" tries a
# command's logic on a CPU machine (triton through its interpreter) before it spends GPU time.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -n "${WHEELS_INSTALLED:-}" ]; then  # tools/gpu_parallel.sh installed them
  export PYTHONPATH=$PWD:/tmp/site
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
[ $# -gt 0 ] || { echo "parts: tests, finegrained, coarse, compile, compile-autotune, graph-breaks, anchor," \
                       "backward-finegrained, backward-coarse, ab-forward"; exit 2; }
# The card in file names: "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200.
CARD=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'cpu')")
ROUNDS=${ROUNDS:-3}
R=${R:-/tmp/record}; mkdir -p $R "${OUT:?set OUT to the folder the log and tables go to}"
BENCH="python -m moe_lab.cli bench --dtype bfloat16 --quiet --rounds $ROUNDS ${BENCH_ARGS:-}"
TABLE="--tokens 1,16,128,1024,8192 --compare-hf --cuda-graph --max-seconds 0.1"

graph_breaks() {
  # graph breaks under torch.compile (each break costs a Python round trip per forward)
  timeout 150 python -c "
import torch, moe_lab
from moe_lab.bench.implementations import implementation
layer = moe_lab.Experts(moe_lab.get_preset('qwen3-30b-a3b').config.replace(dtype=torch.bfloat16)).cuda()
x = torch.randn(8192, 2048, device='cuda', dtype=torch.bfloat16)
i, w = moe_lab.synthetic_routing(8192, 128, 8, device='cuda')
for name in ['batched_mm', 'grouped_mm', 'triton', 'auto', 'transformers:grouped_mm']:
    layer.set_experts_implementation(implementation(name))
    for T in (16, 1024, 8192):  # triton: sorted 16-row tiles, 64-row tiles, TMA tiles
        torch._dynamo.reset()
        try:
            e = torch._dynamo.explain(layer)(x[:T], i[:T], w[:T])
            print('graph breaks under torch.compile:', name, 'T =', T, e.graph_break_count, [str(r.reason)[:100] for r in e.break_reasons])
        except Exception as error:  # batched_mm refuses T=1024+ (its gather budget)
            print('graph breaks under torch.compile:', name, 'T =', T, 'not traced:', type(error).__name__)
" 2>&1 | grep "graph breaks"
}

{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
while [ $# -gt 0 ]; do
  part=$1; shift
  echo "== $part $(date -u +%T)"
  case $part in
  tests)
    # correctness: every backend x dtype, CUDA-graph replay and torch.compile, routing changed after capture
    timeout 360 python -m pytest tests/test_gpu.py tests/test_triton.py tests/test_triton_gpu.py -q -p no:cacheprovider 2>&1 | tail -3 ;;
  finegrained)
    # three presets x T, eager launches and CUDA-graph replay, transformers beside
    timeout 280 $BENCH --preset qwen3-30b-a3b --preset olmoe-1b-7b --preset qwen1.5-moe-a2.7b $TABLE \
      --output $R/${CARD}_bf16_compare_hf_finegrained 2>&1 | tail -1 ;;
  coarse)
    timeout 330 $BENCH --preset mixtral-8x7b --preset deepseek-v3 --preset gpt-oss-20b $TABLE \
      --output $R/${CARD}_bf16_compare_hf_coarse 2>&1 | tail -1 ;;
  compile)
    # torch.compile modes, moe_lab beside transformers, each mode's backends timed in interleaved rounds
    timeout 330 $BENCH --preset qwen3-30b-a3b --tokens 16 --backends batched_mm,grouped_mm,triton --compare-hf \
      --compile-matrix --compile-tokens 16,1024 --compile-modes default,reduce-overhead --max-seconds 0.1 \
      --output $R/${CARD}_bf16_compare_hf_qwen3-30b-a3b 2>&1 | tail -30
    graph_breaks ;;
  compile-autotune)
    # the two max-autotune modes, which benchmark candidate kernels per matmul shape (minutes)
    timeout 500 $BENCH --preset qwen3-30b-a3b --tokens 16 --backends batched_mm,grouped_mm,triton --compare-hf \
      --compile-matrix --compile-tokens 16,1024 --compile-modes max-autotune,max-autotune-no-cudagraphs \
      --max-seconds 0.1 --output $R/${CARD}_bf16_compare_hf_autotune_qwen3-30b-a3b 2>&1 | tail -30 ;;
  backward-finegrained)
    # forward + backward (a training step's layer), moe_lab beside transformers' and Liger's
    timeout 420 $BENCH --backward --preset qwen3-30b-a3b --preset olmoe-1b-7b --preset qwen1.5-moe-a2.7b \
      --tokens 128,1024,8192,32768 --backends grouped_mm,triton --compare-hf --compare-liger --max-seconds 0.1 \
      --output $R/${CARD}_bf16_backward_finegrained 2>&1 | tail -40 ;;
  backward-coarse)
    timeout 420 $BENCH --backward --preset mixtral-8x7b --preset deepseek-v3 --preset gpt-oss-20b \
      --tokens 128,1024,8192,32768 --backends grouped_mm,triton --compare-hf --compare-liger --max-seconds 0.1 \
      --output $R/${CARD}_bf16_backward_coarse 2>&1 | tail -40 ;;
  ab-forward)
    # this tree's forward against the commit checked out in .ab_old/ (carried), same card, separate
    # processes in A B B A order so that drift lands on both; compare the tables offline
    AB="python -m moe_lab.cli bench --dtype bfloat16 --quiet --preset qwen3-30b-a3b --preset olmoe-1b-7b \
        --preset mixtral-8x7b --tokens 1,128,8192 --backends grouped_mm,triton,batched_mm --cuda-graph --no-ceilings \
        --max-seconds 0.1"
    for run in old1 new1 new2 old2; do
      tree=$PWD; [ "${run#old}" != "$run" ] && tree=$PWD/.ab_old
      (cd $tree && PYTHONPATH=$tree timeout 150 $AB --output $R/ab_forward_$run 2>&1 | tail -2)
    done ;;
  backward:*|backward-hf:*)
    # one preset, one process per token count (a slow point costs only itself): moe_lab beside
    # transformers' grouped_mm and, for backward:, Liger's fused MoE, interleaved rounds in each process.
    # Liger autotunes per token count: its first call took over 150 s on an H200.
    # backward:<preset>[:<T,T,...>] (default 128,1024,8192,32768); backward-hf: without Liger.
    # BACKWARD_GRAPH=1: each implementation's whole step replayed from a CUDA graph too (--cuda-graph);
    # BACKWARD_GRAPH=back-to-back: and those replays queued back to back, as a training loop runs them.
    spec=${part#*:}; preset=${spec%%:*}; tokens=128,1024,8192,32768
    [ "$spec" != "$preset" ] && tokens=${spec#*:}
    liger=--compare-liger; [ "${part%%:*}" = backward-hf ] && liger=
    graph=; [ -n "${BACKWARD_GRAPH:-}" ] && graph=--cuda-graph
    [ "${BACKWARD_GRAPH:-}" = back-to-back ] && graph="--cuda-graph --back-to-back"
    for T in ${tokens//,/ }; do
      echo "-- $preset T=$T $liger $graph $(date -u +%T)"
      timeout ${BACKWARD_TIMEOUT:-240} $BENCH --backward --preset $preset --tokens $T --backends grouped_mm,triton \
        --compare-hf $liger $graph --max-seconds 0.2 --output $R/${CARD}_bf16_backward_${preset}_T$T 2>&1 | tail -8
    done ;;
  graph-breaks)
    graph_breaks ;;
  anchor)
    # transformers' own anchor script, same card. It lives outside the repository: copy
    # ../shared/anchors/hf_experts_bench.py to the path below first and carry it.
    [ -f tools/_anchor_hf_experts_bench.py ] && OUT=$R BUDGET_S=40 timeout 70 python tools/_anchor_hf_experts_bench.py 2>&1 | tail -3 ;;
  *)
    echo "unknown part $part" ;;
  esac
done
echo "== done $(date -u +%T)"
} > $OUT/log.txt 2>&1
[ -n "$NO_TAR" ] || tar czf $OUT/record.tar.gz -C $R .
tail -60 $OUT/log.txt
