#!/usr/bin/env bash
# One short device-tool call on 2 GPUs after the eager-TP host changes (tp-host merge): the
# eager TP2+SP GPU parity cases, the gather/host-path tests, the permute CUDA-graph capture
# test, then the eager throughput of ours on one GPU and TP2+SP (torch kernels) in the same
# run (RESULTS.md's "TP2+SP scaling" section measured 0.495 before). Needs carry: [".whl"].
#   bash benchmarks/run_tp_eager_check_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-110}" $PYTEST tests/test_gpu.py -k "tp2 and eager" tests/test_gather_once.py \
  tests/test_tp_host_paths.py "tests/test_moe_fused_permute.py::test_gpu_bf16_forward_backward_and_cuda_graph" \
  >> "$log" 2>&1
echo "== tests done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "PASSED\|FAILED\|passed\|failed" "$log" | tail -14
THROUGHPUT_BUDGET=$(( ${T_TOTAL:-300} - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu,tp2sp \
  --compile off --frameworks ours --kernels torch --steps 6 --warmup 2 --min-start 30 \
  --name train_throughput_tp_eager_host 2>&1 | grep "ok \|target\|failed\|wrote\|skip"
