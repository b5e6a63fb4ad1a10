#!/usr/bin/env bash
# Issue 11's one-node run (device kind nvidia-h100-x8 or nvidia-h200-x8), in device-tool
# calls of under 10 minutes each. PARTs, in the order given:
#   tests    the world-8 NCCL parity matrix (tests/test_gpu_world8.py: TP8+SP, PP4 x TP2
#            interleaved, CP8 with both kernels, EP8, TP2 x PP2 x CP2)
#   ring     ring attention at CP8, 8K tokens a GPU, 32 / 8 heads, head dim 128, causal
#            (anchor: zigzag ring attention at ~90% of single-GPU flash fwd+bwd on 8 GPUs)
#   moe      MoE dispatch at EP8, 4096 tokens, H7168, 256 experts, top-8 (anchor: DeepEP
#            intranode dispatch / combine ~153 / 158 GB/s), then issue 22's EP8 rows: 8192
#            tokens a GPU, H4096 top-2 and H7168 top-8 with E 64 (and 256), symmetric memory
#            against NCCL all_to_all_single in the same run (receive bound 2 x T*k), and the
#            EP8 MoE layer (E 8: one expert a rank), also with its exchange in chunks beside the
#            GEMMs (moe_dispatch.py's default --overlaps: issue 22 item 4, where 7/8 of the rows
#            cross NVLink, against EP2's half)
#   sp       the SP reduce-scatter and the fused row-parallel matmul at TP8
#   memory   the 70B / 405B recipes' layers at their real sizes and TP degrees, cut to fit
#            the node, measured peak against the estimator (benchmarks/memory_estimate.py)
# Usage: bash benchmarks/run_8gpu.sh tests ring
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
status=0
for part in "$@"; do
  case $part in
    tests) NPROC=8 GPU_TESTS=tests/test_gpu_world8.py TEST_TIMEOUT=300 bash benchmarks/run_gpu.sh "" || status=1
           mv "$OUT/gpu_tests.log" "$OUT/gpu8_tests.log" ;;
    ring) NPROC=8 BENCH_TIMEOUT=200 bash benchmarks/run_gpu.sh - "ring_attention.py --tokens 8192" || status=1 ;;
    moe) NPROC=8 BENCH_TIMEOUT=200 bash benchmarks/run_gpu.sh - \
           "moe_dispatch.py --no-deepseek --no-layer --tokens 4096 --ep-shape 7168,256,8" || status=1
         mv "$OUT/moe_dispatch.json" "$OUT/moe_dispatch_ep8_anchor.json" 2>/dev/null
         NPROC=8 BENCH_TIMEOUT=400 bash benchmarks/run_gpu.sh - \
           "moe_dispatch.py --no-deepseek --tokens 8192 --ep-shape 4096,64,2;7168,64,8;7168,256,8 --recv-bound 2" \
           || status=1
         mv "$OUT/moe_dispatch.json" "$OUT/moe_dispatch_ep8.json" 2>/dev/null ;;
    sp) NPROC=8 BENCH_TIMEOUT=200 bash benchmarks/run_gpu.sh - sp_reduce_scatter.py || status=1 ;;
    memory) NPROC=8 BENCH_TIMEOUT=200 bash benchmarks/run_gpu.sh - memory_estimate.py || status=1 ;;
    *) echo "unknown part $part (tests, ring, moe, sp, memory)"; status=2 ;;
  esac
done
exit $status
