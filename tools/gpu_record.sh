#!/bin/bash
# The recorded GPU run behind data/h100_bf16_compare_hf_*: one call on one card, $OUT set and
# MOE_LAB_GIT_COMMIT = the commit measured. Everything lands in $OUT/record.tar.gz (+ log.txt).
export PYTHONPATH=$PWD
R=/tmp/record; mkdir -p $R
BENCH="python -m moe_lab.cli bench --dtype bfloat16 --quiet"
{
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# 1. correctness: every backend x dtype, CUDA-graph replay and torch.compile, routing changed after capture
timeout 200 python -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -3
# 2. the comparison tables: six presets x T, eager launches and CUDA-graph replay, transformers beside
timeout 130 $BENCH --preset qwen3-30b-a3b --preset olmoe-1b-7b --preset qwen1.5-moe-a2.7b \
  --tokens 1,16,128,1024,8192 --compare-hf --cuda-graph --max-seconds 0.1 \
  --output $R/h100_bf16_compare_hf_finegrained 2>&1 | tail -2
timeout 150 $BENCH --preset mixtral-8x7b --preset deepseek-v3 --preset gpt-oss-20b \
  --tokens 1,16,128,1024,8192 --compare-hf --cuda-graph --max-seconds 0.1 \
  --output $R/h100_bf16_compare_hf_coarse 2>&1 | tail -2
# 3. torch.compile modes, moe_lab beside transformers, cell for cell
timeout 200 $BENCH --preset qwen3-30b-a3b --tokens 16 --backends batched_mm,grouped_mm,triton --compare-hf \
  --compile-matrix --compile-tokens 16,1024 --compile-modes default,reduce-overhead \
  --output $R/h100_bf16_compare_hf_qwen3-30b-a3b 2>&1 | tail -26
# 3b. graph breaks under torch.compile (each break costs a Python round trip per forward)
python -c "
import torch, moe_lab
from moe_lab.bench.hf_compare import register_transformers_backends
register_transformers_backends()
layer = moe_lab.Experts(moe_lab.get_preset('qwen3-30b-a3b').config.replace(dtype=torch.bfloat16)).cuda()
x = torch.randn(1024, 2048, device='cuda', dtype=torch.bfloat16)
i, w = moe_lab.synthetic_routing(1024, 128, 8, device='cuda')
for name in ['batched_mm', 'grouped_mm', 'triton', 'auto', 'transformers:grouped_mm']:
    layer.set_experts_implementation(name); torch._dynamo.reset()
    e = torch._dynamo.explain(layer)(x[:16], i[:16], w[:16])
    print('graph breaks under torch.compile:', name, e.graph_break_count, [str(r.reason)[:100] for r in e.break_reasons])
" 2>&1 | grep "graph breaks"
# 4. transformers' own anchor script, same card, same call (its budget keeps it short). It lives
#    outside the repository: copy ../shared/anchors/hf_experts_bench.py to the path below first.
[ -f tools/_anchor_hf_experts_bench.py ] && OUT=$R BUDGET_S=40 timeout 70 python tools/_anchor_hf_experts_bench.py 2>&1 | tail -3
} > $OUT/log.txt 2>&1
tar czf $OUT/record.tar.gz -C $R .
tail -45 $OUT/log.txt
