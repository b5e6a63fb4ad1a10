#!/usr/bin/env bash
# One device-tool call: versions, the GPU tests (NCCL, 2 GPUs), and the CPU suite under the
# GPU machine's torch (2.11) with the GPUs hidden, so both torch versions are checked.
# Logs go to $OUT (or ./gpu_out). Usage: bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
status=0
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/cpu_tests.log" | tail -15 || status=1
exit $status
