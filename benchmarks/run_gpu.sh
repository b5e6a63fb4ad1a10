#!/usr/bin/env bash
# One device-tool call: the GPU tests matching a pytest -k expression, then benchmark
# scripts (each with its arguments, quoted as one word), each under torchrun on NPROC GPUs
# (default 2). GPU_TESTS names the test file (default tests/test_gpu.py); TEST_TIMEOUT and
# BENCH_TIMEOUT (seconds) bound the tests and each benchmark. Logs go to $OUT.
#   bash benchmarks/run_gpu.sh "pp2" pipeline.py
#   NPROC=4 GPU_TESTS=tests/test_gpu_world4.py bash benchmarks/run_gpu.sh "" "ring_attention.py --tokens 8192"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
NPROC=${NPROC:-2}; GPU_TESTS=${GPU_TESTS:-tests/test_gpu.py}
filter=${1-}; shift || true
status=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
if [ "$filter" != "-" ]; then  # "-" skips the tests; "" runs them all
  # shellcheck disable=SC2086  # GPU_TESTS may name several files
  timeout -k 15 "${TEST_TIMEOUT:-3600}" python3 -m pytest -q -m gpu $GPU_TESTS ${filter:+-k "$filter"} -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -8 || status=1
fi
for bench in "$@"; do
  name=${bench%%.py*}
  # shellcheck disable=SC2086  # the benchmark's arguments are meant to split
  (cd benchmarks && timeout -k 15 "${BENCH_TIMEOUT:-3600}" torchrun --standalone --nproc-per-node "$NPROC" $bench) 2>&1 \
    | grep -v "^W1\|OMP_NUM_THREADS\|\*\*\*\*" | tee "$OUT/${name}.log" | tail -12 || status=1
done
exit $status
