"""The SP reduce-scatter after row-parallel layers: Triton over symmetric memory, or NCCL.

Under sequence parallelism every row-parallel layer (and the vocab-parallel embedding) ends
with ``Partial() -> Shard(1)``: a reduce-scatter along the sequence in forward, an all-gather
in backward (Korthikanti et al. 2022). With ``plan.kernels["sp_reduce_scatter"]`` resolved to
``"triton"``, the rowwise output hook (``styles._RowwiseParallel``) calls
:func:`redistribute_rowwise_output`, which runs the kernel of
``triton_kernels/sp_reduce_scatter.py`` (protocol, barrier and deadlock-freedom argument in
its docstring)::

    forward:  out_r = sum_p x_p[:, chunk r]   Triton: push to peers' symmetric buffers,
                                               signal-pad barrier, fp32 sum (one launch)
    backward: dx = all_gather(dout, dim)       functional all_gather_into_tensor (NCCL; exact: a copy)

Workspace: per process group, one symmetric-memory allocation of two halves (the kernel
double-buffers), created on first use by a collective rendezvous, grown (all ranks at the same
call, since shapes agree) to the next power of two. Launches are kept in one stream order per
workspace (the current stream waits on the previous call's stream), which the protocol needs.

With "triton", every row-parallel plain ``nn.Linear`` instead runs the matmul fused with this
reduce-scatter, chunk by chunk (``matmul_reduce_scatter.py``), which shares the workspace below
and the kernel's reduce; the unfused op stays for any other ``Partial -> Shard(seq)`` module.

Per-call cost (issue 6 measured a flat 0.13-0.17 ms per call below 32 MB): everything that
depends only on the call shape (output shape, grid, both halves' buffer views padded to the
kernel's 8 pointer arguments, the checks) is built on the first call of a shape and cached on the
workspace (``_CallPlan``); a call is then a dict lookup, ``torch.empty``, the stream check and
``JITFunction.run``, and without autograd the custom op's dispatch is skipped.

torch.compile and selective recompute: with autograd the op is the custom op
``torch.ops.dtensor_parallel.sequence_reduce_scatter`` (local tensors, the group by name; a
fake implementation gives shapes, ``register_autograd`` the all-gather), opaque to dynamo and
inductor, so a compiled block has no graph break, and ``recompute.py`` saves its output.

Choosing the backend (:func:`check_sp_reduce_scatter`, before any collective): ``"torch"``
always gives DTensor's own redistribute. ``"triton"`` needs symmetric memory; where it cannot
exist it is a ``ValueError`` naming the reason; ``"auto"`` then falls back to torch with one
log line. Symmetric memory is unavailable when: the mesh is not on CUDA; tp < 2 or tp > 8;
torch lacks ``torch.distributed._symmetric_memory``; tp exceeds this host's visible GPUs (the
tp group must share one NVLink domain); or a visible GPU has no peer access. On CPU with
``TRITON_INTERPRET=1`` (tests only) "triton" runs the same kernel code with the peers'
buffers emulated by a gloo all-gather.

Per call, the NCCL (DTensor) path still serves, identically on every rank, when: the
placements are not exactly ``Partial("sum") -> Shard(d)`` on a 1-D mesh (so the vocab-parallel
embedding, whose ``_MaskPartial`` must mask out-of-shard tokens before the sum, keeps
DTensor's path), the dtype is not fp16/bf16/fp32, or the scattered dim does not divide by tp.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group  # group name -> group (2.11+)
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..warn_once import warn_once

logger = logging.getLogger(__name__)
funcol_ops = torch.ops._c10d_functional

_SLOT0 = 64  # first signal-pad slot of the kernel; the workspace's init barrier (channel 0) uses [0, tp)
_MIN_HALF_BYTES = 1 << 20
_WORKSPACES: dict[str, "_Workspace"] = {}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def symm_mem_unavailable(world: int, device_type: str, dim: str = "tp") -> str | None:
    """Why symmetric memory cannot serve a ``dim`` group (tp, ep) of ``world`` ranks, or None."""
    from triton_kernels.sp_reduce_scatter import MAX_WORLD

    if device_type != "cuda" or not torch.cuda.is_available():
        return f"the mesh is on {device_type!r}; symmetric memory needs CUDA GPUs"
    if not 2 <= world <= MAX_WORLD:
        return f"{dim}={world}; the kernel serves 2..{MAX_WORLD} ranks of one NVLink domain"
    try:
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _SymmetricMemory
    except ImportError as e:
        return f"this torch build has no symmetric memory ({e})"
    needed = [(symm_mem, "rendezvous"), (_SymmetricMemory, "empty_strided_p2p"), (_SymmetricMemory, "get_buffer"),
              (_SymmetricMemory, "get_signal_pad")]
    missing = [name for obj, name in needed if not hasattr(obj, name)]
    if missing:
        return f"torch {torch.__version__} lacks symmetric-memory APIs {missing}"
    n = torch.cuda.device_count()
    if world > n:
        return f"{dim}={world} but this host sees {n} GPUs; the {dim} group must sit on one NVLink host"
    cur = torch.cuda.current_device()
    no_peer = [d for d in range(n) if d != cur and not torch.cuda.can_device_access_peer(cur, d)]
    if no_peer:
        return f"GPU {cur} has no peer access to GPUs {no_peer}"
    return None


def check_sp_reduce_scatter(plan, mesh) -> str:
    """The backend the rowwise layers will use, "triton" or "torch"; raises a ``ValueError``
    (before any collective) when "triton" is asked for where it cannot run; "auto" falls
    back to "torch" with one log line."""
    from ..mesh import ParallelDims

    requested = plan.kernel_backend("sp_reduce_scatter")
    tp = ParallelDims.from_mesh(mesh).tp
    if requested == "torch" or not plan.sequence_parallel or tp == 1:
        return "torch"
    if mesh.device_type != "cuda" and _interpreted() and requested == "triton":
        return "triton"  # tests: the kernel code under the interpreter, peers emulated
    reason = symm_mem_unavailable(tp, mesh.device_type)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise ValueError(f"kernels['sp_reduce_scatter']='triton' cannot run: {reason}. Use kernels="
                         f"{{'sp_reduce_scatter': 'auto'}} (falls back to NCCL) or 'torch'")
    warn_once(logger, "fallback", "kernels['sp_reduce_scatter']='auto': using the torch (NCCL) reduce-scatter, "
              "since %s", reason)
    return "torch"


# ----------------------------------------------------------------------------------------
# Symmetric-memory workspace
# ----------------------------------------------------------------------------------------


class _Workspace:
    """Two halves of ``half_bytes`` of symmetric memory shared by one process group."""

    def __init__(self, group: dist.ProcessGroup, half_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _SymmetricMemory

        name = group.group_name
        with warnings.catch_warnings():  # torch 2.11 needs it (and warns); later versions may deprecate it
            warnings.simplefilter("ignore")
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
        device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world, self.half_bytes = group.rank(), group.size(), half_bytes
        # a dedicated allocation (not symm_mem.empty's pool): its signal pad is ours alone
        self.buf = _SymmetricMemory.empty_strided_p2p((2 * half_bytes,), (1,), torch.uint8, device)
        self.hdl = symm_mem.rendezvous(self.buf, name)  # collective
        self.offset = self.buf.data_ptr() - int(self.hdl.buffer_ptrs[self.rank])  # bytes from the base
        if self.offset < 0 or self.offset % 16:
            raise RuntimeError(f"symmetric buffer at offset {self.offset} from its base: expected >= 0, 16-aligned")
        pad_slots = int(self.hdl.signal_pad_size) // 4
        self.pads = [self.hdl.get_signal_pad(p, (pad_slots,), dtype=torch.int32) for p in range(self.world)]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.max_programs = min(sms, (pad_slots - _SLOT0) // self.world)
        if self.max_programs < 1:
            raise RuntimeError(f"signal pad of {pad_slots} slots is too small for {self.world} ranks")
        self.calls, self.stream, self.views, self.plans, self.side = 0, None, {}, {}, None
        from triton_kernels.sp_reduce_scatter import pad8
        self.pads8 = pad8(self.pads)  # the kernel's 8 pad arguments, built once
        # pads start at zero: zero ours, then no peer signals before every rank did (the barrier)
        self.pads[self.rank][_SLOT0:].zero_()
        self.hdl.barrier(channel=0)
        torch.cuda.synchronize()

    def begin(self) -> int:
        """This call's buffer half (0 or 1); orders this call's launch after the previous one
        (the kernel's double-buffering argument needs one stream order per workspace)."""
        stream = torch.cuda.current_stream()
        if self.stream is not None and self.stream != stream:
            stream.wait_stream(self.stream)
        self.stream = stream
        self.calls += 1
        return (self.calls - 1) & 1

    def buffers(self, half: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        """Half ``half`` of every rank's buffer as ``(numel,)`` views (built once per key:
        ``get_buffer`` makes a tensor, which costs microseconds per call)."""
        key = (half, dtype, numel)
        views = self.views.get(key)
        if views is None:
            esize = torch.empty((), dtype=dtype).element_size()
            off = (self.offset + half * self.half_bytes) // esize
            views = self.views[key] = [self.hdl.get_buffer(p, (numel,), dtype, off) for p in range(self.world)]
        return views

    def side_stream(self) -> torch.cuda.Stream:
        """The stream of the fused matmul's copy-engine pushes (one per workspace)."""
        if self.side is None:
            self.side = torch.cuda.Stream()
        return self.side


def _workspace(group: dist.ProcessGroup, nbytes: int) -> _Workspace:
    ws = _WORKSPACES.get(group.group_name)
    if ws is None or ws.half_bytes < nbytes:
        if ws is not None:  # no rank may still read the old buffers when they are freed
            torch.cuda.synchronize()
        half = max(_MIN_HALF_BYTES, 1 << (nbytes - 1).bit_length())
        _WORKSPACES[group.group_name] = ws = _Workspace(group, half)
    return ws


class _CallPlan:
    """What one call shape needs on one workspace, built on its first call: output shape,
    grid and tile (``LaunchConfig``), row strides and both halves' buffer arguments padded to
    8. The per-call path is then a dict lookup, ``torch.empty`` and the launch: no shape
    arithmetic, no checks, no ``get_buffer`` views, no argument lists (issue 6: the unfused
    kernel's time was flat at 0.13-0.17 ms below 32 MB, a per-call cost)."""

    def __init__(self, ws: _Workspace, x: torch.Tensor, dim: int):
        from triton_kernels.sp_reduce_scatter import _as_chunks, launch_config, pad8

        x2, self.out_shape = _as_chunks(x, dim, ws.world)  # (outer, W*M)
        outer, wm = x2.shape
        self.contiguous = x.is_contiguous()
        self.stride_xo, self.stride_oo = wm, wm // ws.world
        self.cfg = launch_config(outer, wm // ws.world, ws.max_programs)
        self.bufs8 = [pad8(ws.buffers(h, x.dtype, x2.numel())) for h in (0, 1)]


def _call_plan(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> tuple[_Workspace, _CallPlan]:
    """The workspace and the cached plan of this call shape (creating or growing the
    workspace, a collective, on the first call of a shape that does not fit)."""
    ws = _WORKSPACES.get(group.group_name)
    key = (x.shape, x.stride(), x.dtype, dim)
    plan = ws.plans.get(key) if ws is not None else None
    if plan is None:
        ws = _workspace(group, x.numel() * x.element_size())
        plan = ws.plans[key] = _CallPlan(ws, x, dim)
    return ws, plan


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------


def cannot_serve(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> str | None:
    """Why the Triton path cannot take this call (then DTensor/NCCL does), or None. Depends
    only on what every rank shares (shape, dtype, device type), so all ranks agree."""
    from triton_kernels.sp_reduce_scatter import MAX_WORLD, SUPPORTED_DTYPES

    world = group.size()
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if not 2 <= world <= MAX_WORLD:
        return f"group of {world} ranks"
    if x.dim() == 0 or x.shape[dim] % world:
        return f"dim {dim} of {tuple(x.shape)} does not divide by {world}"
    if x.device.type != "cuda" and not _interpreted():
        return f"{x.device.type} tensors outside the Triton interpreter"
    return None


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    if x.device.type != "cuda":  # interpreter (tests): every rank's partial, then the kernel phases
        from triton_kernels.sp_reduce_scatter import _as_chunks, reduce_scatter_simulated

        x2, out_shape = _as_chunks(x, dim, group.size())  # (outer, W*M)
        gathered = _gather0(x2, group)  # (W, outer, W*M)
        out = reduce_scatter_simulated(gathered, 1)[group.rank()]  # a view at an offset: copy it,
        return out.reshape(out_shape).clone()  # as an op's output must be (its fake says so)
    from triton_kernels.sp_reduce_scatter import launch

    ws, plan = _call_plan(x, dim, group)
    if not plan.contiguous:
        x = x.contiguous()
    out = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device)
    half = ws.begin()
    launch(plan.cfg, x, out, plan.stride_xo, plan.stride_oo, plan.bufs8[half], ws.pads8, ws.rank, ws.world, _SLOT0)
    return out


def _gather0(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's ``t`` stacked: (W, *t.shape), one all-gather into one buffer."""
    world = group.size()
    t = t.contiguous()
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)  # gloo: cat layout
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch 2.13 / 2.11
    gather(out, t, group=group)
    return out.view(world, *t.shape)


def _group(name: str) -> dist.ProcessGroup:
    """The process group registered under ``name`` (custom ops take groups by name)."""
    return _resolve_process_group(name)


def _all_gather(grad: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    """(..., S/W, ...) on each rank -> (..., S, ...), rank p's block at chunk p. A functional
    collective (NCCL, gloo), so AOTAutograd can trace it into a compiled backward."""
    world = _group(group_name).size()
    t = (grad if grad.dim() else grad.view(1)).contiguous()
    flat = funcol_ops.wait_tensor(funcol_ops.all_gather_into_tensor(t, world, group_name))  # (W*d0, ...)
    g = flat.view(world, *t.shape).movedim(0, dim)  # (..., W, S/W, ...)
    return g.reshape(*grad.shape[:dim], world * grad.shape[dim], *grad.shape[dim + 1:])


@torch.library.custom_op("dtensor_parallel::sequence_reduce_scatter", mutates_args=())
def _sequence_reduce_scatter_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    """Reduce-scatter along ``dim`` (Triton); an op, so dynamo traces it without a graph break
    and the selective recompute policy can save its output (``recompute.py``)."""
    return _reduce_scatter(x, dim, _group(group_name))


@_sequence_reduce_scatter_op.register_fake
def _(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] //= _group(group_name).size()
    return x.new_empty(shape)


def _rs_setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    _, ctx.dim, ctx.group_name = inputs


def _rs_backward(ctx, grad: torch.Tensor):
    return _all_gather(grad, ctx.dim, ctx.group_name), None, None  # all-gather in backward


_sequence_reduce_scatter_op.register_autograd(_rs_backward, setup_context=_rs_setup_context)


def sequence_reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over ``group`` and keep this rank's chunk of ``dim`` (autograd: all-gather).

    Args:
        x: this rank's partial sums, fp16/bf16/fp32, ``x.shape[dim]`` divisible by the group
            size; CUDA (or CPU under ``TRITON_INTERPRET=1``).
        dim: the scattered dim (the sequence, 1, for SP).
        group: 2..8 ranks; on CUDA they must share one host (symmetric memory).

    With autograd (or under ``torch.compile``) it is the custom op
    ``torch.ops.dtensor_parallel.sequence_reduce_scatter``. Per-call cost in eager: a shape
    already seen skips the checks (they passed on its first call and depend only on the cached
    shape, dtype and group); without autograd the op's dispatch is skipped too (about 10 us of
    Python per call). Under ``torch.compile`` the checks run once, at trace time.
    """
    dim = dim % max(x.dim(), 1)
    compiling = torch.compiler.is_compiling()
    ws = _WORKSPACES.get(group.group_name) if x.is_cuda and not compiling else None
    if ws is None or (x.shape, x.stride(), x.dtype, dim) not in ws.plans:
        reason = cannot_serve(x, dim, group)
        if reason is not None:
            raise ValueError(f"sequence_reduce_scatter cannot serve this call: {reason}")
    if compiling or (x.requires_grad and torch.is_grad_enabled()):
        return _sequence_reduce_scatter_op(x, dim, group.group_name)
    return _reduce_scatter(x, dim, group)


def _scatter_dim(dt: DTensor, target: tuple) -> int | None:
    """d when ``dt`` goes Partial(sum) -> Shard(d) on a 1-D mesh, else None."""
    if dt.device_mesh.ndim != 1 or len(target) != 1 or not isinstance(target[0], Shard):
        return None
    src = dt.placements[0]
    # exactly Partial: the vocab-parallel embedding's _MaskPartial must mask its local
    # values (out-of-shard tokens) before reducing, which only DTensor's own path does
    if type(src) is not Partial or src.reduce_op != "sum":
        return None
    return target[0].dim % dt.ndim


def redistribute_rowwise_output(outputs: DTensor, output_layouts, backend: str = "torch") -> DTensor:
    """The rowwise output hook's redistribution: the Triton reduce-scatter when the style's
    ``backend`` is "triton" and the call qualifies, DTensor's own (NCCL) otherwise."""
    if backend == "triton":
        dim = _scatter_dim(outputs, tuple(output_layouts))
        if dim is not None:
            mesh = outputs.device_mesh
            local = outputs.to_local(grad_placements=[Replicate()])  # grad of a Partial: Replicate
            if cannot_serve(local, dim, mesh.get_group()) is None:
                out = sequence_reduce_scatter(local, dim, mesh.get_group())
                return DTensor.from_local(out, mesh, [Shard(dim)], run_check=False)
    return outputs.redistribute(placements=output_layouts, async_op=False)
