#!/usr/bin/env bash
# One device call: training throughput of ours against TorchTitan (benchmarks/train_throughput.py).
# Installs the carried TorchTitan wheels (.whl/) into /tmp/site, prints versions, runs the driver
# with a time budget that ends within ~9 minutes. Results, logs and a summary go to $OUT:
#   train_throughput.json, train_throughput.log (per-config logs), train_throughput_summary.txt
#   bash benchmarks/run_throughput.sh                                  # 1gpu,fsdp2,tp2sp,pp2,cp2
#   bash benchmarks/run_throughput.sh 1gpu,fsdp2,tp2sp --compile off --frameworks ours,torchtitan
#   bash benchmarks/run_throughput.sh tp4sp,pp4,fsdp4 --compile off    # on 4 GPUs
#   bash benchmarks/run_throughput.sh tp2sp --profile tp2sp --compile off
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
summary="$OUT/train_throughput_summary.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v "WARNING: Running pip as" | tee "$summary"
export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
layouts=${1:-1gpu,fsdp2,tp2sp,pp2,cp2}; shift || true
python3 - <<'PY' 2>&1 | tee -a "$summary"
import importlib.metadata as md, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print({p: md.version(p) for p in ("torchtitan", "tyro", "torchdata", "typeguard", "docstring_parser")})
PY
budget=$(( ${THROUGHPUT_BUDGET:-530} - (SECONDS - start) ))
python3 benchmarks/train_throughput.py --layouts "$layouts" --budget "$budget" "$@" 2>&1 | tee -a "$summary"
exit "${PIPESTATUS[0]}"
