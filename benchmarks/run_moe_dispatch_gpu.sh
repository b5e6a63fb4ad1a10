#!/usr/bin/env bash
# Issue 22 on 2 GPUs (device kind nvidia-h200-x2), one device-tool call of under 10 minutes
# (about 5): the GPU tests of the fused local permute and of the symmetric-memory
# dispatch/combine (parity with the NCCL path, output and every gradient, with the rows past
# the received count poisoned with NaN, at the default bound and at 1.25; model EP2 parity
# with the exchange spied, with and without ParallelPlan(moe_recv_bound=1.5); the existing
# EP2 Triton model row of tests/test_gpu.py), then the benchmark with its NCCL baselines in
# the same run: every symmetric-memory row at the default receive bound (ep, the worst case)
# and beside it at --tight-bounds (default 1.25: the ..._bound1.25 rows and targets).
# Results: $OUT/moe_dispatch.json (copy it to benchmarks/results/ with the log). NVLink
# multicast stays off (gpu_preamble.sh).
#   bash benchmarks/run_moe_dispatch_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh
status=0
timeout -k 15 "${TESTS_BUDGET:-280}" $PYTEST tests/test_moe_fused_permute.py tests/test_moe_symm_dispatch.py tests/test_moe_dispatch.py \
  "tests/test_gpu.py::test_gpu_moe_one_step_parity" -k "ep2_triton or not one_step" 2>&1 | tee -a "$log" | tail -15 \
  || status=1
echo "tests done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 15 "${BENCH_BUDGET:-240}" torchrun --standalone --nproc-per-node 2 moe_dispatch.py --iters 10 \
  --graph-reps 5 --tight-bounds 1.25) 2>&1 | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" | tee "$OUT/moe_dispatch.log" | tail -40 || status=1
echo "done at $((SECONDS - start)) s" | tee -a "$log"
exit $status
