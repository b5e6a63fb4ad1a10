#!/usr/bin/env bash
# Issue 10's four-GPU run (and what else needs its GPUs), in device-tool calls of under 10
# minutes each. PARTs, run in the order given:
#   tests       the world-4 NCCL parity matrix (tests/test_gpu_world4.py)
#   memory      the memory estimator against measured peaks, at 2 and at 4 GPUs (issue 7)
#   memory2     the same, the 2-GPU layouts only
#   ring        ring attention at CP4 (8K tokens a GPU), baselines in the same run
#   sp          the SP reduce-scatter and fused matmul GPU tests, then their benchmark at TP2 and TP4
#   moe         MoE dispatch at EP4
#   throughput  benchmarks/train_throughput.py for TP4+SP, PP4 and FSDP4 against TorchTitan
#   pipeline    PP4 schedules (issue 24): 1F1B, interleaved v=2 and ZBV, each with NCCL P2P and
#               with the copy engine (plan.pipeline_p2p); 16 layers, 16 micro-batches, the GPU-time
#               split of each
# Usage (device tool, kind nvidia-h100-x4): bash benchmarks/run_4gpu.sh tests ring
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
status=0
memory() {  # memory N: the estimator's layouts of world N on the first N GPUs
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(($1 - 1))) NPROC=$1 BENCH_TIMEOUT=150 \
    bash benchmarks/run_gpu.sh - memory_estimate.py || status=1
  mv "$OUT/memory_estimate.log" "$OUT/memory_estimate_$1gpu.log"
}
for part in "$@"; do
  case $part in
    memory) memory 2; memory 4 ;;
    memory2) memory 2 ;;
    tests) NPROC=4 GPU_TESTS=tests/test_gpu_world4.py TEST_TIMEOUT=240 bash benchmarks/run_gpu.sh "" || status=1
           mv "$OUT/gpu_tests.log" "$OUT/gpu4_tests.log" ;;
    ring) NPROC=4 BENCH_TIMEOUT=150 bash benchmarks/run_gpu.sh - "ring_attention.py --tokens 8192" || status=1 ;;
    sp) GPU_TESTS="tests/test_sp_reduce_scatter.py tests/test_matmul_reduce_scatter.py" TEST_TIMEOUT=150 \
          bash benchmarks/run_gpu.sh "TestGPU" || status=1
        mv "$OUT/gpu_tests.log" "$OUT/sp_gpu_tests.log"
        for n in 2 4; do
          CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) NPROC=$n BENCH_TIMEOUT=150 \
            bash benchmarks/run_gpu.sh - sp_reduce_scatter.py || status=1
          mv "$OUT/sp_reduce_scatter.log" "$OUT/sp_reduce_scatter_tp$n.log"
        done ;;
    moe) NPROC=4 BENCH_TIMEOUT=120 bash benchmarks/run_gpu.sh - "moe_dispatch.py --no-deepseek" || status=1 ;;
    throughput) bash benchmarks/run_throughput.sh tp4sp,pp4,fsdp4 || status=1 ;;
    pipeline) NPROC=4 BENCH_TIMEOUT=540 bash benchmarks/run_gpu.sh - \
                "pipeline.py --layers 16 --microbatches 16 --profile --pipeline-p2p nccl,copy_engine --name pipeline_pp4 --schedules pp4_1f1b_v1,pp4_interleaved_1f1b_v2,pp4_zbv_v2" || status=1 ;;
    *) echo "unknown part $part (tests, memory, memory2, ring, sp, moe, throughput, pipeline)"; status=2 ;;
  esac
done
exit $status
