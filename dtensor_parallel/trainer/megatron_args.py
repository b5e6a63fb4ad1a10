"""Megatron-Core launch flags -> our config, so a Megatron user's command line carries over.

:func:`parse_megatron_args` turns ``pretrain_gpt.py``-style flags into a nested config
*overlay* (only keys whose flag appeared are set); :func:`deep_merge` lays it over a TOML
recipe; :func:`plan_and_degrees_from_megatron` gives ``build_mesh`` kwargs and a
:class:`~dtensor_parallel.plan.ParallelPlan`. It lives with the trainer: the core API
(``ParallelPlan``, ``parallelize``) never imports it. Flags are Megatron's own unless marked *(ours)*.

=========================================  ============================================
flag                                       overlay key
=========================================  ============================================
--tensor-model-parallel-size N             parallel.tp
--pipeline-model-parallel-size N           parallel.pp
--context-parallel-size N                  parallel.cp
--expert-model-parallel-size N             parallel.ep (-> ParallelPlan.expert_parallel)
--use-distributed-optimizer                parallel.dp_shard=-1, dp_replicate=1 (FSDP)
--use-megatron-fsdp                        parallel.dp_shard=-1, dp_replicate=1 (FSDP)
--data-parallel-sharding-strategy S        optim|optim_grads|optim_grads_params: FSDP;
                                           no_shard: DDP
(a parallel flag, no sharding flag)        parallel.dp_replicate=-1, dp_shard=1 (DDP)
--sequence-parallel                        plan.sequence_parallel=True
--recompute-granularity full|selective     plan.recompute (absent: Megatron's "none")
--recompute-method uniform|block           plan.recompute_method
--recompute-num-layers N                   plan.recompute_num_layers
--num-virtual-stages-per-pipeline-rank N   plan.virtual_stages (not with the next one)
--num-layers-per-virtual-pipeline-stage N  plan.layers_per_virtual_stage
--decoder-first-pipeline-num-layers N      plan.first_stage_layers
--decoder-last-pipeline-num-layers N       plan.last_stage_layers
--pipeline-schedule NAME                   plan.pipeline_schedule *(ours)*; with pp > 1 and
                                           virtual stages: "interleaved_1f1b" (Megatron's)
--bf16                                     plan.mixed_precision="bf16" (absent: fp32)
--fp16                                     ValueError: no fp16 loss scaling; use --bf16
--kernels torch|triton|auto                plan.kernels *(ours)*; or per family:
                                           attention=triton,sp_reduce_scatter=auto
--compile / --no-compile                   plan.compile=True / False *(ours)*; absent: the
                                           recipe's, else "auto" (compiled on CUDA only)
--num-experts N                            model.moe.n_experts (the [model.moe] table)
--moe-router-topk N                        model.moe.top_k
--moe-ffn-hidden-size N                    model.moe.hidden_dim
--moe-router-load-balancing-type T         model.moe.load_balance: aux_loss|seq_aux_loss|none;
                                           global_aux_loss -> aux_loss (ours is global)
--moe-aux-loss-coeff X                     model.moe.aux_loss_coeff
--moe-z-loss-coeff X                       model.moe.z_loss_coeff
--moe-router-score-function softmax|sigmoid  model.moe.score_func
--moe-router-enable-expert-bias            model.moe.expert_bias=True (aux-loss-free)
--moe-router-bias-update-rate X            model.moe.bias_update_rate
--moe-expert-capacity-factor X             model.moe.capacity_factor (absent: dropless)
--moe-dispatch-chunks N                    plan.moe_dispatch_chunks *(ours)*: each MoE layer's
                                           exchange in N chunks beside the expert GEMMs
--micro-batch-size N                       training.micro_batch_size
--global-batch-size N                      training.global_batch_size
--seq-length N                             training.seq_len
--train-iters N                            training.steps
--lr X / --min-lr X                        training.lr / training.min_lr
--lr-warmup-iters N                        training.warmup_steps
--lr-decay-style cosine|linear|constant    training.lr_decay_style
--weight-decay X                           training.weight_decay
--adam-beta1 X / --adam-beta2 X            training.beta1 / training.beta2
--adam-eps X                               training.eps
--clip-grad X                              training.grad_clip
--exp-avg-dtype / --exp-avg-sq-dtype T     training.optimizer_state_dtype: fp32|bf16 (AdamW's
                                           moments; both flags, if given, must agree: ours keeps
                                           one dtype); --use-precision-aware-optimizer and
                                           --main-grads-dtype / --main-params-dtype fp32 accepted
--seed N                                   training.seed
--max-nonfinite-steps N                    training.max_nonfinite_steps *(ours)*: skipped
                                           non-finite steps in a row before the run stops
--manual-gc                                accepted: collection is manual by default
--manual-gc-interval N                     training.gc_interval (N >= 1; 0, Megatron's "never
                                           between steps": an error; ours 0 is automatic GC)
--num-layers N                             model.n_layers
--hidden-size N                            model.dim
--ffn-hidden-size N                        model.ffn_hidden_dim
--num-attention-heads N                    model.n_heads (and n_kv_heads=N without GQA)
--num-query-groups N                       model.n_kv_heads (with --group-query-attention)
--max-position-embeddings N                model.max_seq_len
--rotary-base X                            model.rope_theta
--norm-epsilon X                           model.norm_eps
--vocab-size N                             model.vocab_size *(ours)*
--data-path PATH                           data.path (one path; weighted blends: error)
--mock-data                                data.mock=True (synthetic source)
--data-dtype uint16|uint32                 data.dtype *(ours)*: must agree with the file's
                                           statement (PATH.json); absent: the statement's
--reset-attention-mask                     data.reset_attention_mask=True: attention masked at
                                           document boundaries (packed documents)
--eod-token-id N                           data.eod_token_id *(ours)*: a document ends at N
--document-starts PATH                     data.document_starts *(ours)*: int64 start offsets
--log-interval N                           logging.log_interval
--profile                                  logging.profile=True
--profile-ranks R [R ...]                  logging.profile_ranks (list of ints)
--metrics PATH                             logging.metrics_path *(ours)*
--save DIR / --load DIR                    checkpoint.save / checkpoint.load
--save-interval N                          checkpoint.save_interval
--async-save                               checkpoint.async_save=True
--resume auto|none                         checkpoint.resume *(ours)*
--init-from-hf DIR                         checkpoint.init_from_hf *(ours)*: a Hugging Face folder
--device auto|cpu|cuda                     cluster.device *(ours)*: gloo on CPU or NCCL on GPUs
--distributed-timeout-minutes X            cluster.distributed_timeout_minutes (default 10, as
                                           Megatron's; fractions allowed)
=========================================  ============================================

Accepted no-ops, which describe what our Llama already is (values are checked):
--swiglu, --normalization RMSNorm, --group-query-attention, --disable-bias-linear,
--untie-embeddings-and-output-weights, --position-embedding-type rope,
--use-rotary-position-embeddings, --use-flash-attn, --no-masked-softmax-fusion,
--attention-backend flash|fused|unfused|local|auto, --transformer-impl
local|transformer_engine (we have one implementation), --use-mcore-models,
--moe-token-dispatcher-type alltoall, --moe-grouped-gemm,
--overlap-grad-reduce, --overlap-param-gather (FSDP2 overlaps anyway). Megatron's defaults
without the first five describe a GPT-2-like model; if model flags appear without them we
warn, since we build Llama regardless.

Data parallelism: Megatron's ``--use-distributed-optimizer`` is ZeRO-1 (optimizer state
sharded, parameters and gradients replicated). We map it to FSDP over the data-parallel
ranks, which shards parameters, gradients *and* optimizer state (ZeRO-3): more sharding,
same direction, same math. Without it Megatron runs replicated DDP, and so do we.

``--flag value`` and ``--flag=value`` both work; a pasted shell line (with ``\\`` line
continuations) may be given as one string. Unknown flags and bad values are ``ValueError``
naming the flag.
"""

from __future__ import annotations

import copy
import difflib
import shlex
import warnings
from typing import Any, Callable, NamedTuple

from ..plan import FAMILY_BACKENDS, KERNEL_BACKENDS, KERNEL_FAMILIES, ParallelPlan


class _Flag(NamedTuple):
    section: str | None  # None: an accepted no-op (or handled after parsing)
    key: str | None
    convert: Callable[[str], Any] | None = None  # None: store_true
    choices: tuple[str, ...] | None = None
    many: bool = False  # nargs="+"
    store: Any = True  # the value of a switch (convert None)


_f = _Flag


def _kernels_arg(value: str) -> str | dict[str, str]:
    """``--kernels triton`` (every family) or ``--kernels attention=triton,sp_reduce_scatter=auto``."""
    if "=" not in value:
        if value not in KERNEL_BACKENDS:
            raise ValueError(value)
        return value
    out = {}
    for item in value.split(","):
        family, sep, backend = (part.strip() for part in item.partition("="))
        if family not in KERNEL_FAMILIES or backend not in FAMILY_BACKENDS[family]:
            raise ValueError(value)
        out[family] = backend
    return out


# what the parser's error says the flag expects
_kernels_arg.__name__ = (f"{'|'.join(KERNEL_BACKENDS)}, or family=backend pairs joined by commas over the "
                         f"families {', '.join(KERNEL_FAMILIES)} (e.g. attention=triton,sp_reduce_scatter=auto)")
def _positive_int(value: str) -> int:
    if int(value) < 1:
        raise ValueError(value)
    return int(value)


_positive_int.__name__ = "an integer >= 1"
_SHARDING = ("no_shard", "optim", "optim_grads", "optim_grads_params")
_FLAGS: dict[str, _Flag] = {
    "--tensor-model-parallel-size": _f("parallel", "tp", int),
    "--pipeline-model-parallel-size": _f("parallel", "pp", int),
    "--context-parallel-size": _f("parallel", "cp", int),
    "--expert-model-parallel-size": _f("parallel", "ep", int),
    "--use-distributed-optimizer": _f(None, None),
    "--use-megatron-fsdp": _f(None, None),
    "--data-parallel-sharding-strategy": _f(None, None, str, _SHARDING),
    "--sequence-parallel": _f("plan", "sequence_parallel"),
    "--recompute-granularity": _f("plan", "recompute", str, ("full", "selective")),
    "--recompute-method": _f("plan", "recompute_method", str, ("uniform", "block")),
    "--recompute-num-layers": _f("plan", "recompute_num_layers", int),
    "--num-virtual-stages-per-pipeline-rank": _f("plan", "virtual_stages", int),
    "--num-layers-per-virtual-pipeline-stage": _f("plan", "layers_per_virtual_stage", int),
    "--decoder-first-pipeline-num-layers": _f("plan", "first_stage_layers", int),
    "--decoder-last-pipeline-num-layers": _f("plan", "last_stage_layers", int),
    "--pipeline-schedule": _f("plan", "pipeline_schedule", str,
                              ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")),
    "--bf16": _f(None, None),
    "--fp16": _f(None, None),
    "--kernels": _f("plan", "kernels", _kernels_arg),
    "--compile": _f("plan", "compile"),
    "--no-compile": _f("plan", "compile", store=False),
    "--num-experts": _f("model", "moe.n_experts", int),
    "--moe-router-topk": _f("model", "moe.top_k", int),
    "--moe-ffn-hidden-size": _f("model", "moe.hidden_dim", int),
    "--moe-router-load-balancing-type": _f("model", "moe.load_balance", str,
                                           ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")),
    "--moe-aux-loss-coeff": _f("model", "moe.aux_loss_coeff", float),
    "--moe-z-loss-coeff": _f("model", "moe.z_loss_coeff", float),
    "--moe-router-score-function": _f("model", "moe.score_func", str, ("softmax", "sigmoid")),
    "--moe-router-enable-expert-bias": _f("model", "moe.expert_bias"),
    "--moe-router-bias-update-rate": _f("model", "moe.bias_update_rate", float),
    "--moe-expert-capacity-factor": _f("model", "moe.capacity_factor", float),
    "--moe-dispatch-chunks": _f("plan", "moe_dispatch_chunks", int),
    "--moe-token-dispatcher-type": _f(None, None, str, ("alltoall",)),
    "--moe-grouped-gemm": _f(None, None),
    "--micro-batch-size": _f("training", "micro_batch_size", int),
    "--global-batch-size": _f("training", "global_batch_size", int),
    "--seq-length": _f("training", "seq_len", int),
    "--train-iters": _f("training", "steps", int),
    "--lr": _f("training", "lr", float),
    "--min-lr": _f("training", "min_lr", float),
    "--lr-warmup-iters": _f("training", "warmup_steps", int),
    "--lr-decay-style": _f("training", "lr_decay_style", str, ("cosine", "linear", "constant")),
    "--weight-decay": _f("training", "weight_decay", float),
    "--adam-beta1": _f("training", "beta1", float),
    "--adam-beta2": _f("training", "beta2", float),
    "--adam-eps": _f("training", "eps", float),
    "--clip-grad": _f("training", "grad_clip", float),
    "--use-precision-aware-optimizer": _f(None, None),
    "--exp-avg-dtype": _f("training", "optimizer_state_dtype", str, ("fp32", "bf16")),
    "--exp-avg-sq-dtype": _f("training", "optimizer_state_dtype", str, ("fp32", "bf16")),
    "--main-grads-dtype": _f(None, None, str, ("fp32",)),
    "--main-params-dtype": _f(None, None, str, ("fp32",)),
    "--seed": _f("training", "seed", int),
    "--max-nonfinite-steps": _f("training", "max_nonfinite_steps", int),
    "--manual-gc": _f(None, None),
    "--manual-gc-interval": _f("training", "gc_interval", _positive_int),
    "--num-layers": _f("model", "n_layers", int),
    "--hidden-size": _f("model", "dim", int),
    "--ffn-hidden-size": _f("model", "ffn_hidden_dim", int),
    "--num-attention-heads": _f("model", "n_heads", int),
    "--num-query-groups": _f(None, None, int),
    "--max-position-embeddings": _f("model", "max_seq_len", int),
    "--rotary-base": _f("model", "rope_theta", float),
    "--norm-epsilon": _f("model", "norm_eps", float),
    "--vocab-size": _f("model", "vocab_size", int),
    "--data-path": _f(None, None, str, many=True),
    "--mock-data": _f("data", "mock"),
    "--data-dtype": _f("data", "dtype", str, ("uint16", "uint32")),
    "--reset-attention-mask": _f("data", "reset_attention_mask"),
    "--eod-token-id": _f("data", "eod_token_id", int),
    "--document-starts": _f("data", "document_starts", str),
    "--log-interval": _f("logging", "log_interval", int),
    "--profile": _f("logging", "profile"),
    "--profile-ranks": _f("logging", "profile_ranks", int, many=True),
    "--metrics": _f("logging", "metrics_path", str),
    "--save": _f("checkpoint", "save", str),
    "--load": _f("checkpoint", "load", str),
    "--save-interval": _f("checkpoint", "save_interval", int),
    "--async-save": _f("checkpoint", "async_save"),
    "--resume": _f("checkpoint", "resume", str, ("auto", "none")),
    "--init-from-hf": _f("checkpoint", "init_from_hf", str),
    "--device": _f("cluster", "device", str, ("auto", "cpu", "cuda")),  # ours: where the ranks run
    "--distributed-timeout-minutes": _f("cluster", "distributed_timeout_minutes", float),
    # accepted no-ops: what our Llama already is
    "--swiglu": _f(None, None),
    "--normalization": _f(None, None, str, ("RMSNorm",)),
    "--group-query-attention": _f(None, None),
    "--disable-bias-linear": _f(None, None),
    "--untie-embeddings-and-output-weights": _f(None, None),
    "--position-embedding-type": _f(None, None, str, ("rope",)),
    "--use-rotary-position-embeddings": _f(None, None),
    "--use-flash-attn": _f(None, None),
    "--no-masked-softmax-fusion": _f(None, None),
    "--attention-backend": _f(None, None, str, ("flash", "fused", "unfused", "local", "auto")),
    "--transformer-impl": _f(None, None, str, ("local", "transformer_engine")),
    "--use-mcore-models": _f(None, None),
    "--overlap-grad-reduce": _f(None, None),
    "--overlap-param-gather": _f(None, None),
}
_PARALLEL_FLAGS = tuple(f for f in _FLAGS if _FLAGS[f].section == "parallel") + (
    "--use-distributed-optimizer", "--use-megatron-fsdp", "--data-parallel-sharding-strategy")
# Without these Megatron builds GPT-2-like layers (GeLU, LayerNorm, biases, tied embeddings,
# learned positions); we build Llama regardless. Each group: any one of its flags will do.
_LLAMA_FLAGS = (("--swiglu",), ("--normalization",), ("--disable-bias-linear",),
                ("--untie-embeddings-and-output-weights",),
                ("--position-embedding-type", "--use-rotary-position-embeddings"))
_WHY_NOT: dict[str, str] = {
    "--normalization": "our Llama uses RMSNorm only",
    "--position-embedding-type": "our Llama uses rotary embeddings only",
    "--exp-avg-dtype": "AdamW's moments are fp32 or bf16 (stochastically rounded) here",
    "--exp-avg-sq-dtype": "AdamW's moments are fp32 or bf16 (stochastically rounded) here",
    "--main-grads-dtype": "gradients stay fp32 here; --exp-avg-dtype bf16 saves the optimizer's bytes",
    "--main-params-dtype": "master weights stay fp32 here; --exp-avg-dtype bf16 saves the optimizer's bytes",
}


def _tokens(argv: list[str] | str) -> list[str]:
    if isinstance(argv, str):
        return shlex.split(argv.replace("\\\n", " "))
    return list(argv)


def _read(argv: list[str] | str) -> dict[str, Any]:
    """Flags -> converted values, in Megatron's (argparse) sense; the last repeat wins."""
    toks, raw, i = _tokens(argv), {}, 0
    while i < len(toks):
        tok = toks[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: expected a --flag")
        name, eq, inline = tok.partition("=")
        spec = _FLAGS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, _FLAGS, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown flag {name}{hint} (known flags are listed in "
                             f"dtensor_parallel.trainer.megatron_args)")
        i += 1
        if spec.convert is None:
            if eq:
                raise ValueError(f"{name} is a switch and takes no value, got {tok!r}")
            raw[name] = spec.store
            continue
        if eq:
            values = [inline]
        else:
            j = i
            while j < len(toks) and not toks[j].startswith("--") and (spec.many or j == i):
                j += 1
            values, i = toks[i:j], j
        if not values:
            raise ValueError(f"{name} expects a value")
        out = []
        for v in values:
            if spec.choices is not None and v not in spec.choices:
                why = f" ({_WHY_NOT[name]})" if name in _WHY_NOT else ""
                raise ValueError(f"{name} {v!r}: choose one of {spec.choices}{why}")
            try:
                out.append(spec.convert(v))
            except ValueError:
                raise ValueError(f"{name} expects {spec.convert.__name__}, got {v!r}") from None
        raw[name] = out if spec.many else out[0]
    return raw


def parse_megatron_args(argv: list[str] | str) -> dict[str, dict[str, Any]]:
    """Megatron-Core flags -> nested config overlay ``{section: {key: value}}``.

    Sections: ``parallel``, ``plan``, ``training``, ``model``, ``data``, ``logging``,
    ``checkpoint`` (the table in this module's docstring). Only keys whose flag appeared
    are set, except the derived ones: the data-parallel pair once a parallel flag appeared,
    and ``model.n_kv_heads``, which follows Megatron (``--num-query-groups`` counts only
    with ``--group-query-attention``, whose default is 1 group; without it attention is
    multi-head, so ``n_kv_heads = n_heads``). Empty sections are left out.
    """
    raw = _read(argv)
    if "--compile" in raw and "--no-compile" in raw:
        raise ValueError("--compile and --no-compile both given: keep one")
    moments = {raw[f] for f in ("--exp-avg-dtype", "--exp-avg-sq-dtype") if f in raw}
    if len(moments) > 1:
        raise ValueError(f"--exp-avg-dtype {raw['--exp-avg-dtype']} and --exp-avg-sq-dtype "
                         f"{raw['--exp-avg-sq-dtype']}: our AdamW keeps both moments in one dtype; give both the same")
    out: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        table = out.setdefault(section, {})
        if "." in key:  # a sub-table: model.moe
            sub, key = key.split(".", 1)
            table = table.setdefault(sub, {})
        if key == "load_balance" and value == "global_aux_loss":
            value = "aux_loss"  # ours is computed over the global micro-batch (expert_parallel/statistics.py)
        table[key] = value

    for name, value in raw.items():
        spec = _FLAGS[name]
        if spec.section is not None and spec.key is not None:
            put(spec.section, spec.key, value)

    strategy = raw.get("--data-parallel-sharding-strategy")
    sharded = (raw.get("--use-distributed-optimizer", False)
               or (strategy is not None and strategy != "no_shard")
               or (raw.get("--use-megatron-fsdp", False) and strategy != "no_shard"))
    if sharded:
        put("parallel", "dp_shard", -1)
        put("parallel", "dp_replicate", 1)
    elif any(f in raw for f in _PARALLEL_FLAGS):
        put("parallel", "dp_replicate", -1)
        put("parallel", "dp_shard", 1)

    if raw.get("--fp16"):
        raise ValueError("--fp16: fp16 with loss scaling is unsupported; use --bf16 (bf16 "
                         "compute, fp32 master weights and gradient reduction)")
    if raw.get("--bf16"):
        put("plan", "mixed_precision", "bf16")
    if ("--num-virtual-stages-per-pipeline-rank" in raw
            and "--num-layers-per-virtual-pipeline-stage" in raw):
        raise ValueError("--num-virtual-stages-per-pipeline-rank and "
                         "--num-layers-per-virtual-pipeline-stage cannot both be given "
                         "(Megatron rejects it too): keep one")
    if "--recompute-method" in raw and raw.get("--recompute-granularity") == "selective":
        raise ValueError("--recompute-method is for --recompute-granularity full; Megatron "
                         "rejects it with selective too")

    gqa = raw.get("--group-query-attention", False)
    if "--num-query-groups" in raw and not gqa:
        warnings.warn("--num-query-groups without --group-query-attention is ignored, as in "
                      "Megatron: attention is multi-head. Add --group-query-attention for GQA",
                      stacklevel=2)
    if gqa:
        put("model", "n_kv_heads", raw.get("--num-query-groups", 1))
    elif "--num-attention-heads" in raw:
        put("model", "n_kv_heads", raw["--num-attention-heads"])

    if "--data-path" in raw:
        paths = raw["--data-path"]
        if len(paths) != 1:
            raise ValueError(f"--data-path {' '.join(paths)}: weighted or multi-path blends "
                             f"are not supported; give one path prefix")
        put("data", "path", paths[0])

    if set(out.get("model", {})) - {"moe"}:  # MoE flags alone say nothing of the dense shape
        missing = [group[0] for group in _LLAMA_FLAGS if not any(f in raw for f in group)]
        if missing:
            warnings.warn(f"model flags without {', '.join(missing)}: Megatron would build a "
                          f"GPT-2-like model; we build Llama (SwiGLU, RMSNorm, rotary, no "
                          f"biases, untied head)", stacklevel=2)
    return out


def plan_and_degrees_from_megatron(
    argv: list[str] | str,
    *,
    blocks: str | None = None,
    rules: dict[str, Any] | None = None,
) -> tuple[dict[str, int], ParallelPlan]:
    """Megatron flags -> (``build_mesh`` kwargs, :class:`ParallelPlan`).

    Degrees default to Megatron's (all 1, replicated DDP over the rest of the world unless
    a distributed optimizer / Megatron-FSDP flag asks for sharding, then FSDP). Plan fields
    come from the ``plan`` section, ``micro_batch_size``/``global_batch_size`` from
    ``training`` and ``num_heads``/``num_kv_heads`` from ``model``; absent ones keep
    ParallelPlan's defaults, which are Megatron's (no recompute, fp32). As in Megatron,
    ``--sequence-parallel`` with tp=1 is dropped with a warning.

    With virtual stages Megatron runs its interleaved schedule, and so do we (ParallelPlan's
    default) unless ``--pipeline-schedule`` (ours) names another.

    ``--expert-model-parallel-size`` becomes ``ParallelPlan.expert_parallel``.
    """
    cfg = parse_megatron_args(argv)
    par, plan_cfg = cfg.get("parallel", {}), dict(cfg.get("plan", {}))
    if par.get("ep", 1) > 1:
        plan_cfg["expert_parallel"] = par["ep"]  # folded out of dp_shard x cp x tp, as Megatron folds it
    degrees = {"pp": par.get("pp", 1), "dp_replicate": par.get("dp_replicate", -1),
               "dp_shard": par.get("dp_shard", 1), "cp": par.get("cp", 1),
               "tp": par.get("tp", 1)}
    if plan_cfg.get("sequence_parallel") and degrees["tp"] == 1:
        warnings.warn("disabling --sequence-parallel because tensor parallelism is off (tp=1), "
                      "as Megatron does", stacklevel=2)
        plan_cfg["sequence_parallel"] = False
    training, model = cfg.get("training", {}), cfg.get("model", {})
    for src, ours, theirs in ((training, "micro_batch_size", "micro_batch_size"),
                              (training, "global_batch_size", "global_batch_size"),
                              (model, "num_heads", "n_heads"),
                              (model, "num_kv_heads", "n_kv_heads")):
        if theirs in src:
            plan_cfg[ours] = src[theirs]
    return degrees, ParallelPlan(blocks=blocks, rules=rules, **plan_cfg)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` laid over ``base``, recursing where both hold a dict; a new dict.

    A non-dict value in ``overlay`` replaces whatever ``base`` holds there (lists included);
    neither input is modified, and the result shares no mutable value with them.
    """
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
