"""TorchTitan (0.2.2) driven through its own building blocks, for ``train_throughput.py``.

The same synthetic batches and timing loop as our library; TorchTitan builds, parallelizes
and steps the model. What is called, in order (``torchtitan.*``):

- ``config.JobConfig`` (a dataclass, filled here; no TOML, no CLI) and
  ``distributed.ParallelDims(...)`` (its mesh: ``get_mesh`` / ``get_optional_mesh``);
- ``models.llama3.TransformerModelArgs`` + ``Transformer`` on the meta device;
- ``models.llama3.parallelize_llama`` (TP + SP + loss parallel, CP on the attention
  modules, selective activation checkpointing ``mode="selective"``, ``selective_ac_option
  ="op"``, per-block ``torch.compile``, FSDP2) or, with PP,
  ``distributed.pipeline_parallel.pipeline_llm`` (split by ``module_fqns_per_model_part``,
  the same split as ours, then ``parallelize_llama`` per stage, schedule ``1F1B``);
- ``Transformer.init_weights``; ``components.optimizer.build_optimizers`` (AdamW, fused);
  ``components.loss.build_cross_entropy_loss`` (compiled when compile is on);
- one step as ``train.Trainer.train_step`` does it: ``distributed.utils.dist_sum`` of the
  valid tokens, ``distributed.context_parallel.prepare_context_parallel_input`` under CP,
  ``distributed.utils.get_train_context`` (loss parallel) and ``maybe_enable_amp``,
  forward/backward (or ``pp_schedule.step``), ``distributed.utils.clip_grad_norm_``,
  optimizer step (no LR scheduler, as on our side).

Deviation: without FSDP, TorchTitan's ``maybe_enable_amp`` turns autocast off under TP or
PP (it warns and trains in fp32). We wrap those steps in ``torch.autocast(bf16)``, as it does
on one GPU and as our library does without FSDP, so both compute in bf16.

Imports: TorchTitan imports its tokenizer, HF data pipeline and TensorBoard writer at
module level. This benchmark never loads data, so where ``tokenizers``, ``datasets``,
``torchdata`` or TensorBoard are missing, placeholder modules stand in (any use raises).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

NOTES = [  # how the two configurations compare: the results JSON's "notes"
    "FLOPs/token = 6 x N + 12 x L x d x s; N = every parameter but the input embedding (block weights, "
    "norms, output head); the attention term is NOT halved for the causal mask (TorchTitan's 12*l*h*q*t "
    "and PaLM's convention); mfu_causal halves it. Peak 989e12 FLOP/s per GPU (H100 SXM dense bf16). "
    "Recompute is not counted.",
    "Batch: one sequence per micro-batch per data-parallel rank; global batch = dp degree (1 for 1gpu, "
    "TP, CP). PP: --microbatches micro-batches per step, 1F1B, split by TorchTitan's default rule "
    "(embedding and head count as a layer each), passed explicitly to both (our layers_per_stage, its "
    "module_fqns_per_model_part).",
    "Precision: with FSDP (fsdpN, cpN) both use FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32) over "
    "fp32 sharded weights. Without FSDP (1gpu, tpNsp, ppN) both keep fp32 weights and run the forward "
    "under torch.autocast(bf16): ours by default, TorchTitan by its maybe_enable_amp on one GPU; under TP or "
    "PP without FSDP TorchTitan's trainer would turn autocast off (fp32 training), so the benchmark wraps "
    "its step in torch.autocast(bf16) instead.",
    "Selective recompute: each library's own op-level policy. Ours saves every matmul, the SDPA outputs and "
    "the SP reduce-scatters; TorchTitan's 'op' mode saves SDPA, reduce-scatter, max and only every other "
    "mm (it recomputes half of the matmuls in backward: more FLOPs, less memory).",
    "torch.compile: both per transformer block, after recompute, before FSDP. TorchTitan compiles with "
    "fullgraph=True and also compiles its loss (its default components ['model', 'loss']); ours uses "
    "nn.Module.compile() per block and an eager loss.",
    "Attention: ours calls SDPA with K/V repeated to all query heads (PyTorch's default backend choice); "
    "TorchTitan calls SDPA with enable_gqa=True under sdpa_kernel([CUDNN, FLASH, MATH], set_priority=True).",
    "CP: ours is zigzag ring attention (kernels 'torch' = the fp32 reference block kernel, a correctness "
    "yardstick, slow; 'triton' = our flash kernel merging in-kernel); TorchTitan uses torch's experimental "
    "_ContextParallel on SDPA with head-tail load balancing (torch's default all-gather rotation). Both "
    "shard the weights with FSDP over the cp ranks.",
    "TP: both TP + SP + loss-parallel cross entropy, TorchTitan's async TP off, except in its rows keyed "
    "torchtitan/<layout>/async_tp/compile (--titan-async-tp: enable_async_tensor_parallel, compiled TP layouts); "
    "ours kernels 'triton' swaps the SP reduce-scatter for our symmetric-memory Triton kernel and, under SP, "
    "the all-gather before the column-parallel layers for our fused all-gather + matmul.",
    "FSDP units: ours the embedding, each block, the output head (not resharded after forward), the root "
    "(final norm; not resharded after forward); "
    "TorchTitan the embedding, each block, [norm, output] (not resharded after forward), the root. Both "
    "sum gradients (divide factor 1) and divide the loss by the global token count.",
    "Optimizer: torch.optim.AdamW fused, lr 8e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every "
    "parameter (TorchTitan through build_optimizers with its defaults); grad-norm clipping at 1.0; no LR "
    "schedule.",
    "Timing: host-synchronized wall time of whole steps (tokens already on the device; TorchTitan's "
    "valid-token dist_sum, which syncs the host, included as in its train_step), median of the timed steps, "
    "max over ranks; automatic Python GC off during the steps for both. Peak memory: max_memory_allocated "
    "/ max_memory_reserved over the timed steps, max over ranks.",
    "The process group is initialized by the benchmark (NCCL with device_id) for both, not by TorchTitan's "
    "init_distributed (which also sets flight-recorder environment variables).",
    "TorchTitan 0.2.2 PP backpropagates each micro-batch's token-loss sum (not divided by the token count, "
    "as in its train.py); the gradients are larger but clipped; no effect on speed.",
    "Initialization differs (ours normal, TorchTitan truncated normal), so losses differ slightly.",
    "Rows carry dynamo_graphs / dynamo_graph_breaks: under compile, 0 graphs means the blocks ran eagerly.",
]


_PLACEHOLDERS = {  # module -> names imported from it at torchtitan import time
    "tokenizers": ("AddedToken", "Tokenizer"),
    "datasets": ("Dataset", "load_dataset"),
    "datasets.distributed": ("split_dataset_by_node",),
    "torchdata.stateful_dataloader": ("StatefulDataLoader",),
    "torch.utils.tensorboard": ("SummaryWriter",),
}


def _placeholder(module: str, name: str) -> type:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{module}.{name} is a placeholder ({module} is not installed); "
                           f"the throughput benchmark never loads data")
    if name == "StatefulDataLoader":  # a base class in torchtitan: keep it a real class
        return type(name, (torch.utils.data.DataLoader,), {})
    return type(name, (), {"__init__": fail, "__call__": fail})


def stub_missing_modules() -> list[str]:
    """Placeholder modules for the data-only imports that fail here; returns their names."""
    stubbed = []
    for module, names in _PLACEHOLDERS.items():
        try:
            importlib.import_module(module)
            continue
        except Exception:  # noqa: BLE001 - absent, or present but broken against this torch
            pass
        mod = types.ModuleType(module)
        for name in names:
            setattr(mod, name, _placeholder(module, name))
        sys.modules[module] = mod
        parent, _, child = module.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
        stubbed.append(module)
    return stubbed


@dataclass
class TitanRun:
    """What the timing loop needs: one training step, how to read its loss, and the root
    module (the phase marks of ``phase_memory.py``; None under PP)."""

    step: Callable[..., torch.Tensor]  # (inputs, labels, mark=...) -> local loss tensor
    global_loss: Callable[[torch.Tensor], float]  # collective: the global mean token loss
    dp_rank: int
    dp_size: int
    info: dict[str, Any]
    root: torch.nn.Module | None = None


def job_config(layout, *, seq: int, n_micro: int, compile: bool, stage_fqns: list[list[str]] | None,
               dump_folder: str, async_tp: bool = False):
    """TorchTitan's JobConfig for one layout; every field set here is listed in the notes."""
    from torchtitan.config import JobConfig

    jc = JobConfig()
    jc.job.dump_folder = dump_folder
    t, p = jc.training, jc.parallelism
    t.seq_len, t.local_batch_size, t.global_batch_size = seq, n_micro if layout.pp > 1 else 1, -1
    t.dtype, t.mixed_precision_param, t.mixed_precision_reduce = "float32", "bfloat16", "float32"
    t.max_norm = 1.0
    p.data_parallel_shard_degree, p.data_parallel_replicate_degree = layout.dp_shard, 1
    p.tensor_parallel_degree, p.context_parallel_degree = layout.tp, layout.cp
    p.pipeline_parallel_degree, p.pipeline_parallel_schedule = layout.pp, "1F1B"
    p.pipeline_parallel_microbatch_size, p.module_fqns_per_model_part = 1, stage_fqns
    p.enable_async_tensor_parallel, p.disable_loss_parallel = async_tp, False
    jc.activation_checkpoint.mode, jc.activation_checkpoint.selective_ac_option = "selective", "op"
    jc.compile.enable = compile  # components: its default ["model", "loss"]
    return jc


def model_args(dims: dict[str, Any], n_layers: int, seq: int):
    from torchtitan.models.llama3 import TransformerModelArgs

    return TransformerModelArgs(dim=dims["dim"], n_layers=n_layers, n_heads=dims["n_heads"],
                                n_kv_heads=dims["n_kv_heads"], vocab_size=dims["vocab_size"],
                                multiple_of=dims["multiple_of"], ffn_dim_multiplier=dims["ffn_dim_multiplier"],
                                rope_theta=dims["rope_theta"], max_seq_len=seq)


def build(layout, *, dims: dict[str, Any], n_layers: int, seq: int, n_micro: int, compile: bool,
          stage_layers: list[int] | None, device: torch.device, async_tp: bool = False) -> TitanRun:
    """Build TorchTitan's parallelized Llama 3 and its step on the current process group
    (``async_tp``: its async TP, compiled TP layouts only: the rows keyed ``.../async_tp/...``)."""
    if async_tp and not (compile and layout.tp > 1):
        raise ValueError("TorchTitan's async TP needs a TP layout and compile (its micro-pipeline TP is an inductor pass)")
    stubbed = stub_missing_modules()
    from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import parallel_dims as titan_parallel_dims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.context_parallel import prepare_context_parallel_input
    from torchtitan.distributed.pipeline_parallel import pipeline_llm
    from torchtitan.models.llama3 import Transformer, parallelize_llama
    from torchtitan.tools.logging import init_logger

    init_logger()
    if device.type != "cuda":  # CPU smoke runs: torchtitan falls back to "cuda" meshes
        titan_parallel_dims.device_type = "cpu"
    stage_fqns = None
    if stage_layers is not None:
        first, stage_fqns = 0, []
        for s, n in enumerate(stage_layers):
            names = [f"layers.{i}" for i in range(first, first + n)]
            first += n
            stage_fqns.append((["tok_embeddings"] if s == 0 else []) + names
                              + (["norm", "output"] if s == len(stage_layers) - 1 else []))
    jc = job_config(layout, seq=seq, n_micro=n_micro, compile=compile, stage_fqns=stage_fqns,
                    dump_folder=tempfile.mkdtemp(prefix="titan_"), async_tp=async_tp)
    pd = ParallelDims(dp_shard=layout.dp_shard, dp_replicate=1, cp=layout.cp, tp=layout.tp, pp=layout.pp,
                      ep=1, etp=1, world_size=dist.get_world_size())
    margs = model_args(dims, n_layers, seq)
    with torch.device("meta"):
        model = Transformer(margs)
    n_params, titan_flops = margs.get_nparams_and_flops(model, seq)
    loss_fn = build_cross_entropy_loss(jc)
    if pd.pp_enabled:
        schedule, parts, has_first, has_last = pipeline_llm(model, pd, jc, device, margs, parallelize_llama,
                                                            loss_fn)
    else:
        schedule, parts, has_first, has_last = None, [parallelize_llama(model, pd, jc)], True, True
    for m in parts:
        m.to_empty(device=device)
        with torch.no_grad():
            m.init_weights(buffer_device=None)
        m.train()
    if device.type != "cuda":  # gloo has no PREMUL_SUM, which a divide factor of 1 becomes
        for m in (m for part in parts for m in part.modules()):
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)
    optimizers = build_optimizers(parts, jc.optimizer, pd)
    train_context = dist_utils.get_train_context(pd.tp_enabled and not jc.parallelism.disable_loss_parallel)
    amp = dist_utils.maybe_enable_amp(pd, jc.training.mixed_precision_param, device.type)
    own_autocast = not pd.fsdp_enabled and (pd.tp_enabled or pd.pp_enabled)
    if own_autocast:  # see the module docstring: bf16 like ours, not TorchTitan's fp32 fallback
        amp = torch.autocast(device.type, dtype=torch.bfloat16)
    batch_mesh = pd.get_optional_mesh("batch")
    loss_mesh = pd.get_optional_mesh("loss")
    pp_mesh = pd.get_optional_mesh("pp")
    params = [p for m in parts for p in m.parameters()]

    def step(inputs: torch.Tensor, labels: torch.Tensor, mark=lambda phase: None) -> torch.Tensor:
        optimizers.zero_grad()
        local_valid = (labels != IGNORE_INDEX).sum()
        valid = (dist_utils.dist_sum(local_valid, batch_mesh) if batch_mesh is not None
                 else local_valid.float())
        extra: dict[str, Any] = {}
        if pd.cp_enabled:
            inputs, labels, extra = prepare_context_parallel_input(
                inputs, labels, extra, pd.get_mesh("cp"), device, jc.parallelism.context_parallel_load_balancer)
        if pd.pp_enabled:
            losses: list[torch.Tensor] | None = [] if has_last else None
            with train_context(), amp:
                args = (inputs,) if has_first else ()
                schedule.step(*args, **extra, target=labels if has_last else None, losses=losses,
                              return_outputs=False)
            loss = (torch.sum(torch.stack(losses)) / valid if has_last
                    else torch.zeros((), device=device))
        else:
            with train_context():
                with amp:
                    pred = parts[0](inputs, **extra)
                    loss = loss_fn(pred, labels) / valid
                del pred
                loss.backward()
        mark("backward")
        dist_utils.clip_grad_norm_(params, jc.training.max_norm, foreach=True, pp_mesh=pp_mesh,
                                   ep_enabled=False)
        optimizers.step()
        mark("optimizer")
        return loss.detach()

    def global_loss(loss: torch.Tensor) -> float:
        """Local loss (sum of this rank's token losses / global tokens) -> global mean."""
        t = loss.detach().float().reshape(()).clone()
        for mesh in (loss_mesh, pp_mesh):  # the non-last pp stages hold 0
            if mesh is not None:
                dist.all_reduce(t, group=mesh.get_group())
        return t.item()

    import torchtitan

    info = {"torchtitan": getattr(torchtitan, "__version__", "?"), "placeholder_modules": stubbed,
            "titan_params": n_params, "titan_flops_per_token": titan_flops,
            "autocast": "benchmark's torch.autocast(bf16)" if own_autocast else
            ("FSDP MixedPrecisionPolicy(bf16, fp32)" if pd.fsdp_enabled else "torchtitan maybe_enable_amp (bf16)"),
            "stage_fqns": stage_fqns}
    dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
    dp_size = batch_mesh.size() if batch_mesh is not None else 1
    return TitanRun(step=step, global_loss=global_loss, dp_rank=dp_rank, dp_size=dp_size, info=info,
                    root=None if pd.pp_enabled else parts[0])
