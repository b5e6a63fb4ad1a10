#!/usr/bin/env bash
# One device-tool call on 2 GPUs for the flash-attention backward (issue 21, item 1): the
# split kernels against the one-pass kernel with atomic dQ (flash_attention_bwd_fused.py),
# each with and without TMA loads and bulk TMA reductions. GPU 0: the kernels' GPU tests,
# then the d128 kernel benchmark with the backward tile sweeps; GPU 1: the d64 benchmark and
# sweeps. Then on both: the CP2 model tests with the fused backward, and the ring benchmark
# with it (the split backward's ring numbers are in benchmarks/results/ring_attention.json).
# Each stage has its own timeout. Logs and JSON go to $OUT.
#   bash benchmarks/run_flash_backward_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings, PYTHONPATH, $log, $PYTEST, $start
bench="python3 flash_attention_kernel.py --sweep dkdv,dq,fused"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "${T_KERNEL_TESTS:-150}" $PYTEST tests/test_flash_attention.py > "$OUT/kernel_tests.txt" 2>&1
  (cd benchmarks && timeout -k 5 "${T_BENCH:-220}" $bench --head-dims 128 --name flash_backward_d128) \
    > "$OUT/flash_backward_d128.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  (cd benchmarks && timeout -k 5 "$(( ${T_KERNEL_TESTS:-150} + ${T_BENCH:-220} ))" $bench --head-dims 64 \
    --name flash_backward_d64) > "$OUT/flash_backward_d64.log" 2>&1
) &
wait
cat "$OUT/kernel_tests.txt" >> "$log"; rm -f "$OUT/kernel_tests.txt"
echo "== stage 1 done at $((SECONDS - start)) s" | tee -a "$log"
export DTP_FLASH_BWD=fused
timeout -k 5 "${T_CP_TESTS:-90}" $PYTEST tests/test_gpu.py -k "cp2 and llama and triton" >> "$log" 2>&1
echo "== cp2 tests (fused backward) done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 10 "${T_RING:-150}" torchrun --standalone --nproc-per-node 2 ring_attention.py \
  --tokens 8192 32768 --name ring_attention_fused_bwd) 2>&1 | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" > "$OUT/ring_attention_fused_bwd.log"
echo "== ring done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "passed\|failed\|error" "$log" | tail -8
for f in flash_backward_d128 flash_backward_d64 ring_attention_fused_bwd; do tail -n 2 "$OUT/$f.log"; done
