#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issues 23/24 (eager TP host overhead): the tiny-width
# host benchmark on CUDA (host-bound by construction; torch and triton kernels), then the
# eager TP2+SP throughput rows against one GPU (the 8B shape of RESULTS.md's "TP2+SP scaling"
# section, which measured 0.495 / 0.529 before these changes). Needs carry: [".whl"].
#   bash benchmarks/run_tp_host_overhead_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $start
for k in torch triton; do
  timeout -k 5 "${T_HOST:-150}" python3 benchmarks/tp_host_overhead.py --device cuda --kernels "$k" \
    --label "gpu-$k" --name tp_host_overhead_cuda 2>&1 | grep -v "^\[\|Warning" | tail -n 12
  echo "== host benchmark ($k) done at $((SECONDS - start)) s"
done
THROUGHPUT_BUDGET=$(( ${T_TOTAL:-570} - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu,tp2sp \
  --compile off --frameworks ours --kernels torch,triton --name train_throughput_tp_eager_host 2>&1 \
  | grep "ok \|target\|failed\|wrote"
