"""Megatron-Core launch flags -> our config overlay, degrees and ParallelPlan (no distributed)."""

from __future__ import annotations

import re
import warnings

import pytest

from dtensor_parallel.mesh import ParallelDims
from dtensor_parallel.plan import ParallelPlan
from dtensor_parallel.trainer import megatron_args
from dtensor_parallel.trainer.megatron_args import (
    deep_merge,
    parse_megatron_args,
    plan_and_degrees_from_megatron,
)

# Llama-3-70B as a Megatron-LM user launches it (pretrain_gpt.py), pasted from a shell script.
LLAMA3_70B = r"""
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --context-parallel-size 1 \
    --sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --micro-batch-size 1 --global-batch-size 1024 --seq-length 8192 --max-position-embeddings 8192 \
    --recompute-granularity selective --bf16 --use-mcore-models --transformer-impl local \
    --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64 \
    --group-query-attention --num-query-groups 8 --swiglu --normalization RMSNorm \
    --norm-epsilon 1e-5 --disable-bias-linear --untie-embeddings-and-output-weights \
    --position-embedding-type rope --rotary-base 500000 --use-flash-attn \
    --attention-backend flash --no-masked-softmax-fusion --vocab-size 128256 \
    --train-iters 250000 --lr 1.5e-4 --min-lr 1.5e-5 --lr-warmup-iters 2000 \
    --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
    --adam-eps 1e-8 --clip-grad 1.0 --seed 1234 \
    --data-path /data/llama3/text_document --log-interval 10 --profile --profile-ranks 0 8 \
    --save /ckpt/70b --load /ckpt/70b --save-interval 1000
"""

LLAMA3_70B_OVERLAY = {
    "parallel": {"tp": 8, "pp": 1, "cp": 1, "dp_shard": -1, "dp_replicate": 1},
    "plan": {"sequence_parallel": True, "recompute": "selective", "mixed_precision": "bf16"},
    "training": {"micro_batch_size": 1, "global_batch_size": 1024, "seq_len": 8192,
                 "steps": 250000, "lr": 1.5e-4, "min_lr": 1.5e-5, "warmup_steps": 2000,
                 "lr_decay_style": "cosine", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
                 "eps": 1e-8, "grad_clip": 1.0, "seed": 1234},
    "model": {"n_layers": 80, "dim": 8192, "ffn_hidden_dim": 28672, "n_heads": 64,
              "n_kv_heads": 8, "max_seq_len": 8192, "rope_theta": 500000.0, "norm_eps": 1e-5,
              "vocab_size": 128256},
    "data": {"path": "/data/llama3/text_document"},
    "logging": {"log_interval": 10, "profile": True, "profile_ranks": [0, 8]},
    "checkpoint": {"save": "/ckpt/70b", "load": "/ckpt/70b", "save_interval": 1000},
}


def test_llama3_70b_launch_line_maps_exactly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete Llama line raises no warning
        assert parse_megatron_args(LLAMA3_70B) == LLAMA3_70B_OVERLAY
        assert parse_megatron_args(LLAMA3_70B.replace("\\", "").split()) == LLAMA3_70B_OVERLAY


def test_equals_form_matches_space_form():
    spaced = ["--tensor-model-parallel-size", "4", "--lr", "3e-4", "--data-path", "/d/x",
              "--profile-ranks", "1", "--kernels", "triton", "--resume", "auto"]
    eq = ["--tensor-model-parallel-size=4", "--lr=3e-4", "--data-path=/d/x",
          "--profile-ranks=1", "--kernels=triton", "--resume=auto"]
    assert parse_megatron_args(eq) == parse_megatron_args(spaced)
    assert parse_megatron_args(eq)["parallel"]["tp"] == 4
    assert parse_megatron_args(eq)["logging"]["profile_ranks"] == [1]


def test_our_own_flags():
    cfg = parse_megatron_args("--kernels auto --compile --metrics /tmp/m.jsonl --resume none "
                              "--mock-data --recompute-granularity full --recompute-method block "
                              "--recompute-num-layers 4 --num-virtual-stages-per-pipeline-rank 2")
    assert cfg == {
        "plan": {"kernels": "auto", "compile": True, "recompute": "full",
                 "recompute_method": "block", "recompute_num_layers": 4, "virtual_stages": 2},
        "logging": {"metrics_path": "/tmp/m.jsonl"},
        "checkpoint": {"resume": "none"},
        "data": {"mock": True},
    }
    assert parse_megatron_args("--num-layers-per-virtual-pipeline-stage 5")["plan"] == {
        "layers_per_virtual_stage": 5}


def test_data_parallel_mapping():
    ddp = {"dp_replicate": -1, "dp_shard": 1}
    fsdp = {"dp_shard": -1, "dp_replicate": 1}
    assert parse_megatron_args("--tensor-model-parallel-size 2")["parallel"] == {"tp": 2, **ddp}
    assert parse_megatron_args("--context-parallel-size 2")["parallel"] == {"cp": 2, **ddp}
    assert parse_megatron_args("--use-distributed-optimizer")["parallel"] == fsdp
    assert parse_megatron_args("--use-megatron-fsdp")["parallel"] == fsdp
    for s in ("optim", "optim_grads", "optim_grads_params"):
        assert parse_megatron_args(f"--data-parallel-sharding-strategy {s}")["parallel"] == fsdp
    assert parse_megatron_args("--data-parallel-sharding-strategy no_shard")["parallel"] == ddp
    assert "parallel" not in parse_megatron_args("--lr 1e-4")  # no parallel flag: no opinion
    # each mapping is a valid ParallelDims
    for dp in (ddp, fsdp):
        dims = ParallelDims(tp=8, world_size=64, **dp)
        assert dims.dp == 8


def test_unknown_flag_suggests_closest():
    with pytest.raises(ValueError, match=r"--tensor-parallel-size.*--tensor-model-parallel-size"):
        parse_megatron_args("--tensor-parallel-size 8")
    with pytest.raises(ValueError, match=r"--data-parallel-size"):  # not a Megatron flag
        parse_megatron_args("--data-parallel-size 8")
    with pytest.raises(ValueError, match="unexpected argument 'pretrain_gpt.py'"):
        parse_megatron_args("pretrain_gpt.py --bf16")


@pytest.mark.parametrize("argv, match", [
    ("--fp16", "fp16 with loss scaling is unsupported; use --bf16"),
    ("--data-path 0.3 /d/a 0.7 /d/b", "--data-path.*weighted"),
    ("--data-path /d/a /d/b", "--data-path.*one path"),
    ("--num-virtual-stages-per-pipeline-rank 2 --num-layers-per-virtual-pipeline-stage 4",
     "cannot both be given"),
    ("--normalization LayerNorm", "--normalization 'LayerNorm'.*RMSNorm"),
    ("--position-embedding-type learned_absolute", "--position-embedding-type.*rotary"),
    ("--transformer-impl inference", "--transformer-impl"),
    ("--micro-batch-size one", "--micro-batch-size expects int, got 'one'"),
    ("--lr fast", "--lr expects float"),
    ("--profile-ranks 0 x", "--profile-ranks expects int"),
    ("--lr-decay-style WSD", "--lr-decay-style"),
    ("--recompute-granularity full2", "--recompute-granularity"),
    ("--seq-length", "--seq-length expects a value"),
    ("--bf16=true", "--bf16 is a switch"),
    ("--recompute-granularity selective --recompute-method uniform", "--recompute-method"),
    ("--exp-avg-dtype fp8", "--exp-avg-dtype 'fp8'.*fp32 or bf16"),
    ("--exp-avg-dtype bf16 --exp-avg-sq-dtype fp32", "one dtype; give both the same"),
    ("--main-grads-dtype bf16", "gradients stay fp32"),
])
def test_errors_name_the_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_megatron_args(argv)


def test_precision_aware_optimizer_flags():
    line = "--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 --main-grads-dtype fp32"
    assert parse_megatron_args(line) == {"training": {"optimizer_state_dtype": "bf16"}}
    assert parse_megatron_args("--exp-avg-sq-dtype fp32") == {"training": {"optimizer_state_dtype": "fp32"}}


def test_query_groups_follow_megatron():
    assert parse_megatron_args(
        "--num-attention-heads 32 --group-query-attention --num-query-groups 8 --swiglu "
        "--normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights "
        "--use-rotary-position-embeddings")["model"] == {"n_heads": 32, "n_kv_heads": 8}
    with pytest.warns(UserWarning, match="GPT-2-like"):
        model = parse_megatron_args("--num-attention-heads 32")["model"]
    assert model == {"n_heads": 32, "n_kv_heads": 32}  # no --group-query-attention: MHA
    with pytest.warns(UserWarning) as record:
        model = parse_megatron_args("--num-attention-heads 32 --num-query-groups 8")["model"]
    assert any("--num-query-groups without --group-query-attention" in str(w.message)
               for w in record)
    assert model["n_kv_heads"] == 32


def test_plan_and_degrees_llama3_70b():
    degrees, plan = plan_and_degrees_from_megatron(LLAMA3_70B)
    assert degrees == {"pp": 1, "dp_replicate": 1, "dp_shard": -1, "cp": 1, "tp": 8}
    assert isinstance(plan, ParallelPlan)
    assert plan.sequence_parallel and plan.recompute == "selective"
    assert plan.mixed_precision == "bf16"
    assert (plan.micro_batch_size, plan.global_batch_size) == (1, 1024)
    assert (plan.num_heads, plan.num_kv_heads) == (64, 8)
    assert plan.kernels == {f: "torch" for f in plan.kernels} and plan.compile == "auto"  # the plan default
    assert plan.blocks is None and plan.rules is None
    ParallelDims(**degrees, world_size=512)  # 64 nodes of 8: dp_shard becomes 64


def test_plan_and_degrees_defaults_and_user_model():
    rules = {"blocks.*.q": "colwise", "blocks.*.o": "rowwise"}
    degrees, plan = plan_and_degrees_from_megatron(
        ["--tensor-model-parallel-size", "2", "--kernels", "triton", "--compile",
         "--recompute-granularity", "full", "--recompute-method", "block",
         "--recompute-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
        blocks="blocks.*", rules=rules)
    assert degrees == {"pp": 1, "dp_replicate": -1, "dp_shard": 1, "cp": 1, "tp": 2}  # DDP
    assert plan.blocks == "blocks.*" and plan.rules == rules
    assert plan.compile and plan.kernel_backend("attention") == "triton"
    assert (plan.recompute, plan.recompute_method, plan.recompute_num_layers) == ("full", "block", 2)
    assert plan.mixed_precision == "fp32" and not plan.sequence_parallel

    degrees, plan = plan_and_degrees_from_megatron([])  # Megatron's defaults: DDP, fp32
    assert degrees == {"pp": 1, "dp_replicate": -1, "dp_shard": 1, "cp": 1, "tp": 1}
    assert plan == ParallelPlan()


def test_plan_and_degrees_rejections():
    _, plan = plan_and_degrees_from_megatron("--expert-model-parallel-size 8 --use-distributed-optimizer")
    assert plan.expert_parallel == 8
    with pytest.raises(ValueError, match="not a multiple"):  # ParallelPlan's own check
        plan_and_degrees_from_megatron("--micro-batch-size 3 --global-batch-size 8")
    with pytest.warns(UserWarning, match="disabling --sequence-parallel"):
        _, plan = plan_and_degrees_from_megatron("--sequence-parallel")
    assert not plan.sequence_parallel


def test_pipeline_flags():
    degrees, plan = plan_and_degrees_from_megatron(
        "--pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 2 "
        "--decoder-first-pipeline-num-layers 3 --micro-batch-size 1 --global-batch-size 64")
    assert degrees["pp"] == 4
    assert (plan.pipeline_schedule, plan.layers_per_virtual_stage, plan.first_stage_layers) == (
        None, 2, 3)  # None: interleaved, as Megatron, once the virtual stages are known
    _, plan = plan_and_degrees_from_megatron("--pipeline-model-parallel-size 2 --pipeline-schedule zbv")
    assert plan.pipeline_schedule == "zbv"


def test_deep_merge():
    base = {"parallel": {"tp": 2, "dp_shard": -1}, "training": {"lr": 1e-3, "tags": [1]},
            "name": "recipe"}
    overlay = {"parallel": {"tp": 8}, "training": {"tags": [2, 3]}, "data": {"mock": True}}
    merged = deep_merge(base, overlay)
    assert merged == {"parallel": {"tp": 8, "dp_shard": -1},
                      "training": {"lr": 1e-3, "tags": [2, 3]},
                      "name": "recipe", "data": {"mock": True}}
    assert base == {"parallel": {"tp": 2, "dp_shard": -1}, "training": {"lr": 1e-3, "tags": [1]},
                    "name": "recipe"}  # inputs untouched
    merged["data"]["mock"] = False
    merged["training"]["tags"].append(4)
    assert overlay == {"parallel": {"tp": 8}, "training": {"tags": [2, 3]}, "data": {"mock": True}}
    assert deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}  # a scalar replaces a section
    assert deep_merge({"a": 5}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert deep_merge(base, {}) == base and deep_merge({}, overlay) == overlay


def test_docstring_table_lists_every_flag():
    doc = megatron_args.__doc__
    missing = [f for f in megatron_args._FLAGS if f not in doc]
    assert not missing, f"flags missing from the module docstring: {missing}"


def test_moe_flags_fill_the_model_moe_table():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MoE flags alone do not trigger the GPT-2-shape warning
        out = parse_megatron_args("--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1024 "
                                  "--moe-router-load-balancing-type global_aux_loss --moe-aux-loss-coeff 1e-2 "
                                  "--moe-z-loss-coeff 1e-3 --moe-router-score-function sigmoid "
                                  "--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 "
                                  "--moe-expert-capacity-factor 1.5 --moe-token-dispatcher-type alltoall "
                                  "--moe-grouped-gemm --expert-model-parallel-size 4")
    assert out["model"] == {"moe": {"n_experts": 8, "top_k": 2, "hidden_dim": 1024, "load_balance": "aux_loss",
                                    "aux_loss_coeff": 1e-2, "z_loss_coeff": 1e-3, "score_func": "sigmoid",
                                    "expert_bias": True, "bias_update_rate": 1e-3, "capacity_factor": 1.5}}
    assert out["parallel"]["ep"] == 4
    with pytest.raises(ValueError, match="--moe-token-dispatcher-type"):
        parse_megatron_args("--moe-token-dispatcher-type allgather")


def test_kernels_per_family():
    """One backend for every kernel family, or family=backend pairs (plan.kernels' dict)."""
    cfg = parse_megatron_args("--kernels attention=triton,sp_reduce_scatter=auto")
    assert cfg["plan"]["kernels"] == {"attention": "triton", "sp_reduce_scatter": "auto"}
    _, plan = plan_and_degrees_from_megatron(["--kernels", "attention=triton,moe_dispatch=triton"])
    assert [plan.kernel_backend(f) for f in ("attention", "sp_reduce_scatter", "moe_dispatch")] == \
        ["triton", "torch", "triton"]
    for bad in ("attention=", "flash=triton", "cuda"):
        expected = re.escape("--kernels expects torch|triton|auto, or family=backend pairs") + f".*got '{bad}'"
        with pytest.raises(ValueError, match=expected):
            parse_megatron_args(["--kernels", bad])
