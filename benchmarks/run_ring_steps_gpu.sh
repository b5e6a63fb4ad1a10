#!/usr/bin/env bash
# One device-tool call on 1 GPU for the ring's compute (issue 21): the attention kernels' and the
# "sdpa" blocks' GPU tests, then benchmarks/ring_steps.py (each CP2 rank's ring steps without
# NCCL, against the one-GPU kernels). With BEFORE=DIR (an older tree's packages, made with
# `git archive REV dtensor_parallel triton_kernels | tar -x -C DIR`), the benchmark alternates
# that tree and this one, two rounds each, in the same call. Logs and JSON go to $OUT.
#   BEFORE=ab_before bash benchmarks/run_ring_steps_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings, PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-240}" $PYTEST tests/test_flash_attention.py tests/test_sdpa_blocks.py \
  tests/test_flash_attention_documents.py >> "$log" 2>&1
echo "== attention GPU tests done at $((SECONDS - start)) s" | tee -a "$log"
here=$PWD
for round in 1 2; do
  if [ -n "${BEFORE:-}" ]; then
    (cd benchmarks && PYTHONPATH="$here/$BEFORE:$PYTHONPATH" timeout -k 5 "${T_BENCH:-150}" \
      python3 ring_steps.py --label "before$round") >> "$OUT/ring_steps.log" 2>&1
  fi
  (cd benchmarks && timeout -k 5 "${T_BENCH:-150}" python3 ring_steps.py --label "after$round") \
    >> "$OUT/ring_steps.log" 2>&1
  echo "== ring steps round $round done at $((SECONDS - start)) s" | tee -a "$log"
done
grep -h "passed\|failed\|error" "$log" | tail -6
grep -h "ring_rank" "$OUT/ring_steps.log" | python3 -c "
import ast, sys
for line in sys.stdin:
    r = ast.literal_eval(line)
    print(r['label'], r['tokens'], r['impl'], round(r['fwd_ms'], 3), round(r['fwd_bwd_ms'], 3), round(r['compute_efficiency_fwd_bwd'], 3))"
