#!/usr/bin/env bash
# One device-tool call (issue 21, item 1): where the flash-attention backward's time goes,
# kernel by kernel, and three candidates (warp specialization, two streams, a program per
# query head), on GPU 0; the kernels' GPU tests meanwhile on GPU 1 when there is one. JSON
# and logs in $OUT.
#   bash benchmarks/run_flash_probe_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings, PYTHONPATH, $log, $PYTEST, $start
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then
  (CUDA_VISIBLE_DEVICES=1 timeout -k 5 "${T_TESTS:-300}" $PYTEST tests/test_flash_attention.py >> "$log" 2>&1) &
fi
(cd benchmarks && CUDA_VISIBLE_DEVICES=0 timeout -k 5 "${T_PROBE:-420}" python3 flash_backward_probe.py "$@") \
  > "$OUT/flash_backward_probe.log" 2>&1
echo "== probe done at $((SECONDS - start)) s" | tee -a "$log"
wait
grep -h "passed\|failed\|error" "$log" | tail -4
grep -v "^{" "$OUT/flash_backward_probe.log" | tail -20
