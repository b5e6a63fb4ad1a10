#!/usr/bin/env bash
# One device-tool call on one GPU: the CUDA paths of the ring's block kernels (the "sdpa"
# backend's fused ops, the Triton document masks) and the backend benchmark that the
# "auto" table of context_parallel/backend_choice.py comes from. Logs and JSON go to $OUT.
#   bash benchmarks/run_attention_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import torch, triton, torch._dynamo.config as c; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'skip_fwd_side_effects_in_bwd_under_checkpoint' in dir(c))"
timeout -k 5 "${TEST_TIMEOUT:-45}" python3 -m pytest -q -x -m gpu tests/test_sdpa_blocks.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/sdpa_gpu_tests.log" | tail -6
(cd benchmarks && timeout -k 5 "${BENCH_TIMEOUT:-60}" python3 attention_backends.py --device cuda --iters 5) 2>&1 \
  | tee "$OUT/attention_backends.log" | tail -5
timeout -k 5 "${TEST_TIMEOUT:-45}" python3 -m pytest -q -x -m gpu tests/test_flash_attention_documents.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/documents_gpu_tests.log" | tail -6
