#!/usr/bin/env bash
# One device-tool call on 2 GPUs for attention and the ring (issue 21). GPU 0: the kernels'
# GPU tests, then the kernel benchmark with its tile sweep. GPU 1 meanwhile: the "sdpa"
# backend's and the document masks' GPU tests, the backend benchmark behind the "auto"
# table, and the kernel benchmark with the backward's TMA loads. Then on both: the CP2 model tests and the ring
# benchmark. Each stage has its own timeout, so a slow one leaves the others' results.
# Logs and JSON go to $OUT (8 files, the device tool's limit: tests.log also holds the
# backend benchmark's output). RING_ONLY=1 keeps the tests and the ring benchmark and skips
# the kernel and backend benchmarks (a change to the ring, measured in a shorter call).
#   bash benchmarks/run_attention_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings, PYTHONPATH, $log, $PYTEST, $start
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "${T_KERNEL_TESTS:-240}" $PYTEST tests/test_flash_attention.py > "$OUT/kernel_tests.txt" 2>&1
  [ -n "${RING_ONLY:-}" ] || (cd benchmarks && timeout -k 5 "${T_KERNEL_BENCH:-200}" \
    python3 flash_attention_kernel.py --sweep) > "$OUT/flash_attention_kernel.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 "${T_BLOCK_TESTS:-150}" $PYTEST tests/test_sdpa_blocks.py tests/test_flash_attention_documents.py \
    tests/test_flash_attention_positions.py > "$OUT/block_tests.txt" 2>&1
  [ -n "${RING_ONLY:-}" ] || (cd benchmarks && timeout -k 5 "${T_BACKENDS:-120}" \
    python3 attention_backends.py --device cuda --iters 5) > "$OUT/attention_backends.txt" 2>&1
  [ -n "${RING_ONLY:-}" ] || (cd benchmarks && timeout -k 5 "${T_KERNEL_TMA_BWD:-120}" \
    python3 flash_attention_kernel.py --tma-backward) > "$OUT/flash_attention_kernel_tma_backward.txt" 2>&1
) &
wait
cat "$OUT/kernel_tests.txt" "$OUT/block_tests.txt" >> "$log"
[ -n "${RING_ONLY:-}" ] || cat "$OUT/attention_backends.txt" >> "$log"
[ -n "${RING_ONLY:-}" ] || cat "$OUT/flash_attention_kernel_tma_backward.txt" >> "$OUT/flash_attention_kernel.log"
rm -f "$OUT"/*.txt
echo "== stage 1 done at $((SECONDS - start)) s" | tee -a "$log"
timeout -k 5 "${T_CP_TESTS:-150}" $PYTEST tests/test_gpu.py -k "(cp2 and llama) or packed" >> "$log" 2>&1
echo "== cp2 tests done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 10 "${T_RING:-200}" torchrun --standalone --nproc-per-node 2 ring_attention.py --tokens 8192 32768) 2>&1 \
  | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" > "$OUT/ring_attention.log"
echo "== ring done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "passed\|failed\|error" "$log" | tail -8
for f in flash_attention_kernel ring_attention; do [ -f "$OUT/$f.log" ] && tail -n 2 "$OUT/$f.log"; done
