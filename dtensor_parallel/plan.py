"""ParallelPlan: everything about a parallel layout that is not a degree.

Degrees live on the mesh (:func:`dtensor_parallel.build_mesh`); the plan says how the
model is cut (``blocks``, ``rules``) and which optional behaviours are on. A built-in model
brings its own ``blocks`` and ``rules``; a user's transformer names them here::

    ParallelPlan(
        blocks="blocks.*",
        rules={"blocks.*.attn.q": "colwise", "blocks.*.attn.o": "rowwise",
               "blocks.*.ln*": "norm", "embed": "embedding", "lm_head": "head"},
        sequence_parallel=True,
    )

Every field is checked in ``__post_init__``; errors name the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
KERNEL_BACKENDS = ("torch", "triton", "auto")
KERNEL_FAMILIES = ("attention", "sp_reduce_scatter", "moe_dispatch")
# each family's backends: attention also runs on PyTorch's fused SDPA ops ("sdpa")
FAMILY_BACKENDS = {"attention": ("torch", "triton", "sdpa", "auto"), "sp_reduce_scatter": KERNEL_BACKENDS,
                   "moe_dispatch": KERNEL_BACKENDS}
MIXED_PRECISION = ("fp32", "bf16")


@dataclass
class ParallelPlan:
    """How to parallelize a model on a mesh (the mesh carries the degrees).

    Args:
        blocks: glob of the repeated blocks (``"layers.*"``): FSDP units, recompute units
            and pipeline split points. ``None`` takes the model's own.
        rules: module-name glob -> TP style (``"colwise"``, ``"rowwise"``, ``"embedding"``,
            ``"head"``, ``"norm"`` or a style object). ``None`` takes the model's own.
        sequence_parallel: shard activations between blocks on the sequence dim over tp
            (Megatron's ``--sequence-parallel``). Needs tp > 1.
        recompute: ``"none"``, ``"selective"`` (keep matmul/attention outputs, recompute the
            cheap element-wise ops) or ``"full"`` (keep only each block's input).
        selective_policy: what ``recompute="selective"`` keeps: ``"save_matmuls"`` every
            matmul output, or ``"save_alternate_matmuls"`` every second one of a block
            (TorchTitan's op-level policy: about a third less saved activation memory for
            rerunning about a third of the forward's matmuls; ``recompute.py``).
        recompute_method / recompute_num_layers: Megatron's ``--recompute-method`` and
            ``--recompute-num-layers`` for ``recompute="full"``: ``"block"`` recomputes the
            first N blocks only; ``"uniform"`` recomputes every block.
        compile: ``torch.compile`` each block and the loss: ``True``, ``False``, or ``"auto"``
            (the default: on when the mesh is on CUDA, the fast path: the 8B recipe under TP2 on
            2 x H200 ran at 1.7-2x its eager tokens/s, issue 23; off on the CPU, where compile
            time outweighs what it saves).
        kernels: ``"torch"``, ``"triton"``, ``"auto"`` or ``{family: backend}`` over the
            families ``attention``, ``sp_reduce_scatter``, ``moe_dispatch``. ``"triton"`` where
            it cannot run is a ``ValueError`` before any collective; ``"auto"`` takes Triton
            where it can run and otherwise torch (for ``sp_reduce_scatter`` with one log line
            saying why: ``tensor_parallel/sp_reduce_scatter.py``; its Triton backend also moves
            SP's all-gather into the column-parallel GEMMs: ``gather_once.py``). ``attention`` (the ring's
            block kernel) also takes ``"sdpa"`` (PyTorch's fused attention ops), and its
            ``"auto"`` picks from a table measured per GPU, with one log line
            (``context_parallel/backend_choice.py``).
        fused_rowwise: with the Triton SP reduce-scatter, run each plain row-parallel
            ``nn.Linear``'s matmul and reduce-scatter as one op (chunked GEMMs pushed into
            symmetric memory, ``tensor_parallel/matmul_reduce_scatter.py``); False keeps the
            unfused kernel after the matmul. With the torch (NCCL) reduce-scatter under
            ``recompute="selective"``, eager blocks run matmul and NCCL reduce-scatter as one op,
            so the recompute saves the layer's output once (``tensor_parallel/rowwise_nccl.py``).
            A ``Rowwise(fused=...)`` rule overrides it per module.
        fused_loss: compute the loss from the output head's input and weight chunk by chunk of
            tokens, never making the (tokens, vocab) logits (``fused_cross_entropy.py``;
            loss-parallel over the vocabulary shard under TP; exact to the unfused loss up to
            rounding). ``True``: fused, or a ``ValueError`` before any collective saying why it
            cannot be (a head with a bias or that is not a plain ``nn.Linear``, logits
            transformed after the head); ``"auto"``: fused where it can be, unfused elsewhere;
            ``False``: the head's logits, then cross entropy. ``pm(x)`` returns logits either way.
        fused_loss_chunk_tokens: tokens per chunk of the fused loss; ``None``: as many as keep
            one chunk's fp32 logits within 256 MiB (512 tokens of a 128K vocabulary).
        micro_batch_size / global_batch_size: sequences per forward per data-parallel rank,
            and per optimizer step over all data-parallel ranks; their ratio over dp is the
            number of accumulated micro-batches.
        mixed_precision: ``"bf16"`` computes in bf16 with fp32 master weights and fp32
            gradient reduction; ``"fp32"`` computes in fp32.
        reshard_after_forward: FSDP frees gathered parameters after forward (ZeRO-3) when
            True; keeps them to backward (ZeRO-2-like) when False. ``None``: FSDP default.
        num_heads / num_kv_heads: for a user's model, so TP degrees are checked against
            them (built-in models know their own).
        expert_parallel: experts sharded over this many ranks, folded out of dp_shard x cp x tp
            (Megatron's ``--expert-model-parallel-size``; experts are never tensor-sharded:
            under TP the MoE layers run token parallel over tp, see ``expert_parallel.py``).
        moe_recv_bound: the expert rows a rank may receive per MoE layer over symmetric memory
            (``kernels={"moe_dispatch": "triton" | "auto"}`` with expert_parallel > 1 on GPUs
            of one host), as a multiple of the T*k rows it routes itself (T tokens, top-k).
            ``None``: expert_parallel, the worst case, which no routing exceeds (values above it
            act as it). It sizes the receive area and the dispatched tensor, so the experts'
            element-wise ops and kept activations scale with it: 1.25, say, fits balanced
            routing at a quarter of headroom; a layer whose routing exceeds it is a
            ``ValueError`` naming this field (``expert_parallel/symm_dispatch.py``). The NCCL
            exchange sizes its buffers per call and ignores it.
        moe_dispatch_chunks: with the symmetric-memory exchange, each MoE layer's tokens in
            this many chunks, so one chunk's exchange runs on a side stream beside another's
            grouped GEMMs (and the first beside the shared experts), forward and backward
            (``expert_parallel/overlap.py``; dropless layers; 1, the default: one exchange a
            layer, on the compute stream). The NCCL exchange ignores it. At EP2 on 2 x H200 two
            chunks were 7% slower (the exchange is 5% of the layer; RESULTS.md, issue 22): it
            is meant for EP8 and wider, where the exchange weighs more.
        pipeline_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``,
            ``"zero_bubble"`` (interleaved zero bubble) or ``"zbv"`` (zero bubble, V shape).
            ``None``: ``"interleaved_1f1b"`` with virtual stages, else ``"1f1b"`` (Megatron's).
        virtual_stages: pipeline stages per pp rank (Megatron's
            ``--num-virtual-stages-per-pipeline-rank``); ``None``: the schedule's minimum.
        layers_per_virtual_stage: Megatron's ``--num-layers-per-virtual-pipeline-stage``;
            sets virtual_stages = layers / (pp x this), which must be an integer.
        layers_per_stage: an explicit block count per stage (pp x virtual entries).
        first_stage_layers / last_stage_layers: fewer blocks on the first / last stage to
            balance the embedding and the head (Megatron's
            ``--decoder-first/last-pipeline-num-layers``); the rest split evenly.
        pipeline_sm_carveout: SMs that cuBLAS's matmuls leave free during each pipeline step
            (torch's experimental SM carveout), for the NCCL P2P kernels that interleaved and
            zero-bubble schedules run beside the compute: a persistent GEMM sized to every SM
            otherwise waits for the few SMs a spinning P2P kernel holds (measured: RESULTS.md,
            issue 24). Pair with ``build_mesh(nccl_max_ctas={"pp": n})``. 0: off.
        pipeline_p2p: how the pipeline's activations and gradients move between pp ranks:
            ``"nccl"`` (torch's P2P calls), ``"copy_engine"`` (copy-engine copies into the peer's
            symmetric memory: no SM spins while a message waits, ``pipeline/copy_engine_p2p.py``;
            pp ranks on one NVLink host; a ``ValueError`` before any collective where it cannot
            run) or ``"auto"`` (the default: the copy engine for the schedules that post their
            P2P ahead, interleaved 1F1B, zero bubble and ZBV, where it can run; else NCCL. On 2
            x H200 at PP2 it made interleaved 1F1B 3% faster, and faster than 1F1B; RESULTS.md).
    """

    blocks: str | None = None
    rules: dict[str, Any] | None = None
    sequence_parallel: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    selective_policy: Literal["save_matmuls", "save_alternate_matmuls"] = "save_matmuls"
    recompute_num_layers: int | None = None
    compile: bool | str = "auto"
    kernels: str | dict[str, str] = "torch"
    fused_rowwise: bool = True
    fused_loss: bool | str = False
    fused_loss_chunk_tokens: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    reshard_after_forward: bool | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    expert_parallel: int = 1
    moe_recv_bound: float | None = None
    moe_dispatch_chunks: int = 1
    pipeline_schedule: str | None = None
    virtual_stages: int | None = None
    layers_per_virtual_stage: int | None = None
    layers_per_stage: list[int] | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    pipeline_sm_carveout: int = 0
    pipeline_p2p: Literal["nccl", "copy_engine", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={self.recompute!r}: choose one of {RECOMPUTE_MODES}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(
                f"recompute_method={self.recompute_method!r}: choose one of {RECOMPUTE_METHODS}")
        if self.selective_policy not in ("save_matmuls", "save_alternate_matmuls"):
            raise ValueError(f"selective_policy={self.selective_policy!r}: choose 'save_matmuls' or "
                             "'save_alternate_matmuls'")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ValueError(f"recompute_num_layers={self.recompute_num_layers} must be >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile={self.compile!r}: choose True, False or 'auto' (on CUDA only)")
        self.kernels = _normalize_kernels(self.kernels)
        if self.fused_loss not in (True, False, "auto"):
            raise ValueError(f"fused_loss={self.fused_loss!r}: choose True, False or 'auto' (fused where it applies)")
        from .pipeline.schedules import SCHEDULES

        if self.pipeline_schedule is not None and self.pipeline_schedule not in SCHEDULES:
            raise ValueError(f"pipeline_schedule={self.pipeline_schedule!r}: choose one of {list(SCHEDULES)}")
        if self.virtual_stages is not None and self.layers_per_virtual_stage is not None:
            raise ValueError("give virtual_stages or layers_per_virtual_stage, not both")
        for name in ("first_stage_layers", "last_stage_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name}={v!r} must be an int >= 0")
        if (not isinstance(self.pipeline_sm_carveout, int) or isinstance(self.pipeline_sm_carveout, bool)
                or not 0 <= self.pipeline_sm_carveout <= 64):
            raise ValueError(f"pipeline_sm_carveout={self.pipeline_sm_carveout!r} must be an int in 0..64 "
                             "(SMs left to the pipeline's P2P kernels; 0: off)")
        if self.pipeline_p2p not in ("nccl", "copy_engine", "auto"):
            raise ValueError(f"pipeline_p2p={self.pipeline_p2p!r}: choose 'nccl', 'copy_engine' (the copy engine over "
                             "symmetric memory, pp ranks on one NVLink host) or 'auto'")
        if self.layers_per_stage is not None and not all(isinstance(c, int) for c in self.layers_per_stage):
            raise ValueError(f"layers_per_stage={self.layers_per_stage!r} must be a list of ints")
        for name in ("micro_batch_size", "global_batch_size", "fused_loss_chunk_tokens", "num_heads", "num_kv_heads",
                     "virtual_stages", "layers_per_virtual_stage", "expert_parallel", "moe_dispatch_chunks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive int or None")
        v = self.moe_recv_bound
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(f"moe_recv_bound={v!r} must be a number > 0 (the rows a rank may receive per MoE layer, "
                             f"as a multiple of its T*k routed rows), or None for the worst case, expert_parallel")
        if (self.micro_batch_size and self.global_batch_size
                and self.global_batch_size % self.micro_batch_size):
            raise ValueError(
                f"global_batch_size({self.global_batch_size}) is not a multiple of "
                f"micro_batch_size({self.micro_batch_size})")
        if self.rules is not None and not isinstance(self.rules, dict):
            raise TypeError(f"rules must be a dict of module-name glob -> style, got {type(self.rules)}")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise TypeError(f"blocks must be a glob string such as 'layers.*', got {self.blocks!r}")

    def compiles_on(self, device_type: str) -> bool:
        """Whether blocks are compiled on a mesh of ``device_type`` ("auto": CUDA only)."""
        return self.compile is True or (self.compile == "auto" and device_type == "cuda")

    def kernel_backend(self, family: str) -> str:
        """The backend chosen for one kernel family."""
        if family not in KERNEL_FAMILIES:
            raise KeyError(f"unknown kernel family {family!r}; families: {KERNEL_FAMILIES}")
        return self.kernels[family]  # type: ignore[index]


def _normalize_kernels(kernels: str | dict[str, str]) -> dict[str, str]:
    if isinstance(kernels, str):
        if kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels={kernels!r}: choose one of {KERNEL_BACKENDS} or a dict per family")
        return {f: kernels for f in KERNEL_FAMILIES}
    if not isinstance(kernels, dict):
        raise TypeError(f"kernels must be a str or a dict {{family: backend}}, got {kernels!r}")
    unknown = set(kernels) - set(KERNEL_FAMILIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; families: {KERNEL_FAMILIES}")
    out = {f: "torch" for f in KERNEL_FAMILIES}
    for fam, backend in kernels.items():
        if backend not in FAMILY_BACKENDS[fam]:
            raise ValueError(f"kernels[{fam!r}]={backend!r}: choose one of {FAMILY_BACKENDS[fam]}")
        out[fam] = backend
    return out
