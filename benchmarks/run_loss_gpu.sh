#!/usr/bin/env bash
# Issue 23, the eager loss in chunks and AdamW's bf16 moments, on ONE GPU (nvidia-h200), one
# device-tool call of about 4 minutes: their GPU tests, the loss alone four ways
# (benchmarks/cross_entropy.py), then one GPU's eager training, ours with fp32 and bf16 moments
# against TorchTitan (run_adamw_gpu.sh's throughput part). Results in $OUT: tests.log,
# cross_entropy.json, train_throughput_moments_off.json.
#   bash benchmarks/run_loss_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, PYTHONPATH, $log, $PYTEST, $start
status=0
timeout -k 10 120 $PYTEST tests/test_cross_entropy.py tests/test_adamw.py 2>&1 | tee -a "$log" | tail -8 || status=1
(cd benchmarks && timeout -k 10 120 python3 cross_entropy.py) 2>&1 | tee "$OUT/cross_entropy.log" | tail -8 || status=1
echo "loss benchmark done at $((SECONDS - start)) s" | tee -a "$log"
THROUGHPUT_BUDGET=$(( 570 - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu --compile off --kernels torch \
  --moments fp32,bf16 --frameworks ours,torchtitan --name train_throughput_moments_off 2>&1 | tail -14 || status=1
echo "done at $((SECONDS - start)) s" | tee -a "$log"
exit $status
