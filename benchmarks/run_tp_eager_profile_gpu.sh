#!/usr/bin/env bash
# One device-tool call on 2 GPUs for issue 24, item 2: TP2+SP scaling eager (ours, torch and
# triton kernels, against ours on one GPU, same run), then a profile of the compiled TP2+SP
# step with the triton kernels (NCCL and kernel time per rank, top kernels). Needs carry: [".whl"].
#   bash benchmarks/run_tp_eager_profile_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
start=$SECONDS
THROUGHPUT_BUDGET=${T_EAGER:-260} bash benchmarks/run_throughput.sh 1gpu,tp2sp --compile off --frameworks ours \
  --kernels torch,triton --name train_throughput_tp_eager 2>&1 | grep "ok \|target\|failed\|wrote"
echo "== eager done at $((SECONDS - start)) s"
THROUGHPUT_BUDGET=${T_PROFILE:-200} bash benchmarks/run_throughput.sh tp2sp --compile on --frameworks ours \
  --kernels triton --profile tp2sp --name train_throughput_tp_profile 2>&1 | grep -v "^\[.*step [0-9]" | tail -60
echo "== profile done at $((SECONDS - start)) s"
