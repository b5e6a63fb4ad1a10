#!/usr/bin/env bash
# Issue 22 item 4 on 2 GPUs (device kind nvidia-h200-x2), one device-tool call of about 8
# minutes: the GPU tests of the chunked exchange beside the GEMMs (tests/test_moe_overlap.py:
# the op against one exchange a layer, the model's EP2 parity with the chunked path spied)
# and the symmetric-memory dispatch's own GPU cases (the workspaces are now per lane); the EP
# layer part of benchmarks/moe_dispatch.py (one exchange, chunks x push programs, with and
# without a shared expert, the local grouped SwiGLU and the NCCL exchange, same run, each
# symmetric-memory row profiled: $OUT/moe_dispatch_layer_ep.json); then, with TRAIN_MODES
# (e.g. "triton triton_chunks2"), the Mixtral-shaped model trained by the CLI at EP2, one
# exchange a layer against chunks ($OUT/moe_train_ep2_chunks.json).
#   bash benchmarks/run_moe_overlap_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh
status=0
timeout -k 15 "${TESTS_BUDGET:-200}" $PYTEST tests/test_moe_overlap.py tests/test_moe_symm_dispatch.py 2>&1 \
  | tee -a "$log" | tail -15 || status=1
echo "tests done at $((SECONDS - start)) s" | tee -a "$log"
(cd benchmarks && timeout -k 15 "${BENCH_BUDGET:-150}" torchrun --standalone --nproc-per-node 2 moe_dispatch.py \
  --layer-ep-only --iters 10 --tight-bounds "" --profile-layer ${OVERLAPS:+--overlaps "$OVERLAPS"}) 2>&1 \
  | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" | tee "$OUT/moe_dispatch_layer_ep.log" | tail -12 || status=1
echo "layer bench done at $((SECONDS - start)) s" | tee -a "$log"
if [ -n "${TRAIN_MODES:-}" ]; then  # e.g. "triton triton_chunks2"
  MODES="$TRAIN_MODES" BASELINE=triton GOAL=1.0 SUFFIX=_chunks MOE_BUDGET="${MOE_BUDGET:-150}" \
    bash benchmarks/run_moe_train_gpu.sh || status=1
fi
echo "done at $((SECONDS - start)) s" | tee -a "$log"
exit $status
