"""``torch.compile`` per block (the chain's compile step), in a cache directory of the rank's
own (:func:`isolate_compile_cache`).

Static shapes: blocks that see two input shapes (a transformers model's first layer takes
the whole sequence and slices its SP shard) get a graph each, instead of one dynamic-shape
graph, which DTensor inputs fail to trace (torch 2.11, H200: "unhashable type: non-nested
SymInt" in the RMSNorm).

Context parallel inside activation recompute: the ring is entered by the attention site's
forward hooks, which push its ``RingAttentionMode`` and pop it again (``context_parallel/
attention.py``). Inside a checkpointed block Dynamo refuses any side effect it cannot
replay in the recompute ("HOP: Unsafe side effect ... TorchFunctionModeStackVariable"),
falls back to eager for the whole block and counts a graph break. Here the push and the
pop cancel, and the recompute replays the traced graph, which already holds the ring op,
so nothing needs replaying: such blocks are traced with
``skip_fwd_side_effects_in_bwd_under_checkpoint`` set, for their own calls only (the
setting stays off for any other code of the process; TorchTitan sets it globally).

The backend is inductor unless ``DTP_COMPILE_BACKEND`` names another
(:func:`compile_backend`). The CPU test suite sets ``aot_eager_decomp_partition``: Dynamo's
trace, AOTAutograd, the decompositions and the min-cut partitioner (what recompute saves),
without inductor's code generation: with cold caches its C++ builds took 75 s of the
compile-heavy test files' 125 s on the 2-core CI machine. Generated code is the GPU suite's
part (every recipe's layout compiled, inductor), and one CPU case keeps inductor
(``tests/test_compile.py``).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

#: the inductor cache directory of this process's rank lives under this name
RANK_CACHE = "rank{}"
log = logging.getLogger(__name__)


def compiles_blocks(plan, device_type: str, schedule: str | None) -> bool:
    """Whether ``parallelize`` compiles the blocks: ``plan.compiles_on(device_type)``, except
    under a pipeline schedule that splits each backward into its input-gradient and
    weight-gradient halves (zero_bubble, zbv). A compiled block's backward is one graph: the
    first half frees its buffers, and the second fails ("donated buffers", on 2 x H200 and on
    CPU ranks; pytorch/pytorch#161904), or, with donation off, reruns the whole backward.
    ``compile=True`` with such a schedule is an error that names the fix; ``"auto"`` leaves
    the blocks eager and says so in one log line. Called before any collective."""
    if not plan.compiles_on(device_type):
        return False
    from .pipeline.schedules import SCHEDULES

    if schedule is None or not SCHEDULES[schedule].splits_backward:
        return True
    why = (f"pipeline_schedule={schedule!r} splits each backward into input- and weight-gradient "
           "halves, which a compiled block's single backward graph cannot (pytorch/pytorch#161904)")
    if plan.compile is True:
        raise ValueError(f"compile=True: {why}; set compile=False (or 'auto', which keeps these blocks "
                         "eager) or choose pipeline_schedule '1f1b' or 'interleaved_1f1b'")
    log.info("compile='auto': blocks stay eager: %s", why)
    return False


def isolate_compile_cache() -> str | None:
    """Give this rank its own inductor cache directory (AOTAutograd's and the FX graph cache
    live under it): ``$TORCHINDUCTOR_CACHE_DIR/rank<global rank>``, under torch's default
    when unset. Ranks of one host share the default directory, and torch's cache keys do not
    always tell the ranks' graphs apart (pytorch/pytorch#188390, #188332: a DTensor graph's
    AOTAutograd key is the same on every rank), so a warm cache served one rank another's
    compiled code: on gloo ranks (torch 2.13) the TP2+SP Llama and the TP2 MoE parity cases
    computed another loss (5.188 against 5.236) on every run after the first, and matched with
    the caches off or one directory a rank. Costs each rank its own compile of a graph another
    rank of the host already compiled. Returns the directory (None: a single process)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    mine = RANK_CACHE.format(dist.get_rank())
    if os.path.basename(os.path.normpath(base)) != mine:
        base = os.path.join(base, mine)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = base  # read by torch at each cache lookup
    return base


def compile_backend() -> str:
    """``torch.compile``'s backend for the blocks and the loss: ``$DTP_COMPILE_BACKEND``, else
    "inductor" (read at each compile, so a test can switch it in a pooled worker)."""
    return os.environ.get("DTP_COMPILE_BACKEND") or "inductor"


def compile_block(block: nn.Module, has_ring: bool) -> None:
    """Compile ``block`` (static shapes); ``has_ring``: it holds a context-parallel
    attention site (see the module docstring)."""
    block.compile(dynamic=False, backend=compile_backend())
    if not has_ring:
        return
    compiled = block._compiled_call_impl  # what nn.Module.compile installed

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args, **kwargs)

    block._compiled_call_impl = call
