#!/bin/bash
# Runs tools/gpu_record.sh once per argument, each on its own GPU and all at once, on a machine of
# several GPUs; each argument is that GPU's list of parts, run in order:
#   bash tools/gpu_parallel.sh "backward:qwen3-30b-a3b backward:gpt-oss-20b" "backward:olmoe-1b-7b" ...
# A comparison stays inside one process on one card; only independent tables share the machine.
# DEADLINE (seconds, default 540) bounds every GPU's list.
# Output: $OUT/log_gpuN.txt for each GPU, and $OUT/record.tar.gz with every table.
set -u
export R=${R:-/tmp/record}; mkdir -p $R
# the carried wheels, installed once: several pip installs into one folder at once lose packages
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site WHEELS_INSTALLED=1
fi
gpu=${FIRST_GPU:-0}  # FIRST_GPU leaves the GPUs below it to another program
first=$gpu
for parts in "$@"; do
  mkdir -p /tmp/out_gpu$gpu
  # a GPU past the deadline is stopped so that the others' tables still come back
  CUDA_VISIBLE_DEVICES=$gpu OUT=/tmp/out_gpu$gpu NO_TAR=1 timeout ${DEADLINE:-540} bash tools/gpu_record.sh $parts \
    >/dev/null 2>&1 &
  gpu=$((gpu + 1))
done
wait
for ((i = first; i < gpu; i++)); do cp /tmp/out_gpu$i/log.txt $OUT/log_gpu$i.txt; done
tar czf $OUT/record.tar.gz -C $R .
tail -n 25 $OUT/log_gpu*.txt
