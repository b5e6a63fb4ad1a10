#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issue 24, item 1 (the SP all-gather fused into the
# column-parallel matmul): the op's GPU tests (symmetric memory against NCCL, opcheck, TP2+SP
# parity, compiled with selective recompute), the GPU tests of the SP kernels it is wired
# beside (their TP2+SP parity now runs it too), then the kernel benchmark with torch's
# fused_all_gather_matmul in the same run. Each stage has its own timeout; logs and JSON go
# to $OUT (all_gather_matmul.json).
#   bash benchmarks/run_all_gather_matmul_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-200}" $PYTEST tests/test_all_gather_matmul.py tests/test_gather_once.py >> "$log" 2>&1
echo "== all_gather_matmul GPU tests done at $((SECONDS - start)) s" | tee -a "$log"
timeout -k 5 "${T_SP_TESTS:-150}" $PYTEST tests/test_matmul_reduce_scatter.py tests/test_sp_reduce_scatter.py \
  "tests/test_compile.py::test_gpu_compiled_sp_triton_reduce_scatter" >> "$log" 2>&1
echo "== SP kernel GPU tests done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 10 "${T_BENCH:-150}" torchrun --standalone --nproc-per-node 2 all_gather_matmul.py \
  --out "$OUT/all_gather_matmul.json") 2>&1 | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" > "$OUT/all_gather_matmul.log"
echo "== benchmark done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "passed\|failed\|error" "$log" | tail -8
grep "fused all-gather+matmul / matmul alone\|torch fused_all_gather_matmul / ours" "$OUT/all_gather_matmul.log" | tail -12
