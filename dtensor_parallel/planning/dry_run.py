"""``dtensor-parallel plan RECIPE``: the recipe's layout on a simulated cluster of its full
size, with no GPU.

How: the model is built on the meta device (no storage), and the *real*
:func:`~dtensor_parallel.parallelize` runs on torch's ``fake`` process-group backend, which
lets one process be any rank of any world size: the DeviceMesh, every sub-group, the
pipeline split and the DTensor shards (TP, FSDP, EP) are exactly those of a real run,
while collectives are no-ops. So the parameter, gradient and optimizer bytes reported
here are read off the local shards ``parallelize`` built, not recomputed.

Which ranks: the shards of a rank depend on its pipeline stage(s) and, through FSDP's
uneven chunks, on its data-parallel coordinate; TP, CP and EP shards are the same size on
every rank of a stage (validation requires the degrees to divide). So the dry run builds
one representative per pp rank, the rank at mesh coordinates ``(pp, 0, 0, 0, 0)``, whose
FSDP chunks are the largest (``torch.chunk`` gives the first ranks the rounded-up share).
A 1024-rank DeepSeek-V3-shaped recipe is 16 meta-device parallelize calls, seconds.

Activations, logits and transients come from the estimator (:mod:`dtensor_parallel.planning.memory`,
which states its assumptions); its parameter bytes are checked equal to the dry run's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .memory import (GIB, MemoryEstimate, activation_alternatives, estimate_memory, fmt_bytes, optimizer_of,
                     local_param_numels, parse_bytes)
from ..mesh import FLATTENED_VIEWS, MESH_DIMS, ParallelDims
from ..plan import ParallelPlan

DEFAULT_GPU_MEMORY = "80GiB"  # H100 SXM
DEFAULT_HEADROOM = 0.10  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class RankReport:
    estimate: MemoryEstimate
    numels: dict[str, int]  # real local shard elements, from parallelize
    placements: dict[str, str]  # a few parameters' placements, for the report
    buffer_bytes: int
    built_from: int = 0  # the pp rank whose parallelize call gave these shards


@dataclass
class DryRun:
    name: str
    world_size: int
    dims: ParallelDims
    plan: ParallelPlan
    ep: int
    seq_len: int
    micro_batch_size: int
    n_micro: int
    model_params: int
    model_desc: str
    ranks: list[RankReport]
    mesh_groups: dict[str, list[list[int]]]
    cluster: str
    gpus_per_node: int | None
    args: object = None  # the ModelArgs
    pipeline_p2p: str = "nccl"  # the transport a GPU run takes (p2p_as_run)


def world_size_of(cfg) -> int:
    c = cfg.cluster
    if c.nproc_per_node is None:
        raise ValueError("the recipe's [cluster] has no nproc_per_node: give nproc_per_node (GPUs per "
                         "node) and nodes, or pass --world-size")
    if c.nodes < 1:
        raise ValueError(f"[cluster] nodes={c.nodes} must be >= 1")
    return c.nodes * c.nproc_per_node


def p2p_as_run(cfg, dims: ParallelDims, plan: ParallelPlan, n_micro: int) -> str:
    """The pipeline transport a GPU run of ``cfg`` takes (``p2p_routing.choose_pipeline_p2p``
    from what the recipe knows: one node of GPUs or not; the schedule): the estimate counts
    the copy engine's receive rings where it runs. ``plan``: :func:`plan_of`'s."""
    from ..pipeline.p2p_routing import AUTO_SCHEDULES
    from .memory import stage_layout

    requested, c = cfg.parallel_plan().pipeline_p2p, cfg.cluster
    if dims.pp < 2 or requested == "nccl" or c.nodes > 1 or c.device == "cpu":
        return "nccl"
    schedule = stage_layout(cfg.model.args(), dims, plan, n_micro).schedule
    return "copy_engine" if requested == "copy_engine" or schedule in AUTO_SCHEDULES else "nccl"


def plan_of(cfg, dims: ParallelDims) -> tuple[ParallelPlan, int]:
    """The ParallelPlan a training run of ``cfg`` builds, and its micro-batches per step.
    Kernels are set to torch and the pipeline's P2P to NCCL: they change no shape, and Triton and
    the copy engine need GPUs (the estimate counts the copy engine's receive rings where a GPU
    run takes it: :func:`p2p_as_run`)."""
    t = cfg.training
    global_batch = t.global_batch_size or t.micro_batch_size * dims.dp
    plan = replace(cfg.parallel_plan(global_batch), kernels="torch", pipeline_p2p="nccl")
    return plan, global_batch // (t.micro_batch_size * dims.dp)


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """Be ``rank`` of a fake process group of ``world_size`` ranks (no communication)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError("the dry run makes its own fake process group: run it outside torchrun "
                               "(another process group is already initialized)")
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mesh_groups(dims: ParallelDims, ep: int) -> dict[str, list[list[int]]]:
    """Every rank group of each mesh dim and flattened view (and of ep), from the layout
    alone: ``mesh[...]`` is ``arange(world).reshape(shape)``, row-major, tp innermost."""
    grid = torch.arange(dims.world_size).reshape(dims.shape)
    out: dict[str, list[list[int]]] = {}
    for i, name in enumerate(MESH_DIMS):
        out[name] = grid.movedim(i, -1).reshape(-1, dims.shape[i]).tolist()
    for view, parts in FLATTENED_VIEWS.items():
        idx = [MESH_DIMS.index(p) for p in parts]
        rest = [i for i in range(len(MESH_DIMS)) if i not in idx]
        size = math.prod(dims.shape[i] for i in idx)
        out[view] = grid.permute(*rest, *idx).reshape(-1, size).tolist()
    if ep > 1:  # expert_parallel.build_expert_groups: consecutive ranks of dp_shard x cp x tp
        out["ep"] = grid.reshape(-1, ep).tolist()
    return out


def dry_run(cfg, world_size: int | None = None) -> DryRun:
    """Build the recipe's model on meta, parallelize it on a fake group of its world size
    as one representative rank per pp rank, and estimate each one's memory."""
    from ..trainer.preflight import check_recipe

    world = world_size or world_size_of(cfg)
    # (not the data file, the device nor the output paths: they are the cluster's; the layout:
    # parallelize below)
    dims = check_recipe(cfg, world, device=False, data=False, layout=False, paths=False)
    plan, n_micro = plan_of(cfg, dims)
    p2p = p2p_as_run(cfg, dims, plan, n_micro)
    args = cfg.model.args()
    t = cfg.training
    reports = []
    built: dict[tuple, tuple[int, dict[str, int], dict[str, str], int]] = {}
    for pp_rank in range(dims.pp):
        key, layers = _position(args, dims, plan, n_micro, pp_rank)
        if key not in built:
            built[key] = (pp_rank, *_parallelize_as(args, dims, plan, pp_rank * (world // dims.pp), world), layers)
        src, numels, placements, buffer_bytes, src_layers = built[key]
        if src != pp_rank:  # same kinds of stages and layers as rank src: same shards, renamed
            rename = {f"layers.{a}.": f"layers.{b}." for a, b in zip(src_layers, layers)}
            numels = {_rename(n, rename): v for n, v in numels.items()}
        est = estimate_memory(args, dims, plan, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                              n_micro=n_micro, pp_rank=pp_rank, numels=numels, pipeline_p2p=p2p,
                              optimizer=optimizer_of(t))
        reports.append(RankReport(est, numels, placements, buffer_bytes, built_from=src))
    c = cfg.cluster
    cluster = c.description or f"{world} ranks"
    return DryRun(cfg.name, world, dims, plan, cfg.parallel.ep, t.seq_len, t.micro_batch_size, n_micro,
                  args.num_params(), _model_desc(cfg, args), reports, mesh_groups(dims, cfg.parallel.ep),
                  cluster, c.nproc_per_node, args, p2p)


def _position(args, dims: ParallelDims, plan: ParallelPlan, n_micro: int, pp_rank: int) -> tuple[tuple, list[int]]:
    """What decides a pp rank's shards: per local stage, whether it holds the embedding /
    the head and the kind (dense or MoE) of each layer. Ranks with the same key get the
    same shards (TP/FSDP/EP sizes follow the shapes), so one parallelize call serves them."""
    from .memory import stage_layout

    layout = stage_layout(args, dims, plan, n_micro)
    if layout is None:
        layers = list(range(args.n_layers))
        return ((True, True, tuple(args.is_moe_layer(i) for i in layers)),), layers
    key, layers = [], []
    for s in layout.stages_of(pp_rank):
        ids = [int(b.split(".")[1]) for b in layout.blocks_of(s)]
        key.append((s == 0, s == layout.n_stages - 1, tuple(args.is_moe_layer(i) for i in ids)))
        layers += ids
    return tuple(key), layers


def _rename(name: str, rename: dict[str, str]) -> str:
    for a, b in rename.items():
        if name.startswith(a):
            return b + name[len(a):]
    return name


def _parallelize_as(args, dims: ParallelDims, plan: ParallelPlan, rank: int, world: int):
    """Real parallelize as ``rank`` of a fake group: (local numels, example placements,
    buffer bytes)."""
    from ..mesh import build_mesh
    from ..models.llama import Llama
    from ..parallelize import parallelize

    with fake_rank(rank, world), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mesh = build_mesh(pp=dims.pp, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                          cp=dims.cp, tp=dims.tp, device_type="cpu")
        with torch.device("meta"):
            model = Llama(args)
        pm = parallelize(model, mesh, plan)
        numels, placements = {}, {}
        for name, p in pm.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            numels[name] = local.numel()
            if len(placements) < 4 and name.startswith("layers."):
                placements[name] = (f"{tuple(p.shape)} -> local {tuple(local.shape)} "
                                    f"{getattr(p, 'placements', '(plain tensor)')}")
        bufs = {id(b): b for m in pm.stage_modules for b in m.buffers()}
        buffer_bytes = sum(b.numel() * b.element_size() for b in bufs.values())
    return numels, placements, buffer_bytes


def _model_desc(cfg, args) -> str:
    active = f", {args.num_params(active=True) / 1e9:.1f}B active" if args.moe is not None else ""
    return (f"{cfg.model.name} {cfg.model.flavour} ({args.num_params() / 1e9:.2f}B params{active}; "
            f"{args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, vocab {args.vocab_size})")


# ---- report -------------------------------------------------------------------------------
def _groups_line(groups: list[list[int]], width: int = 3) -> str:
    shown = ", ".join("[" + ", ".join(map(str, g[:8])) + (", ..." if len(g) > 8 else "") + "]"
                      for g in groups[:width])
    more = f", ... ({len(groups)} groups)" if len(groups) > width else f" ({len(groups)} group{'s' * (len(groups) > 1)})"
    return shown + more


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 7, 8] -> '0-2,7-8'."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(out) or "-"


def format_report(run: DryRun, gpu_memory: int, headroom: float) -> str:
    d = run.dims
    lines = [f"plan {run.name}: {run.cluster}",
             f"  world {run.world_size} ranks; model {run.model_desc}",
             f"  {run.micro_batch_size} x {run.seq_len} tokens a micro-batch, {run.n_micro} micro-batch(es) a step"
             f" per dp rank; mixed_precision={run.plan.mixed_precision}, SP={run.plan.sequence_parallel}, "
             f"recompute={run.plan.recompute}",
             "", "mesh (outermost to innermost), groups of ranks that communicate on each dim:"]
    why = {"pp": "pipeline stages, point to point", "dp_replicate": "HSDP/DDP replicas: gradient all-reduce",
           "dp_shard": "FSDP: weight all-gather, gradient reduce-scatter", "cp": "context parallel: ring attention",
           "tp": "tensor parallel (+SP): per-layer all-gather / reduce-scatter", "dp_shard_cp": "FSDP sharding group",
           "dp_cp": "loss and gradient reduction", "dp": "data loading", "ep": "expert parallel: all-to-all"}
    for name in (*MESH_DIMS, "dp_shard_cp", "ep"):
        if name not in run.mesh_groups:
            continue
        size = len(run.mesh_groups[name][0])
        groups = _groups_line(run.mesh_groups[name]) if size > 1 else "-"
        lines.append(f"  {name:<12} {size:>4}  {why[name]:<60} {groups}")
    if run.gpus_per_node and d.tp > run.gpus_per_node:
        lines.append(f"  WARNING: tp={d.tp} spans more than one node of {run.gpus_per_node} GPUs: TP belongs "
                     f"inside a node")
    usable = gpu_memory * (1 - headroom)
    lines += ["", f"per-rank memory (GiB) of the representative rank of each pp rank, at coordinates "
                  f"(pp, 0, 0, 0, 0); params/grads/AdamW from the real shards of "
                  f"{len({r.built_from for r in run.ranks})} parallelize call(s) (ranks whose stages hold the "
                  f"same kinds of layers share one):"]
    head = (f"  {'rank':>5} {'stages':>8} {'layers':>11} {'params':>9} {'weights':>8} {'grads':>8} {'AdamW':>8} "
            f"{'activ.':>8} {'logits':>8} {'transnt':>8} {'PEAK':>8}  phase")
    lines.append(head)
    for rr in run.ranks:
        e = rr.estimate
        lay = _ranges(e.layers)
        stages = ",".join(map(str, e.stages))
        lines.append(f"  {e.rank:>5} {stages:>8} {lay:>11} {e.params / 1e9:>8.3f}B "
                     f"{e.param_bytes / GIB:>8.2f} {e.grad_bytes / GIB:>8.2f} {e.optimizer_bytes / GIB:>8.2f} "
                     f"{e.activation_bytes / GIB:>8.2f} {e.logits_bytes / GIB:>8.2f} {e.transient_bytes / GIB:>8.2f} "
                     f"{e.peak_bytes / GIB:>8.2f}  {e.peak_phase}")
    worst = max(run.ranks, key=lambda r: r.estimate.peak_bytes).estimate
    if worst.detail.get("p2p_rings"):
        lines.append(f"  (the pipeline's P2P on the copy engine: {fmt_bytes(worst.detail['p2p_rings'])} of receive "
                     f"rings a rank, in each peak; pipeline_p2p='nccl' has none)")
    lines += ["", "  example shards (global -> local, placements on the mesh):"]
    for name, text in run.ranks[0].placements.items():
        lines.append(f"    {name}: {text}")
    # rules of thumb vs the full training state
    mp = d.tp * d.pp
    naive = run.model_params / mp
    lines += ["", f"rule of thumb: {run.model_params / 1e9:.1f}B / (tp {d.tp} x pp {d.pp}) = {naive / 1e9:.2f}B params "
                  f"= {2 * naive / GIB:.1f} GiB of bf16 weights a rank. The training state costs more: on rank "
                  f"{worst.rank} fp32 weights {fmt_bytes(worst.param_bytes)} + fp32 grads {fmt_bytes(worst.grad_bytes)} "
                  f"+ AdamW {fmt_bytes(worst.optimizer_bytes)} = {fmt_bytes(worst.static_bytes)} for "
                  f"{worst.params / 1e9:.2f}B local params (16 B each"
                  + (f", after FSDP over dp_shard x cp = {d.dp_shard_cp}" if d.dp_cp > 1 else "")
                  + f"), plus {fmt_bytes(worst.activation_bytes)} of activations "
                  f"({worst.detail['in_flight']:g} stage-micro-batches in flight) and "
                  f"{fmt_bytes(worst.peak_bytes - worst.static_bytes - worst.activation_bytes)} of logits and "
                  f"transients at the peak."]
    alt = activation_alternatives(run.args, d, run.plan, seq_len=run.seq_len,
                                  micro_batch_size=run.micro_batch_size, layers=run.ranks[0].estimate.layers)
    lines.append(f"activations of one micro-batch on rank {run.ranks[0].estimate.rank}'s "
                 f"{len(run.ranks[0].estimate.layers)} layers (tokens per rank = b s / cp = "
                 f"{run.micro_batch_size * run.seq_len // d.cp}):")
    lines += [f"    {k:<28} {v / GIB:8.2f} GiB" for k, v in alt.items()]
    lines.append("")
    verdict = (f"fits: peak {fmt_bytes(worst.peak_bytes)} on rank {worst.rank} <= {fmt_bytes(usable)} usable of "
               f"{fmt_bytes(gpu_memory)} ({headroom:.0%} headroom)") if worst.peak_bytes <= usable else \
        (f"DOES NOT FIT: rank {worst.rank} peaks at {fmt_bytes(worst.peak_bytes)} ({worst.peak_phase}) > "
         f"{fmt_bytes(usable)} usable of {fmt_bytes(gpu_memory)} ({headroom:.0%} headroom)")
    lines.append(verdict)
    return "\n".join(lines)


def suggest_fix(cfg, run: DryRun, usable: float) -> str | None:
    """The first single change (in order of cost) whose estimated peak fits, as a sentence."""
    args = cfg.model.args()
    d, plan, t = run.dims, run.plan, cfg.training

    def peak(dims: ParallelDims, p: ParallelPlan, mbs: int, n_micro: int) -> float:
        return max(estimate_memory(args, dims, p, seq_len=t.seq_len, micro_batch_size=mbs, n_micro=n_micro,
                                   pp_rank=r, pipeline_p2p=run.pipeline_p2p if dims.pp == d.pp else "nccl",
                                   optimizer=optimizer_of(t)).peak_bytes
                   for r in range(dims.pp))

    candidates = []
    if d.tp > 1 and not plan.sequence_parallel:
        candidates.append(("set [plan] sequence_parallel = true", d, replace(plan, sequence_parallel=True),
                           run.micro_batch_size, run.n_micro))
    for mode in ("selective", "full"):
        if ("none", "selective", "full").index(mode) > ("none", "selective", "full").index(plan.recompute):
            candidates.append((f'set [plan] recompute = "{mode}"', d, replace(plan, recompute=mode),
                               run.micro_batch_size, run.n_micro))
    if run.micro_batch_size > 1:
        k = run.micro_batch_size
        candidates.append((f"set [training] micro_batch_size = 1 ({k}x the micro-batches)", d,
                           replace(plan, micro_batch_size=1), 1, run.n_micro * k))
    for name, change in (("pp", 2), ("tp", 2), ("cp", 2)):
        new = {n: getattr(d, n) for n in ("pp", "dp_replicate", "dp_shard", "cp", "tp")}
        new[name] *= change
        if new["dp_shard"] % change:
            continue
        new["dp_shard"] //= change
        try:
            nd = ParallelDims(**new, world_size=d.world_size)
            if name == "tp" and (run.gpus_per_node and nd.tp > run.gpus_per_node):
                continue
            p = replace(plan, sequence_parallel=plan.sequence_parallel or name == "tp")
            n_micro = max(1, run.n_micro * change) if name != "pp" else run.n_micro
            candidates.append((f"set [parallel] {name} = {new[name]} (dp_shard {d.dp_shard} -> {nd.dp_shard})",
                               nd, p, run.micro_batch_size, n_micro))
        except ValueError:
            continue
    for text, dims, p, mbs, n_micro in candidates:
        try:
            pk = peak(dims, p, mbs, n_micro)
        except ValueError:
            continue
        if pk <= usable:
            return f"{text}: estimated peak {fmt_bytes(pk)}"
    return None


# ---- PNG ------------------------------------------------------------------------------------
SEGMENTS = (("weights", (66, 120, 215)), ("grads", (240, 150, 30)), ("AdamW", (50, 165, 85)),
            ("activations", (150, 90, 200)), ("logits+transient", (200, 60, 60)))


def draw_memory_png(run: DryRun, path: str, gpu_memory: int, headroom: float) -> tuple[int, int]:
    """Horizontal stacked bars (one per representative rank) of the memory at its peak
    phase; a black line at the GPU's memory, a grey one at the usable part."""
    from .draw import AXIS, INK, PAD, Canvas, text_width

    rows = [(f"RANK {rr.estimate.rank} PP {rr.estimate.coords['pp']}", list(rr.estimate.breakdown().values()),
             rr.estimate.peak_bytes) for rr in run.ranks]
    label_w = max(text_width(r[0]) for r in rows) + 2 * PAD
    plot_w = 900
    vmax = max(max(r[2] for r in rows), gpu_memory) * 1.05
    row_h, gap, top = 22, 6, 60
    width = label_w + plot_w + 2 * PAD
    height = top + len(rows) * (row_h + gap) + 40
    cv = Canvas(width, height)
    cv.text(PAD, PAD, f"{run.name}: PEAK MEMORY PER RANK (GIB), WORLD {run.world_size}")
    x = PAD
    for name, rgb in SEGMENTS:
        cv.rect(x, PAD + 20, x + 14, PAD + 34, rgb)
        cv.text(x + 18, PAD + 22, name)
        x += 18 + text_width(name) + 16
    scale = plot_w / vmax
    for i, (label, segs, _) in enumerate(rows):
        y = top + i * (row_h + gap)
        cv.text(PAD, y + 6, label)
        x0 = label_w
        for (name, rgb), v in zip(SEGMENTS, segs):
            x1 = x0 + round(v * scale)
            cv.rect(x0, y, x1, y + row_h, rgb)
            x0 = x1
        cv.text(x0 + 6, y + 6, f"{sum(segs) / GIB:.1f}")
    bottom = top + len(rows) * (row_h + gap)
    for v, rgb in ((gpu_memory, INK), (gpu_memory * (1 - headroom), AXIS)):
        gx = label_w + round(v * scale)
        cv.rect(gx, top - 4, gx + 2, bottom, rgb)
    for tick in range(0, int(vmax / GIB) + 1, max(1, int(vmax / GIB) // 8)):
        tx = label_w + round(tick * GIB * scale)
        cv.rect(tx, bottom, tx + 1, bottom + 5, AXIS)
        cv.text(tx - text_width(str(tick), 1) // 2, bottom + 8, str(tick), 1, AXIS)
    with open(path, "wb") as f:
        f.write(cv.png())
    return width, height


# ---- the command -----------------------------------------------------------------------------
def run_plan(recipe: str, flags: list[str], *, gpu_memory: str | None, world_size: int | None,
             out: str | None, headroom: float = DEFAULT_HEADROOM) -> tuple[int, str]:
    """The ``plan`` command: (exit code, report). 0 fits, 1 does not fit (the report names
    the fix), 2 a recipe error."""
    from ..trainer import load_config

    try:
        cfg = load_config(recipe, flags)
        mem = parse_bytes(gpu_memory or cfg.cluster.gpu_memory or DEFAULT_GPU_MEMORY)
        run = dry_run(cfg, world_size)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        return 2, f"dtensor-parallel plan: error: {e}"
    usable = mem * (1 - headroom)
    report = format_report(run, mem, headroom)
    path = out or f"plan_{run.name}.png"
    w, h = draw_memory_png(run, path, mem, headroom)
    report += f"\nwrote {path} ({w}x{h} px)"
    worst = max(r.estimate.peak_bytes for r in run.ranks)
    if worst <= usable:
        return 0, report
    fix = suggest_fix(cfg, run, usable)
    report += "\nfix: " + (fix or "no single change fits: raise pp or tp, or use more GPUs "
                                  "(dtensor-parallel suggest ... proposes a layout)")
    return 1, report


__all__ = ["DryRun", "dry_run", "format_report", "draw_memory_png", "run_plan", "mesh_groups",
           "local_param_numels"]
