#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issue 24, item 3: the PP2 schedules (gpipe, 1f1b,
# interleaved v=2, zbv) with the GPU time split of each (pipeline.py --profile: compute
# kernels, NCCL kernels and their overlap with compute, idle), each under NCCL's default and
# under the variants in $VARIANTS (P2P_CTAS:CARVEOUT: the pp communicator's CTA cap and
# plan.pipeline_sm_carveout), which tell whether the P2P kernels' SMs slow the compute.
# JSON: $OUT/pipeline.json.
#   VARIANTS=0:0,2:2 SCHEDULES=pp2_1f1b_v1,pp2_interleaved_1f1b_v2 bash benchmarks/run_pipeline_profile_gpu.sh
# P2P=nccl,copy_engine adds each row with the copy-engine P2P (plan.pipeline_p2p) beside the NCCL one
# (benchmarks/run_pipeline_p2p_gpu.sh is that call, with its GPU tests first).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
cd benchmarks
timeout -k 10 "${T_MAIN:-500}" torchrun --standalone --nproc-per-node 2 pipeline.py --profile \
  --schedules "${SCHEDULES:-pp2_gpipe_v1,pp2_1f1b_v1,pp2_interleaved_1f1b_v2,pp2_zbv_v2}" --variants "${VARIANTS:-0:0,2:2}" \
  --pipeline-p2p "${P2P:-nccl}" \
  2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*\|USDT\|carveout for matmuls" | tee "$OUT/pipeline.log"
echo "== schedules done at $((SECONDS - start)) s"
