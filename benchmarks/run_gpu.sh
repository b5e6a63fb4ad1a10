#!/usr/bin/env bash
# One device-tool call: the GPU tests matching a pytest -k expression, then benchmark
# scripts, each under torchrun on 2 GPUs. Results and logs go to $OUT.
#   bash benchmarks/run_gpu.sh "pp2" pipeline.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
filter=${1:-}; shift || true
status=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
if [ -n "$filter" ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -k "$filter" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -8 || status=1
fi
for bench in "$@"; do
  (cd benchmarks && torchrun --standalone --nproc-per-node 2 "$bench") 2>&1 | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" | tee "$OUT/${bench%.py}.log" | tail -12 || status=1
done
exit $status
