#!/usr/bin/env bash
# Issue 23, AdamW's moments in bf16, on ONE GPU (device kind nvidia-h200), one device-tool call
# of under 10 minutes: the kernel's GPU tests, the optimizer step alone (benchmarks/adamw_step.py:
# torch's fused and foreach AdamW against ours), then training throughput on one GPU, ours with
# fp32 and bf16 moments against TorchTitan in the same call (run_throughput.sh; pass
# COMPILE=off for the eager rows). Results in $OUT: tests.log, adamw_step.json,
# train_throughput_moments_<compile>.json and the throughput summary.
#   bash benchmarks/run_adamw_gpu.sh            # compiled
#   COMPILE=off bash benchmarks/run_adamw_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, PYTHONPATH, $log, $PYTEST, $start
status=0
timeout -k 10 "${TESTS_BUDGET:-90}" $PYTEST tests/test_adamw.py 2>&1 | tee -a "$log" | tail -6 || status=1
(cd benchmarks && timeout -k 10 "${STEP_BUDGET:-90}" python3 adamw_step.py) 2>&1 | tee "$OUT/adamw_step.log" \
  | tail -8 || status=1
echo "optimizer benchmark done at $((SECONDS - start)) s" | tee -a "$log"
compile=${COMPILE:-on}
THROUGHPUT_BUDGET=$(( ${TOTAL_BUDGET:-570} - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu \
  --compile "$compile" --kernels torch --moments fp32,bf16 --frameworks ours,torchtitan \
  --name "train_throughput_moments_$compile" 2>&1 | tail -25 || status=1
echo "done at $((SECONDS - start)) s" | tee -a "$log"
exit $status
