#!/usr/bin/env bash
# One device call on 2 GPUs (issue 22, item 5's end-to-end row): a Mixtral-shaped model (4
# layers, dim 4096, 8 experts of 14336, top-2, bf16, selective recompute, compiled by the
# default) trained by the CLI at EP2 over FSDP2, 8K tokens a rank, with the Triton dispatch
# (symmetric-memory exchange) and with our NCCL path (kernels moe_dispatch=torch), in the
# same call: tokens/s of each ($OUT/moe_train_<mode>.jsonl), summarized with the NCCL run as
# the baseline and the issue's goal 1.3 in $OUT/moe_train_ep2.json. Then, if PERMUTE=1, the
# permute kernels' GPU tests and benchmark part on one GPU (benchmarks/run_permute_gpu.sh).
#   bash benchmarks/run_moe_train_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh
status=0
# MODES: triton (symmetric memory), torch (NCCL), triton_chunks<C> (symmetric memory, each MoE layer's
# exchange in C chunks beside its GEMMs: ParallelPlan.moe_dispatch_chunks); BASELINE: the ratio's denominator.
MODES=${MODES:-"triton torch"}
BASELINE=${BASELINE:-torch}
pairs=()
for mode in $MODES; do
  kernel=${mode%%_chunks*}
  chunks=1
  [[ $mode == *_chunks* ]] && chunks=${mode##*_chunks}
  timeout "${MOE_BUDGET:-170}" python3 -m dtensor_parallel train recipes/mixtral_8x7b.toml --nproc-per-node 2 \
    --use-distributed-optimizer --pipeline-model-parallel-size 1 --tensor-model-parallel-size 1 \
    --expert-model-parallel-size 2 --num-layers 4 --seq-length 8192 --micro-batch-size 1 --global-batch-size 2 \
    --kernels "moe_dispatch=$kernel" --moe-dispatch-chunks "$chunks" --train-iters "${MOE_STEPS:-14}" \
    --lr-warmup-iters 2 --log-interval 1 \
    --metrics "$OUT/moe_train_$mode.jsonl" 2>&1 | grep -v -i warn | tee -a "$OUT/moe_train.log" | tail -6 || status=1
  echo "moe $mode: $(( SECONDS - start )) s" | tee -a "$log"
  pairs+=("$mode=$OUT/moe_train_$mode.jsonl")
done
python3 benchmarks/train_metrics_summary.py --out "$OUT/moe_train_ep2${SUFFIX:-}.json" --baseline "$BASELINE" \
  --goal "${GOAL:-1.3}" --skip 4 \
  --device "$(python3 -c 'import torch; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))')" \
  --torch "$(python3 -c 'import torch; print(torch.__version__)')" \
  --triton "$(python3 -c 'import triton; print(triton.__version__)')" --date "$(date +%F)" \
  --command "run_moe_train_gpu.sh: mixtral_8x7b.toml, 4 layers, EP2 over FSDP2, 8K tokens a rank, compiled; modes $MODES (triton: symmetric memory, torch: NCCL all-to-all, _chunks<C>: moe_dispatch_chunks C); baseline $BASELINE" \
  "${pairs[@]}" || status=1
if [ "${PERMUTE:-0}" = 1 ] && [ -f benchmarks/run_permute_gpu.sh ]; then
  bash benchmarks/run_permute_gpu.sh || status=1
fi
exit $status
