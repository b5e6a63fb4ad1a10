#!/usr/bin/env bash
# One device call on 2 GPUs (issue 17, "nothing lost"): the 2-GPU test files that exercise
# the restructured chain (parity of every layout, the Triton SP kernels fused and unfused,
# compile), then training throughput ours vs TorchTitan for 1gpu, fsdp2, tp2sp and cp2,
# compiled, as benchmarks/run_throughput.sh runs it. Everything goes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
start=$SECONDS
status=0
PYTHONPATH="$PWD" timeout -k 10 "${TEST_TIMEOUT:-170}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_gpu.py tests/test_matmul_reduce_scatter.py tests/test_compile.py -x 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -6 || status=1
THROUGHPUT_BUDGET=$(( ${TOTAL_BUDGET:-585} - (SECONDS - start) )) \
  bash benchmarks/run_throughput.sh 1gpu,fsdp2,tp2sp,cp2 --compile on --name throughput_after_issue17 "$@" \
  | tail -25 || status=1
exit $status
