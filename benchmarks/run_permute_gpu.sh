#!/usr/bin/env bash
# Issue 22 item 3 on ONE GPU (device kind nvidia-h200), one device-tool call of about 4
# minutes: the GPU tests of the local permute kernels (bf16 at the issue's shapes, both
# routing paths, forward+backward against torch, a CUDA-graph capture of the whole
# forward+backward), then part 1 of the benchmark alone (no torchrun): per call, host time,
# kernel time and CUDA-graph replay of the Triton permute/unpermute against a copy of the
# same bytes. Results: $OUT/moe_permute.json and $OUT/moe_permute.log (copy them to
# benchmarks/results/ with tests.log).
#   bash benchmarks/run_permute_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, PYTHONPATH, $log, $PYTEST, $start
status=0
timeout -k 10 "${TESTS_BUDGET:-150}" $PYTEST tests/test_moe_fused_permute.py tests/test_moe_dispatch.py 2>&1 \
  | tee -a "$log" | tail -15 || status=1
echo "tests done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 10 "${BENCH_BUDGET:-300}" python3 moe_dispatch.py --part permute_unpermute \
  --iters 20 --graph-reps 10) 2>&1 | tee "$OUT/moe_permute.log" | grep "'name'" || status=1
echo "done at $((SECONDS - start)) s" | tee -a "$log"
exit $status
