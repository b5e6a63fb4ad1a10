#!/usr/bin/env bash
# One device-tool call on 2 GPUs: the output head as an FSDP unit of its own
# (data_parallel.py), end to end on the FSDP layouts the throughput benchmark has (fsdp2 and
# cp2, whose weights FSDP shards over the cp ranks), compiled: the GPU parity cases of those
# layouts, then ours against TorchTitan, then ours again with the head in the root unit
# (DTP_FSDP_HEAD_IN_ROOT=1: the layout before), in the same call. Needs carry: [".whl"].
#   bash benchmarks/run_fsdp_head_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh  # $OUT, NCCL settings (NVLink multicast off), PYTHONPATH, $log, $PYTEST, $start
timeout -k 5 "${T_TESTS:-120}" $PYTEST tests/test_gpu.py -k "fsdp or cp2_triton_selective" >> "$log" 2>&1
echo "== GPU tests done at $((SECONDS - start)) s" | tee -a "$log"
grep -h "passed\|failed" "$log" | tail -3
THROUGHPUT_BUDGET=$(( ${T_FIRST:-410} - (SECONDS - start) )) bash benchmarks/run_throughput.sh fsdp2,cp2 \
  --frameworks ours,torchtitan --kernels torch,triton --compile on 2>&1 | tail -n 14
DTP_FSDP_HEAD_IN_ROOT=1 THROUGHPUT_BUDGET=$(( ${T_TOTAL:-585} - (SECONDS - start) )) bash benchmarks/run_throughput.sh \
  fsdp2,cp2 --frameworks ours --kernels torch,triton --compile on --name train_throughput_head_in_root 2>&1 | tail -n 8
echo "== done at $((SECONDS - start)) s"
