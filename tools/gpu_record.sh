#!/bin/bash
# The recorded GPU run behind data/h100_bf16_compare_hf_*: `bash tools/gpu_record.sh checks` then
# `bash tools/gpu_record.sh tables`, on one card, with $OUT set and MOE_LAB_GIT_COMMIT = the commit.
export PYTHONPATH=$PWD
BENCH="python -m moe_lab.cli bench --dtype bfloat16 --quiet"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "$1" = checks ]; then
  # correctness of every backend x execution x compile mode, fresh inputs, routing changed after capture
  timeout 200 python -m pytest tests/test_gpu.py -q -p no:cacheprovider > $OUT/test_gpu.txt 2>&1; tail -2 $OUT/test_gpu.txt
  # compile modes, moe_lab beside transformers, cell for cell
  timeout 360 $BENCH --preset qwen3-30b-a3b --tokens 16 --backends batched_mm,grouped_mm,triton --compare-hf \
    --compile-matrix --compile-tokens 16,1024 --compile-modes default,reduce-overhead \
    --output $OUT/h100_bf16_compare_hf_qwen3-30b-a3b > $OUT/compile.txt 2>&1; tail -30 $OUT/compile.txt
else
  timeout 240 $BENCH --preset qwen3-30b-a3b --preset olmoe-1b-7b --preset qwen1.5-moe-a2.7b \
    --tokens 1,16,128,1024,8192 --compare-hf --cuda-graph --max-seconds 0.1 \
    --output $OUT/h100_bf16_compare_hf_finegrained > $OUT/finegrained.txt 2>&1; tail -3 $OUT/finegrained.txt
  timeout 270 $BENCH --preset mixtral-8x7b --preset deepseek-v3 --preset gpt-oss-20b \
    --tokens 1,16,128,1024,8192 --compare-hf --cuda-graph --max-seconds 0.1 \
    --output $OUT/h100_bf16_compare_hf_coarse > $OUT/coarse.txt 2>&1; tail -3 $OUT/coarse.txt
  # transformers' own anchor script beside ours, same card, same call (its budget keeps the call short)
  [ -f tools/_anchor_hf_experts_bench.py ] && BUDGET_S=50 timeout 80 python tools/_anchor_hf_experts_bench.py > $OUT/anchor.txt 2>&1
fi
