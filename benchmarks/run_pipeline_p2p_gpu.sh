#!/usr/bin/env bash
# One device-tool call on 2 GPUs (nvidia-h200-x2) for issue 24, item 3: the pipeline's P2P on the
# copy engine (plan.pipeline_p2p="copy_engine", dtensor_parallel/pipeline/copy_engine_p2p.py).
#   1. its GPU tests (tests/test_gpu.py -k copy_engine): parity with one GPU for 1F1B and
#      interleaved (v=2) at PP2, compiled, and bit-exactness to the NCCL path for 1F1B,
#      interleaved and ZBV, also with one slot per channel (every send waits for its ack);
#   2. the PP2 benchmark (pipeline.py --profile): 1F1B and interleaved, each with NCCL and with
#      the copy engine, in the same run (the NCCL rows are the baseline), with the GPU time split
#      (compute, NCCL kernels beside compute, the copy engine's wait kernels, peer copies, idle).
# Logs and JSON under $OUT: tests.log, failures.log (if any), pipeline_p2p.log, pipeline_p2p.json.
# About 7-8 minutes: the tests ~2-3, the benchmark ~4-5 (its baseline and 4 compiled rows).
#   bash benchmarks/run_pipeline_p2p_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 10 "${T_TESTS:-220}" $PYTEST tests/test_gpu.py -k "copy_engine" 2>&1 | tail -40 | tee -a "$log"
echo "== tests done at $((SECONDS - start)) s" | tee -a "$log"
cd benchmarks
timeout -k 10 "${T_MAIN:-330}" torchrun --standalone --nproc-per-node 2 pipeline.py --profile --name pipeline_p2p \
  --schedules "${SCHEDULES:-pp2_1f1b_v1,pp2_interleaved_1f1b_v2}" --pipeline-p2p "${P2P:-nccl,copy_engine}" \
  2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*\|USDT\|carveout for matmuls" | tee "$OUT/pipeline_p2p.log"
echo "== benchmark done at $((SECONDS - start)) s"
