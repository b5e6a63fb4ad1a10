#!/usr/bin/env bash
# Issue 10's four-GPU run, in device-tool calls of under 10 minutes each. PART:
#   tests       the world-4 NCCL parity matrix (tests/test_gpu_world4.py)
#   kernels     ring attention at CP4, SP reduce-scatter (and the fused matmul) at TP4,
#               MoE dispatch at EP4, each with its baselines measured in the same run
#   memory      the memory estimator against measured peaks, at 2 and at 4 GPUs (issue 7)
#   throughput  benchmarks/train_throughput.py for TP4+SP, PP4 and FSDP4 against TorchTitan
# Usage (device tool, kind nvidia-h100-x4): bash benchmarks/run_4gpu.sh tests kernels
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
status=0
for part in "$@"; do
  case $part in
    memory) for n in 2 4; do
              CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) NPROC=$n BENCH_TIMEOUT=150 \
                bash benchmarks/run_gpu.sh - memory_estimate.py || status=1
              mv "$OUT/memory_estimate.log" "$OUT/memory_estimate_${n}gpu.log"
            done ;;
    tests) NPROC=4 GPU_TESTS=tests/test_gpu_world4.py TEST_TIMEOUT=240 bash benchmarks/run_gpu.sh "" || status=1
           mv "$OUT/gpu_tests.log" "$OUT/gpu4_tests.log" ;;
    kernels) NPROC=4 BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bash benchmarks/run_gpu.sh - "ring_attention.py --tokens 8192 32768" \
               sp_reduce_scatter.py "moe_dispatch.py --no-deepseek" || status=1 ;;
    throughput) bash benchmarks/run_throughput.sh tp4sp,pp4,fsdp4 || status=1 ;;
    *) echo "unknown part $part (memory, tests, kernels, throughput)"; status=2 ;;
  esac
done
exit $status
