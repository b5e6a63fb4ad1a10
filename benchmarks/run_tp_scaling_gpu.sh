#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issue 24, item 2 (TP2+SP scaling with the fused
# all-gather + column matmul): the SP GPU tests the merge touched, then the throughput
# benchmark on 1gpu and tp2sp, ours (torch and triton kernels) against TorchTitan with its
# async TP off and on (--titan-async-tp), in the same run. Extra arguments go to
# run_throughput.sh (e.g. --compile off, --profile tp2sp). Needs carry: [".whl"].
#   bash benchmarks/run_tp_scaling_gpu.sh [--compile on|off ...]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-90}" $PYTEST "tests/test_sp_reduce_scatter.py::TestGPU::test_one_step_parity_tp2_sp_triton" >> "$log" 2>&1
echo "== SP tests done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "passed\|failed" "$log" | tail -2
THROUGHPUT_BUDGET=$(( ${T_TOTAL:-570} - (SECONDS - start) )) bash benchmarks/run_throughput.sh 1gpu,tp2sp \
  --frameworks ours,torchtitan --titan-async-tp --kernels torch,triton "$@" 2>&1 | tail -n 30
