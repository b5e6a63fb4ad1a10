#!/usr/bin/env bash
# One device call (issue 16, item 4): the README's first command on a GPU machine, as written
# (the tiny CPU run, 4 gloo ranks, although GPUs are visible), then the same recipe on the
# GPUs (--device cuda, one rank a GPU). The machine has torch >= 2.11 and no package index,
# so the package is installed without build isolation and without dependencies.
# Logs and the metrics of both runs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'gpus')"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "Running pip as" | tee "$OUT/install.log"
status=0
time dtensor-parallel train recipes/debug.toml --nproc-per-node 4 --metrics "$OUT/cpu_metrics.jsonl" \
  2>&1 | tee "$OUT/cpu_run.log" | grep -E "step +(1|10|50|100)/|error|Error" || status=1
time dtensor-parallel train recipes/debug.toml --nproc-per-node "$(python3 -c 'import torch; print(torch.cuda.device_count())')" \
  --device cuda --metrics "$OUT/gpu_metrics.jsonl" 2>&1 | tee "$OUT/gpu_run.log" | grep -E "step +(1|10|50|100)/|mesh|error|Error" || status=1
exit $status
