#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issue 24 item 2 (eager TP host overhead): the eager TP2+SP
# GPU parity cases, then the tiny-width host benchmark on CUDA (host-bound by construction;
# torch and triton kernels) with the eager SP norms on local shards alternated in-process
# against the DTensor norms (--ab-local-norms), then the eager TP2+SP throughput rows of the 8B
# shape against one GPU in the same run. Needs carry: [".whl"].
#   bash benchmarks/run_tp_host_overhead_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-170}" $PYTEST tests/test_gpu.py -k "tp2_sp" tests/test_gather_once.py >> "$log" 2>&1
echo "== tests done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "PASSED\|FAILED\|passed\|failed" "$log" | tail -14
for k in torch triton; do
  timeout -k 5 "${T_HOST:-120}" python3 benchmarks/tp_host_overhead.py --device cuda --kernels "$k" \
    --label "gpu-$k" --name tp_host_overhead_cuda --profile-steps 0 --ab-local-norms 3 2>&1 \
    | grep -v "^\[\|Warning\|USDT" | tail -n 12
  echo "== host benchmark ($k) done at $((SECONDS - start)) s"
done
THROUGHPUT_BUDGET=$(( ${T_TOTAL:-570} - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu,tp2sp \
  --compile off --frameworks ours --kernels torch,triton --name train_throughput_tp_eager_host 2>&1 \
  | grep "ok \|target\|failed\|wrote"
