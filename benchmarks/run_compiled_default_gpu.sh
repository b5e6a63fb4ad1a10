#!/usr/bin/env bash
# One device call on 2 GPUs (issue 23 item 2: the fast path by default). Under the plan's
# compile="auto" default: every recipe's layout at degree 2 (tests/test_recipes_compiled.py),
# the parity layouts of tests/test_gpu.py and the transformers layouts (tests/test_gpu_hf.py),
# compiled, with their eager counterparts; then the Mixtral-shaped model (2 layers, EP2 over
# FSDP2, 4K tokens a rank) trained by the CLI compiled and eager: tokens/s of each
# ($OUT/moe_compile.jsonl, $OUT/moe_no-compile.jsonl, summarized with the eager run as the
# baseline in $OUT/moe_recipe_compile.json). Logs in $OUT/tests.log, failures as they happen
# in $OUT/failures.log.
#   TESTS_BUDGET=330 bash benchmarks/run_compiled_default_gpu.sh [test files, default the three above]
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_preamble.sh
status=0
tests=("$@"); [ ${#tests[@]} -gt 0 ] || tests=(tests/test_recipes_compiled.py tests/test_gpu.py tests/test_gpu_hf.py)
timeout "${TESTS_BUDGET:-330}" $PYTEST --durations=25 "${tests[@]}" 2>&1 | tee -a "$log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -80 || status=1
echo "tests: $(( SECONDS - start )) s" | tee -a "$log"
for mode in compile no-compile; do
  timeout "${MOE_BUDGET:-110}" python3 -m dtensor_parallel train recipes/mixtral_8x7b.toml --nproc-per-node 2 \
    --use-distributed-optimizer --pipeline-model-parallel-size 1 --tensor-model-parallel-size 1 \
    --expert-model-parallel-size 2 --num-layers 2 --seq-length 4096 --micro-batch-size 1 --global-batch-size 2 \
    --train-iters "${MOE_STEPS:-12}" --lr-warmup-iters 2 --log-interval 1 --metrics "$OUT/moe_$mode.jsonl" "--$mode" 2>&1 \
    | grep -v -i warn | tee -a "$OUT/moe_train.log" | tail -14 || status=1
  echo "moe $mode: $(( SECONDS - start )) s" | tee -a "$log"
done
python3 benchmarks/train_metrics_summary.py --out "$OUT/moe_recipe_compile.json" --baseline no-compile \
  --device "$(python3 -c 'import torch; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))')" \
  --torch "$(python3 -c 'import torch; print(torch.__version__)')" \
  --triton "$(python3 -c 'import triton; print(triton.__version__)')" --date "$(date +%F)" --command "run_compiled_default_gpu.sh: mixtral_8x7b.toml, 2 layers, EP2 over FSDP2" \
  compile="$OUT/moe_compile.jsonl" no-compile="$OUT/moe_no-compile.jsonl" || status=1
exit $status
